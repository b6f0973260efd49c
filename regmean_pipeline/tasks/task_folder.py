"""Sentence classification tasks stored as folders: train.jsonl, test.jsonl and labels.json.

Each JSONL line is ``{"text": str, "label": int}``; ``labels.json`` lists the label names in index
order (``{"labels": [...], ...}``). The splits are read through ``datasets`` (its JSON builder), so
they come back as ordinary ``datasets.Dataset`` objects with ``text`` and ``label`` columns.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from regmean_pipeline.errors import RegMeanError

SPLITS = ("train", "test")
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    folder: Path
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split_file(self, split: str) -> Path:
        if split not in SPLITS:
            raise RegMeanError(f"task {self.name}: unknown split {split!r} (splits: {', '.join(SPLITS)})")
        return self.folder / f"{split}.jsonl"

    def load(self, split: str):
        """The split as a datasets.Dataset with 'text' (str) and 'label' (int in range) columns, checked."""
        import datasets

        path = self.split_file(split)
        try:
            data = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise RegMeanError(f"{path}: cannot load ({first})") from None
        missing = {"text", "label"} - set(data.column_names)
        if missing:
            raise RegMeanError(f"{path}: no column {sorted(missing)[0]!r} (columns: {', '.join(data.column_names)})")
        if len(data) == 0:
            raise RegMeanError(f"{path}: empty")
        labels = data.select_columns(["label"]).to_dict()["label"]
        bad = next((i for i, label in enumerate(labels)
                    if not isinstance(label, int) or not 0 <= label < self.num_labels), None)
        if bad is not None:
            raise RegMeanError(f"{path}: line {bad + 1}: label {labels[bad]!r} is not an index into the "
                               f"{self.num_labels} labels of {self.folder / LABELS_FILE}")
        return data.select_columns(["text", "label"])

    def checksum(self) -> str:
        """sha256 over labels.json and both splits: ties a fine-tuned candidate to the data it saw."""
        digest = hashlib.sha256()
        for path in [self.folder / LABELS_FILE] + [self.split_file(split) for split in SPLITS]:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


def load_task(folder: Path | str) -> ClassificationTask:
    """The task in ``folder`` (its name is the folder name); every file is checked to exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegMeanError(f"task {folder}: no such folder")
    labels_path = folder / LABELS_FILE
    try:
        labels = json.loads(labels_path.read_text())["labels"]
    except FileNotFoundError:
        raise RegMeanError(f"task {folder}: no {LABELS_FILE} (label names in index order)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RegMeanError(f"{labels_path}: expected {{\"labels\": [names...]}} ({exc})") from None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise RegMeanError(f"{labels_path}: 'labels' must list at least two label names")
    task = ClassificationTask(folder.name, folder, tuple(labels))
    for split in SPLITS:
        if not task.split_file(split).is_file():
            raise RegMeanError(f"task {folder}: no {split}.jsonl")
    return task


def discover_tasks(root: Path | str) -> list[ClassificationTask]:
    """Every subfolder of ``root`` holding a labels.json, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise RegMeanError(f"tasks folder {root}: no such folder")
    tasks = [load_task(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / LABELS_FILE).exists()]
    if not tasks:
        raise RegMeanError(f"tasks folder {root}: no subfolder holds a {LABELS_FILE}")
    return tasks
