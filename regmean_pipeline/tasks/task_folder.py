"""Tasks stored as folders: train.jsonl and test.jsonl, plus the file that says which kind of task it is.

- Sentence classification: ``labels.json`` lists the label names in index order (``{"labels": [...]}``);
  each JSONL line is ``{"text": str, "label": int}``. The splits are read through ``datasets`` (its
  JSON builder), so they come back as ``datasets.Dataset`` objects with ``text`` and ``label`` columns.
- Chat (language modelling): ``task.json`` holds ``{"kind": "chat"}``; each JSONL line is
  ``{"messages": [{"role", "content"}, ...]}``, scored by the loss of the assistant's tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from regmean_pipeline.errors import RegMeanError

SPLITS = ("train", "test")  # every task has them; a score or a candidate is tied to them by checksum
VALIDATION = "validation"  # optional: what `regmean sweep` scores (`regmean finetune --validation-fraction`)
LABELS_FILE = "labels.json"
TASK_FILE = "task.json"


def _split_file(task, split: str) -> Path:
    if split not in (*SPLITS, VALIDATION):
        raise RegMeanError(f"task {task.name}: unknown split {split!r} (splits: {', '.join((*SPLITS, VALIDATION))})")
    path = task.folder / f"{split}.jsonl"
    if split == VALIDATION and not path.is_file():
        raise RegMeanError(f"task {task.name}: no {path.name} in {task.folder}; `regmean finetune "
                           "--validation-fraction F` holds rows out of training and writes one")
    return path


def _checksum(files: list[Path]) -> str:
    """sha256 over the files' names and bytes: ties a score or a fine-tuned candidate to the data it saw."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ChatTask:
    """A chat task, scored by the mean loss (and perplexity) of the assistant's tokens on its test split."""

    name: str
    folder: Path
    kind = "chat"
    metric = "loss"

    def split_file(self, split: str) -> Path:
        return _split_file(self, split)

    def load(self, split: str) -> list:
        """Each line's raw ``messages`` value, in file order (line i + 1 holds item i); their form is
        checked by whoever renders them (regmean_pipeline.measure.chat.check_messages)."""
        path = self.split_file(split)
        values = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise RegMeanError(f"{path}: line {number} is not valid JSON ({exc})") from None
            if not isinstance(row, dict) or "messages" not in row:
                raise RegMeanError(f"{path}: line {number} has no 'messages'")
            values.append(row["messages"])
        if not values:
            raise RegMeanError(f"{path}: empty")
        return values

    def checksum(self) -> str:
        return _checksum([self.folder / TASK_FILE] + [self.split_file(split) for split in SPLITS])


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    folder: Path
    label_names: tuple[str, ...]
    kind = "classification"
    metric = "accuracy"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split_file(self, split: str) -> Path:
        return _split_file(self, split)

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
        return _checksum([self.folder / LABELS_FILE] + [self.split_file(split) for split in SPLITS])


Task = ClassificationTask | ChatTask


def _chat_task(folder: Path) -> ChatTask:
    path = folder / TASK_FILE
    try:
        kind = json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError) as exc:
        raise RegMeanError(f"{path}: expected {{\"kind\": \"chat\"}} ({exc})") from None
    if kind != ChatTask.kind:
        raise RegMeanError(f"{path}: kind {kind!r} is not known (chat; classification tasks have a {LABELS_FILE})")
    return ChatTask(folder.name, folder)


def load_task(folder: Path | str, *, kinds: tuple[str, ...] = ("classification",)) -> Task:
    """The task in ``folder`` (its name is the folder name); every file is checked to exist.

    A ``task.json`` makes it a chat task (when ``kinds`` allows), else ``labels.json`` a classification task.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RegMeanError(f"task {folder}: no such folder")
    if (folder / TASK_FILE).is_file() and ChatTask.kind in kinds:
        task = _chat_task(folder)
        for split in SPLITS:
            if not task.split_file(split).is_file():
                raise RegMeanError(f"task {folder}: no {split}.jsonl")
        return task
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
