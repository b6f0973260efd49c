"""Task data for the stats pass: load a file, a saved dataset or a hub id, pick N examples, batch them."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from regmean_pipeline.errors import RegMeanError

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_COLUMNS = ("text", "sentence", "content", "question")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
COUNT_PREFIX = "_regmean_count_"  # batch keys that carry the collators' counts, not model inputs
COUNT_MEANINGS = {
    "skipped_empty": "examples skipped: empty or missing text",
    "skipped_undecodable": "examples skipped: image cannot be decoded",
    "truncated": "examples truncated to max_length tokens",
}


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
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its load errors are reported below, once
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
        bad_line = first_bad_line(path) if path.is_file() else None
        if bad_line:
            raise RegMeanError(f"dataset {path}: {bad_line}") from None
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RegMeanError(f"dataset {spec.path}: cannot load ({first_line})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def first_bad_line(path: Path) -> str | None:
    """Why a text data file failed to load, by line: invalid UTF-8, or (JSON Lines) invalid JSON.

    Only run once loading has failed, so the happy path never reads a file twice.
    """
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder not in ("json", "csv", "text"):
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                line = decoder.decode(raw)
            except UnicodeDecodeError as exc:
                return f"line {number} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            if path.suffix.lower() == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
                except ValueError as exc:
                    return f"line {number} is not valid JSON ({exc})"
    return None


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
    examples = dataset.shuffle(seed=spec.seed).select(range(count))
    if images:
        import datasets

        if isinstance(examples.features.get(spec.image_column), datasets.Image):
            # Decoded by the collator, which can skip an undecodable image instead of crashing the loader.
            examples = examples.cast_column(spec.image_column, datasets.Image(decode=False))
    _check_readable(examples, spec)
    return examples


def used_columns(spec: DatasetSpec) -> list[str]:
    return [c for c in (spec.text_column, spec.text_pair_column, spec.image_column) if c is not None]


def _check_readable(examples, spec: DatasetSpec) -> None:
    """Read the selected rows once: Arrow loads invalid UTF-8 without complaint and fails only when a
    row is read, which would otherwise be in the middle of a run."""
    try:
        for _ in examples.select_columns(used_columns(spec)).iter(batch_size=1024):
            pass
    except Exception as exc:
        path = Path(spec.path).expanduser()
        problem = (first_bad_line(path) if path.is_file() else None) or f"holds unreadable values ({exc})"
        raise RegMeanError(f"dataset {spec.path}: {problem}") from None


def examples_digest(examples, spec: DatasetSpec) -> str:
    """sha256 of the columns a stats run reads, over the selected examples in order: what a resume
    must see again for its result to equal an uninterrupted run's."""
    columns = used_columns(spec)
    digest = hashlib.sha256(json.dumps(columns).encode())
    for row in examples.select_columns(columns):
        for column in columns:
            value = row[column]
            if isinstance(value, Mapping):  # an undecoded image: its bytes, else its path
                value = value.get("bytes") or value.get("path")
            data = value if isinstance(value, bytes) else repr(value).encode()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return "sha256:" + digest.hexdigest()


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


def _counts(**counts: int) -> dict[str, torch.Tensor]:
    return {COUNT_PREFIX + name: torch.tensor(count) for name, count in counts.items() if count}


class TextCollator:
    """Tokenizes a list of rows into one padded batch (picklable, for DataLoader workers).

    Rows whose text is missing or blank are skipped (they hold no input to measure); rows longer than
    ``max_length`` tokens are truncated. Both are counted, and the counts travel in the batch.
    """

    def __init__(self, tokenizer, spec: DatasetSpec, accepted: set[str], max_length: int):
        self.tokenizer, self.spec, self.accepted, self.max_length = tokenizer, spec, accepted, max_length

    def _usable(self, row: dict) -> bool:
        for column in filter(None, (self.spec.text_column, self.spec.text_pair_column)):
            text = row[column]
            if text is not None and not isinstance(text, str):
                raise RegMeanError(f"dataset {self.spec.path}: column {column!r} holds {type(text).__name__} values, not text")
            if text is None or not text.strip():
                return False
        return True

    def _encode(self, rows: list[dict], max_length: int, **kwargs):
        texts = [row[self.spec.text_column] for row in rows]
        pairs = [row[self.spec.text_pair_column] for row in rows] if self.spec.text_pair_column else None
        return self.tokenizer(texts, pairs, truncation=True, max_length=max_length, **kwargs)

    def _truncated(self, rows: list[dict], lengths: list[int]) -> int:
        """Rows that filled max_length: encoded again one token longer, they show whether text was cut."""
        full = [row for row, length in zip(rows, lengths) if length >= self.max_length]
        if not full:
            return 0
        return sum(len(ids) > self.max_length for ids in self._encode(full, self.max_length + 1)["input_ids"])

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        kept = [row for row in rows if self._usable(row)]
        if not kept:
            return _counts(skipped_empty=len(rows))
        encoded = self._encode(kept, self.max_length, padding="longest", return_tensors="pt")
        mask = encoded.get("attention_mask")
        lengths = mask.sum(1).tolist() if mask is not None else [encoded["input_ids"].shape[1]] * len(kept)
        batch = {key: value for key, value in encoded.items() if key in self.accepted}
        return {**batch, **_counts(skipped_empty=len(rows) - len(kept), truncated=self._truncated(kept, lengths))}

    def lengths(self, rows: list[dict]) -> list[int]:
        """Tokens per row once truncated, without padding (0 for the empty rows batches leave out)."""
        usable = [self._usable(row) for row in rows]
        kept = iter(self._encode([r for r, u in zip(rows, usable) if u], self.max_length)["input_ids"]) \
            if any(usable) else iter(())
        return [len(next(kept)) if u else 0 for u in usable]


def longest_first(examples, collate: TextCollator, chunk: int = 1024) -> list[int]:
    """Indices of the examples, longest first, so each batch holds similar lengths and little padding.

    The same examples are used, only in another order (Gram sums do not depend on it, up to
    rounding); the longest batch comes first, so running out of memory shows at once.
    """
    lengths: list[int] = []
    for start in range(0, len(examples), chunk):
        lengths += collate.lengths([examples[i] for i in range(start, min(start + chunk, len(examples)))])
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class ImageCollator:
    """Decodes and preprocesses a list of rows into pixel values; undecodable images are skipped, counted."""

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
            log.debug("dataset %s: an image in column %r cannot be decoded (%s)", self.spec.path,
                      self.spec.image_column, exc)
            return None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [image for row in rows if (image := self._image(row[self.spec.image_column])) is not None]
        if not images:
            return _counts(skipped_undecodable=len(rows))
        encoded = self.processor(images=images, return_tensors="pt")
        batch = {key: value for key, value in encoded.items() if key in self.accepted}
        return {**batch, **_counts(skipped_undecodable=len(rows) - len(images))}


class Batches:
    """A loader's batches with the collators' counts taken out (and added up), and a count of the loader
    batches consumed, which is the position a resumed run restarts from."""

    def __init__(self, loader: DataLoader, *, consumed: int = 0, counts: Mapping[str, int] | None = None):
        self.loader = loader
        self._start, self._start_counts = consumed, dict(counts or {})
        self.consumed = consumed
        self.counts: Counter[str] = Counter(self._start_counts)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Each pass (a multi-pass run reads the data once per group of layers) counts afresh.
        self.consumed, self.counts = self._start, Counter(self._start_counts)
        for batch in self.loader:
            self.consumed += 1
            for key in [key for key in batch if key.startswith(COUNT_PREFIX)]:
                self.counts[key[len(COUNT_PREFIX):]] += int(batch.pop(key))
            if batch:
                yield batch

    def log_counts(self, where: str) -> None:
        for name, count in sorted(self.counts.items()):
            if count:
                log.warning("%s: %d %s", where, count, COUNT_MEANINGS.get(name, name))


def default_max_length(tokenizer, config) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 1_000_000:
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    return int(limit)


def make_loader(examples, preprocessor, spec: DatasetSpec, *, accepted: set[str], config,
                batch_size: int, num_workers: int = 0, skip_batches: int = 0,
                counts: Mapping[str, int] | None = None) -> Batches:
    """Batches in a fixed order; ``skip_batches`` leaves out the first ones (done before a resume)."""
    if batch_size < 1:
        raise RegMeanError(f"--batch-size: must be at least 1, got {batch_size}")
    order = None
    if spec.image_column is not None:
        collate = ImageCollator(preprocessor, spec, accepted)
    else:
        max_length = spec.max_length or default_max_length(preprocessor, config)
        collate = TextCollator(preprocessor, spec, accepted, max_length)
        order = longest_first(examples, collate)
    order = (order or list(range(len(examples))))[skip_batches * batch_size:]
    loader = DataLoader(examples, batch_size=batch_size, sampler=order, num_workers=num_workers,
                        collate_fn=collate, persistent_workers=False)
    return Batches(loader, consumed=skip_batches, counts=counts)
