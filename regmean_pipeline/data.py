"""Task data for the stats pass: load a file, a saved dataset or a hub id, pick N examples, batch them."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .errors import RegMeanError

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_COLUMNS = ("text", "sentence", "content", "question")
IMAGE_COLUMNS = ("image", "img", "pixel_values")


@dataclass
class DatasetSpec:
    """Everything that decides which examples a stats pass sees; recorded in the manifest."""

    path: str
    split: str = "train"
    text_column: str | None = None
    text_pair_column: str | None = None
    image_column: str | None = None
    num_examples: int = 256
    seed: int = 0
    max_length: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _load_any(spec: DatasetSpec):
    import datasets

    path = Path(spec.path).expanduser()
    try:
        if path.is_file():
            if path.stat().st_size == 0 or (path.stat().st_size < 1 << 20 and not path.read_bytes().strip()):
                raise RegMeanError(f"dataset {path}: empty file")
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise RegMeanError(f"dataset {path}: unsupported file type {path.suffix!r} "
                                   f"(use one of {', '.join(FILE_BUILDERS)})")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            if any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if spec.split not in loaded:
                        raise RegMeanError(f"dataset {path}: no split {spec.split!r} (splits: {', '.join(loaded)})")
                    loaded = loaded[spec.split]
                return loaded
            return datasets.load_dataset(str(path), split=spec.split)
        if spec.path.startswith((".", "/", "~")):
            raise RegMeanError(f"dataset {spec.path}: no such file or folder")
        return datasets.load_dataset(spec.path, split=spec.split)
    except RegMeanError:
        raise
    except Exception as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RegMeanError(f"dataset {spec.path}: cannot load ({first_line})") from None


def load_examples(spec: DatasetSpec, *, images: bool):
    """The first N examples after a seeded shuffle, with the columns checked and chosen."""
    dataset = _load_any(spec)
    columns = list(dataset.column_names)
    if images:
        spec.image_column = _pick_column(spec, "image_column", spec.image_column, IMAGE_COLUMNS, columns)
    else:
        spec.text_column = _pick_column(spec, "text_column", spec.text_column, TEXT_COLUMNS, columns)
        if spec.text_pair_column is not None and spec.text_pair_column not in columns:
            raise RegMeanError(f"dataset {spec.path}: no column {spec.text_pair_column!r} for --text-pair-column "
                               f"(columns: {', '.join(columns)})")
    if len(dataset) == 0:
        raise RegMeanError(f"dataset {spec.path}: empty (split {spec.split!r})")
    if spec.num_examples < 1:
        raise RegMeanError(f"--num-examples: must be at least 1, got {spec.num_examples}")
    count = min(spec.num_examples, len(dataset))
    if count < spec.num_examples:
        log.warning("dataset %s has %d examples; using all of them (asked for %d)", spec.path, count, spec.num_examples)
    return dataset.shuffle(seed=spec.seed).select(range(count))


def _pick_column(spec: DatasetSpec, flag: str, given: str | None, guesses: Iterable[str], columns: list[str]) -> str:
    option = "--" + flag.replace("_", "-")
    if given is not None:
        if given not in columns:
            raise RegMeanError(f"dataset {spec.path}: no column {given!r} for {option} (columns: {', '.join(columns)})")
        return given
    for guess in guesses:
        if guess in columns:
            return guess
    raise RegMeanError(f"dataset {spec.path}: say which column to use with {option} (columns: {', '.join(columns)})")


class TextCollator:
    """Tokenizes a list of rows into one padded batch (picklable, for DataLoader workers)."""

    def __init__(self, tokenizer, spec: DatasetSpec, accepted: set[str], max_length: int):
        self.tokenizer, self.spec, self.accepted, self.max_length = tokenizer, spec, accepted, max_length

    def _texts(self, rows: list[dict], column: str) -> list[str]:
        texts = [row[column] for row in rows]
        for text in texts:
            if not isinstance(text, str):
                raise RegMeanError(f"dataset {self.spec.path}: column {column!r} holds {type(text).__name__} values, not text")
        return texts

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = self._texts(rows, self.spec.text_column)
        pairs = self._texts(rows, self.spec.text_pair_column) if self.spec.text_pair_column else None
        encoded = self.tokenizer(texts, pairs, padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        return {key: value for key, value in encoded.items() if key in self.accepted}


class ImageCollator:
    """Decodes and preprocesses a list of rows into pixel values."""

    def __init__(self, processor, spec: DatasetSpec, accepted: set[str]):
        self.processor, self.spec, self.accepted = processor, spec, accepted

    def _image(self, value):
        from PIL import Image

        try:
            if isinstance(value, dict):  # datasets' undecoded Image feature
                value = value.get("bytes") or value.get("path")
            if isinstance(value, bytes):
                value = Image.open(io.BytesIO(value))
            elif isinstance(value, str):
                value = Image.open(value)
            return value.convert("RGB")
        except Exception as exc:
            raise RegMeanError(f"dataset {self.spec.path}: an image in column {self.spec.image_column!r} "
                               f"cannot be decoded ({exc})") from None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [self._image(row[self.spec.image_column]) for row in rows]
        encoded = self.processor(images=images, return_tensors="pt")
        return {key: value for key, value in encoded.items() if key in self.accepted}


def default_max_length(tokenizer, config) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 1_000_000:
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    return int(limit)


def make_loader(examples, preprocessor, spec: DatasetSpec, *, accepted: set[str], config,
                batch_size: int, num_workers: int = 0) -> DataLoader:
    if batch_size < 1:
        raise RegMeanError(f"--batch-size: must be at least 1, got {batch_size}")
    if spec.image_column is not None:
        collate = ImageCollator(preprocessor, spec, accepted)
    else:
        max_length = spec.max_length or default_max_length(preprocessor, config)
        collate = TextCollator(preprocessor, spec, accepted, max_length)
    return DataLoader(examples, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate, persistent_workers=False)
