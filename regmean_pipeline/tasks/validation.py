"""Validation splits that no candidate was trained on: rows of a task's train.jsonl held out by a rule on
their own content (a seeded hash of the row), so the split does not depend on the rows' order, equal rows
land on the same side, and anyone holding the rule can tell which rows a candidate trained on."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import replace_file

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.jsonl"


def row_identity(row: dict) -> str:
    """A row's content, canonical: what makes two rows the same row."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def held_out(row: dict, fraction: float, seed: int) -> bool:
    """Whether the row belongs to the validation split: its seeded hash, as a number in [0, 1), is below
    ``fraction``."""
    digest = hashlib.sha256(f"{seed}\0{row_identity(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64 < fraction


def read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RegMeanError(f"{path}: line {number} is not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise RegMeanError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def split_off_validation(folder: Path, fraction: float, seed: int) -> tuple[list[int], dict]:
    """Hold ``fraction`` of the task's train.jsonl out (by ``held_out``) and write those rows as the task's
    validation.jsonl (an identical one already there is kept; another is refused). Returns the indices of
    the rows left to train on and the record that lets a later check tell which rows those were."""
    if not 0.0 < fraction < 1.0:
        raise RegMeanError(f"--validation-fraction: must lie in (0, 1), got {fraction}")
    train = Path(folder) / "train.jsonl"
    rows = read_rows(train)
    kept = [i for i, row in enumerate(rows) if not held_out(row, fraction, seed)]
    validation = [rows[i] for i in range(len(rows)) if i not in set(kept)]
    if not validation or not kept:
        raise RegMeanError(f"{train}: --validation-fraction {fraction} holds out {len(validation)} of {len(rows)} "
                           "rows; both the validation split and the training rows must be non-empty")
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in validation)
    target = Path(folder) / VALIDATION_FILE
    if target.exists() and target.read_text(encoding="utf-8") != text:
        raise RegMeanError(f"{target}: exists and holds other rows than --validation-fraction {fraction} (seed "
                           f"{seed}) holds out of train.jsonl; remove it or use the fraction and seed that made it")
    if not target.exists():
        replace_file(target, text)
    return kept, {"fraction": fraction, "seed": seed, "rows": len(validation), "train_rows": len(kept),
                  "train_file": file_digest(train), "validation_file": file_digest(target)}


def trained_rows_seen_in(folder: Path, record: dict | None, what: str) -> int:
    """How many rows of the task's validation.jsonl a candidate trained on, by its finetune record (None:
    no record, nothing to check). A record made from another train.jsonl cannot be checked: logged, 0."""
    if not record:
        return 0
    train = Path(folder) / "train.jsonl"
    if not train.exists():
        return 0
    held = record.get("validation")
    if held and held.get("train_file") != file_digest(train):
        log.warning("%s: trained on another train.jsonl than %s holds now; its validation rows are not checked",
                    what, folder)
        return 0
    trained = {row_identity(row) for row in read_rows(train)
               if not (held and held_out(row, float(held["fraction"]), int(held["seed"])))}
    return sum(row_identity(row) in trained for row in read_rows(Path(folder) / VALIDATION_FILE))
