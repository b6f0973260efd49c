"""Reuse an accuracy only for the very same model files, test data, settings and torch.

Scoring a MiniLM on the five demo test sets costs about 26 s of CPU per method, while hashing a
model folder costs tens of milliseconds per 100 MB. Merges are deterministic, so a rerun that
changes nothing rebuilds every model bit for bit and its scores can be looked up instead of
recomputed; a model whose bytes changed (other merge settings, a retrained candidate) gets a new
key and is scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from regmean_pipeline.io.adapters import is_adapter
from regmean_pipeline.io.weights import adapter_base_dir

log = logging.getLogger(__name__)

# Records about a model that do not change its predictions (and may hold timestamps); README.md is the
# model card, which `regmean eval` itself rewrites with the scores it keys.
RECORD_FILES = frozenset({"finetune.json", "merge_report.json", "README.md"})
SCORE_FIELDS = (("accuracy", "correct", "total"), ("loss", "perplexity", "tokens"))  # a classifier's, an LM's
_CHUNK = 1 << 24


def model_digest(folder: Path) -> str:
    """sha256 over the name, size and bytes of every file directly in ``folder`` but the records."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name not in RECORD_FILES):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def score_key(folder: Path, task_checksum: str, *, max_length: int, batch_size: int, device: torch.device) -> dict:
    """Everything a score depends on (batch size included: padding moves logits by rounding); a LoRA
    adapter's score depends on its base's files too."""
    key = {"model": model_digest(folder), "task": task_checksum, "max_length": max_length,
           "batch_size": batch_size, "device": torch.device(device).type, "torch": torch.__version__}
    if is_adapter(folder):
        key["base_model"] = model_digest(adapter_base_dir(Path(folder)))
    return key


def _key_id(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


class ScoreBook:
    """Scores found in earlier results (``regmean eval``'s results.json, ``regmean finetune``'s records)."""

    def __init__(self) -> None:
        self._scores: dict[str, dict] = {}

    def add(self, key: dict | None, scores: dict) -> None:
        fields = next((f for f in SCORE_FIELDS if set(f) <= set(scores)), None)
        if isinstance(key, dict) and fields is not None:
            self._scores[_key_id(key)] = {k: scores[k] for k in fields}

    def find(self, key: dict) -> dict | None:
        found = self._scores.get(_key_id(key))
        return dict(found) if found is not None else None

    def read_eval_results(self, path: Path) -> None:
        """Scores of an earlier ``regmean eval`` output; an unreadable file only means nothing to reuse."""
        results = _read_json(path)
        for method in (results.get("methods") or {}).values():
            for scores in ((method or {}).get("per_task") or {}).values():
                if isinstance(scores, dict):
                    self.add(scores.get("key"), scores)

    def read_finetune_record(self, path: Path) -> None:
        """The test score ``regmean finetune`` recorded for a candidate (computed by the same function)."""
        test = _read_json(path).get("test")
        if isinstance(test, dict):
            self.add(test.get("key"), test)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: not read for score reuse (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
