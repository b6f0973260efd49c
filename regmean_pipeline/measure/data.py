"""Task data for the stats pass: load a file, a saved dataset or a hub id, pick N examples, batch them."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.chat import ChatEncoder, check_messages
from regmean_pipeline.measure.gram import ROW_MASK_KEY

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
TOKEN_MODES = ("all", "response")  # which real tokens count: every one (RegMean), or the assistant's only
ROW_INDEX = "_regmean_row"  # the example's row in the file, carried so a bad row can be named by its line
VISION_INSTALL = "pip install 'regmean-pipeline[vision]'"  # Pillow is an extra: text-only installs go without


def require_pillow(where: str = "--image-column") -> None:
    """Image tasks decode their images with Pillow: without it, one line says so before any work is done."""
    try:
        from PIL import Image  # noqa: F401
    except ImportError:
        raise RegMeanError(f"{where}: image tasks need Pillow ({VISION_INSTALL})") from None


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
    messages_column: str | None = None  # chat data: a list of {"role", "content"} per example
    prompt_columns: list[str] = field(default_factory=list)  # Alpaca-style: joined into the user's message
    response_column: str | None = None  # ... and the assistant's
    system_column: str | None = None
    target_column: str | None = None  # encoder-decoders: the decoder's labels
    tokens: str = "all"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, dataset: str, options: object) -> DatasetSpec:
        """The spec of ``dataset`` from the data options of a stage (`regmean stats`', or merge's for RegMean++,
        which share their names; one it lacks keeps its default). A local path is made absolute, so that
        manifests and checkpoints name it wherever the run was started."""
        path = Path(dataset).expanduser()
        chosen = {f.name: getattr(options, f.name) for f in fields(cls) if f.name != "path" and hasattr(options, f.name)}
        chosen["prompt_columns"] = list(chosen.get("prompt_columns", ()))
        return cls(str(path.resolve()) if path.exists() else dataset, **chosen)

    @property
    def is_chat(self) -> bool:
        return self.messages_column is not None or self.response_column is not None


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
    if images:
        require_pillow()
    dataset = _load_any(spec)
    columns = list(dataset.column_names)
    _check_token_mode(spec)
    if images:
        spec.image_column = _pick_column(spec, "image_column", spec.image_column, IMAGE_COLUMNS, columns)
    elif spec.is_chat:
        _check_chat_columns(spec, columns)
    else:
        spec.text_column = _pick_column(spec, "text_column", spec.text_column, TEXT_COLUMNS, columns)
        for flag, column in (("--text-pair-column", spec.text_pair_column), ("--target-column", spec.target_column)):
            _check_column(spec, flag, column, columns)
    if len(dataset) == 0:
        raise RegMeanError(f"dataset {spec.path}: empty (split {spec.split!r})")
    if spec.num_examples < 1:
        raise RegMeanError(f"--num-examples: must be at least 1, got {spec.num_examples}")
    count = min(spec.num_examples, len(dataset))
    if count < spec.num_examples:
        log.warning("dataset %s has %d examples; using all of them (asked for %d)", spec.path, count, spec.num_examples)
    if spec.is_chat:  # the shuffle depends on the seed and the length only, so the selection is unchanged
        dataset = dataset.add_column(ROW_INDEX, list(range(len(dataset))))
    examples = dataset.shuffle(seed=spec.seed).select(range(count))
    if images:
        import datasets

        if isinstance(examples.features.get(spec.image_column), datasets.Image):
            # Decoded by the collator, which can skip an undecodable image instead of crashing the loader.
            examples = examples.cast_column(spec.image_column, datasets.Image(decode=False))
    _check_readable(examples, spec)
    if spec.is_chat:
        for row in examples.select_columns(used_columns(spec) + [ROW_INDEX]):
            conversation_of(row, spec)
    return examples


def used_columns(spec: DatasetSpec) -> list[str]:
    columns = (spec.text_column, spec.text_pair_column, spec.image_column, spec.messages_column, *spec.prompt_columns,
               spec.response_column, spec.system_column, spec.target_column)
    return [c for c in columns if c is not None]


def _check_token_mode(spec: DatasetSpec) -> None:
    if spec.tokens not in TOKEN_MODES:
        raise RegMeanError(f"--tokens: {spec.tokens!r} is not one of {', '.join(TOKEN_MODES)}")
    if spec.tokens == "response" and not spec.is_chat:
        raise RegMeanError("--tokens response: needs chat data (--messages-column, or --prompt-column and "
                           "--response-column) to know which tokens are the assistant's")


def _check_column(spec: DatasetSpec, flag: str, column: str | None, columns: list[str]) -> None:
    if column is not None and column not in columns:
        raise RegMeanError(f"dataset {spec.path}: no column {column!r} for {flag} (columns: {', '.join(columns)})")


def _check_chat_columns(spec: DatasetSpec, columns: list[str]) -> None:
    if spec.messages_column is not None and (spec.prompt_columns or spec.response_column or spec.system_column):
        raise RegMeanError("--messages-column: give it, or --prompt-column/--response-column/--system-column, not both")
    if spec.response_column is not None and not spec.prompt_columns:
        raise RegMeanError("--response-column: needs --prompt-column (the user's side of each example)")
    if spec.text_column is not None or spec.text_pair_column is not None:
        raise RegMeanError("--text-column/--text-pair-column: not with chat data (--messages-column or "
                           "--prompt-column/--response-column)")
    if spec.target_column is not None:
        raise RegMeanError("--target-column: not with chat data; the assistant's response is the target")
    for flag, column in (("--messages-column", spec.messages_column), ("--response-column", spec.response_column),
                         ("--system-column", spec.system_column), *(("--prompt-column", c) for c in spec.prompt_columns)):
        _check_column(spec, flag, column, columns)


def row_place(spec: DatasetSpec, row: Mapping) -> str:
    """Where an example is in its data, for messages: the line of a JSON Lines file, else the row."""
    index = row.get(ROW_INDEX)
    if index is None:
        return f"dataset {spec.path}"
    if Path(spec.path).suffix.lower() == ".jsonl":
        return f"dataset {spec.path}: line {index + 1}"
    return f"dataset {spec.path}: row {index}"


def _text_or_none(spec: DatasetSpec, row: Mapping, column: str) -> str | None:
    value = row[column]
    if value is not None and not isinstance(value, str):
        raise RegMeanError(f"{row_place(spec, row)}: column {column!r} holds {type(value).__name__}, not text")
    return value if value is not None and value.strip() else None


def conversation_of(row: Mapping, spec: DatasetSpec) -> list[dict] | None:
    """The example as messages (Alpaca-style columns mapped to system/user/assistant); None when empty."""
    if spec.messages_column is not None:
        value = row[spec.messages_column]
        return check_messages(value, row_place(spec, row)) or None if value is not None else None
    prompt = "\n\n".join(text for column in spec.prompt_columns if (text := _text_or_none(spec, row, column)))
    response = _text_or_none(spec, row, spec.response_column)
    if not prompt or response is None:
        return None
    system = _text_or_none(spec, row, spec.system_column) if spec.system_column else None
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


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


def longest_first(examples, collate: TextCollator | SequenceCollator, chunk: int = 1024) -> list[int]:
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
        require_pillow(f"dataset {spec.path}: image column {spec.image_column!r}")
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


@dataclass
class _Sequences:
    """One example as token ids: the model's input, the tokens that count (None: all real ones), and an
    encoder-decoder's target."""

    ids: list[int]
    counted: list[int] | None = None
    target: list[int] | None = None

    def truncated(self, max_length: int) -> tuple[_Sequences, bool]:
        cut = len(self.ids) > max_length or (self.target is not None and len(self.target) > max_length)
        counted = self.counted[:max_length] if self.counted is not None else None
        return _Sequences(self.ids[:max_length], counted, self.target[:max_length] if self.target else None), cut


def right_padded(rows: list[list[int]], value: int) -> torch.Tensor:
    """Token rows of unequal length as one (rows, longest) tensor, ``value`` after each row's end."""
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


class SequenceCollator:
    """Chat data, or an encoder-decoder's source and target, as one right-padded batch.

    Decoder-only models see each conversation rendered by the chat template; with ``tokens ==
    "response"`` the batch also carries ``ROW_MASK_KEY``, the assistant's tokens, which the Gram hooks
    count instead of the attention mask (never a model input). Encoder-decoders get the prompt as the
    encoder's input and the response (or ``target_column``) as the decoder's labels, so the decoder's and
    cross-attention's layers see what they see in training.
    """

    def __init__(self, tokenizer, spec: DatasetSpec, accepted: set[str], max_length: int, *, encoder_decoder: bool):
        self.tokenizer, self.spec, self.accepted, self.max_length = tokenizer, spec, accepted, max_length
        self.encoder_decoder = encoder_decoder
        if encoder_decoder and spec.tokens == "response":
            raise RegMeanError("--tokens response: for decoder-only models; an encoder-decoder's decoder already "
                               "sees only the response, and its encoder only the prompt")
        if encoder_decoder and "labels" not in accepted:
            raise RegMeanError("the model's forward takes no labels, so its decoder cannot be fed the targets; "
                               "load it with its generation head (config.architectures)")
        if not encoder_decoder and spec.target_column is not None:
            raise RegMeanError("--target-column: for encoder-decoder models (T5); a decoder-only model reads chat "
                               "data with --messages-column or --prompt-column/--response-column")
        self.chat = ChatEncoder(tokenizer) if spec.messages_column or (spec.is_chat and not encoder_decoder) else None

    def _text_ids(self, texts: list[str], pairs: list[str] | None = None) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, pairs)["input_ids"]]

    def _sequences(self, rows: list[dict]) -> list[_Sequences | None]:
        """Each row's token ids before truncation (None for an empty row)."""
        spec = self.spec
        if not spec.is_chat:  # an encoder-decoder's text and target columns
            kept = [i for i, row in enumerate(rows) if all(_text_or_none(spec, row, c) for c in used_columns(spec))]
            sources = self._text_ids([rows[i][spec.text_column] for i in kept],
                                     [rows[i][spec.text_pair_column] for i in kept] if spec.text_pair_column else None)
            targets = self._text_ids([rows[i][spec.target_column] for i in kept])
            found = {i: _Sequences(source, target=target) for i, source, target in zip(kept, sources, targets)}
            return [found.get(i) for i in range(len(rows))]
        conversations = [conversation_of(row, spec) for row in rows]
        kept = [i for i, conversation in enumerate(conversations) if conversation]
        if not self.encoder_decoder:
            encoded = self.chat.encode([conversations[i] for i in kept])
            counted = spec.tokens == "response"
            found = {i: _Sequences(e.ids, e.response if counted else None) for i, e in zip(kept, encoded)}
        elif self.chat is not None:
            parts = [self.chat.split_last_response(conversations[i], row_place(spec, rows[i])) for i in kept]
            targets = self._text_ids([target for _, target in parts])
            found = {i: _Sequences(source, target=target) for i, (source, _), target in zip(kept, parts, targets)}
        else:  # prompt/response columns: the encoder reads the prompt as plain text, as T5 was trained
            prompts = [(m[0]["content"] + "\n\n" if len(m) == 3 else "") + m[-2]["content"]
                       for m in (conversations[i] for i in kept)]
            sources = self._text_ids(prompts)
            targets = self._text_ids([conversations[i][-1]["content"] for i in kept])
            found = {i: _Sequences(source, target=target) for i, source, target in zip(kept, sources, targets)}
        return [found.get(i) for i in range(len(rows))]

    def _truncated(self, rows: list[dict]) -> tuple[list[_Sequences], int, int]:
        """The usable rows' sequences cut to max_length, and how many rows were empty and cut."""
        sequences = [s for s in self._sequences(rows) if s is not None]
        cut = [s.truncated(self.max_length) for s in sequences]
        return [s for s, _ in cut], len(rows) - len(sequences), sum(was_cut for _, was_cut in cut)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences, empty, truncated = self._truncated(rows)
        if not sequences:
            return _counts(skipped_empty=empty)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = [s.ids for s in sequences]
        batch = {"input_ids": right_padded(ids, pad), "attention_mask": right_padded([[1] * len(i) for i in ids], 0)}
        if self.encoder_decoder:
            targets = [s.target for s in sequences]
            batch["labels"] = right_padded(targets, -100)
            batch["decoder_attention_mask"] = right_padded([[1] * len(t) for t in targets], 0)
        batch = {key: value for key, value in batch.items() if key in self.accepted}
        if sequences[0].counted is not None:
            batch[ROW_MASK_KEY] = right_padded([s.counted for s in sequences], 0).bool()
        return {**batch, **_counts(skipped_empty=empty, truncated=truncated)}

    def lengths(self, rows: list[dict]) -> list[int]:
        """Tokens per row once truncated (source and target together), 0 for empty rows."""
        lengths = []
        for sequence in self._sequences(rows):
            if sequence is None:
                lengths.append(0)
                continue
            cut, _ = sequence.truncated(self.max_length)
            lengths.append(len(cut.ids) + len(cut.target or ()))
        return lengths


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
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if spec.image_column is not None:
        collate = ImageCollator(preprocessor, spec, accepted)
    else:
        max_length = spec.max_length or default_max_length(preprocessor, config)
        if spec.is_chat or spec.target_column is not None or encoder_decoder:
            if encoder_decoder and not spec.is_chat and spec.target_column is None:
                raise RegMeanError("an encoder-decoder model (T5) needs its decoder fed: give --target-column, or chat "
                                   "data (--messages-column, or --prompt-column and --response-column)")
            collate = SequenceCollator(preprocessor, spec, accepted, max_length, encoder_decoder=encoder_decoder)
        else:
            collate = TextCollator(preprocessor, spec, accepted, max_length)
        order = longest_first(examples, collate)
    order = (order or list(range(len(examples))))[skip_batches * batch_size:]
    loader = DataLoader(examples, batch_size=batch_size, sampler=order, num_workers=num_workers,
                        collate_fn=collate, persistent_workers=False)
    return Batches(loader, consumed=skip_batches, counts=counts)
