"""Lazy access to candidate weights, and the fingerprint that ties a Gram cache to them."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.adapters import LoraWeights, is_adapter, read_adapter_config
from regmean_pipeline.io.paths import inside
from regmean_pipeline.io.safetensors_io import DTYPE_NAMES, SafetensorsReader, copy_into

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_FULL_READ_ELEMENTS = 1 << 16
_SAMPLED_ROWS = 16


class WeightSource(Protocol):
    """What the merge needs of a checkpoint: names, shapes and dtypes for free, tensors on demand."""

    reference: str

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor; written into ``out`` (contiguous, of its dtype and shape) and returned, when given."""
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


class SafetensorsCheckpoint:
    """A Hugging Face model folder's safetensors weights (one file or an index of shards), read one
    tensor at a time by positioned reads (no memory map: see ``SafetensorsReader``)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.reference = str(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise RegMeanError(f"{index}: not a valid safetensors index ({exc})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise RegMeanError(f"{index}: 'weight_map' must map tensor names to file names")
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(self.folder.glob("*.safetensors"))]
        if not files:
            raise RegMeanError(f"{self.folder}: no safetensors weights (model.safetensors or an index)")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for file in files:
            # Names from an index are untrusted text; files found by listing the folder are the folder's own.
            path = inside(self.folder, file, f"{index} (shard)") if index.exists() else self.folder / file
            try:
                handle = SafetensorsReader(path)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise RegMeanError(f"{path}: not a readable safetensors file ({exc})") from None
            self._handles[file] = handle
            for name in handle.keys():
                self._file_of[name] = file

    def _handle(self, name: str) -> SafetensorsReader:
        return self._handles[self._file_of[name]]

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._handle(name).dtype(name)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._handle(name).read(name, out=out)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._handle(name).read(name, start, stop)


class StateDictWeights:
    """In-memory weights (the Python API, or a pickle checkpoint the user explicitly allowed).

    Tied tensors (GPT-2's lm_head and wte) appear once, under their first name, as safetensors
    stores them.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], reference: str = "<memory>"):
        self.reference = reference
        self._tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple] = set()
        for name, tensor in state_dict.items():
            identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                        tuple(tensor.shape), tensor.dtype) if tensor.numel() else (name,)
            if identity in seen:
                continue
            seen.add(identity)
            self._tensors[name] = tensor.detach()

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name] if out is None else copy_into(out, self._tensors[name], name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name][start:stop]


def is_hub_id(reference: str) -> bool:
    """Whether a model or dataset reference names a hub repository rather than a local path (the rule
    ``resolve_model_dir`` follows: a path that exists here, or one starting with '.', '/' or '~', is local)."""
    return (not Path(reference).expanduser().exists() and not reference.startswith((".", "/", "~"))
            and _HUB_ID.match(reference) is not None)


def resolve_model_dir(reference: str, *, revision: str | None = None) -> Path:
    """A local folder as is; a hub id through the local Hugging Face cache (downloading if allowed)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise RegMeanError(f"model {reference}: is a file; give the model's folder")
    if not is_hub_id(reference):
        raise RegMeanError(f"model {reference}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(reference, revision=revision,
                                   allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"])
    except Exception as exc:
        raise RegMeanError(f"model {reference}: no such folder, and not available from the hub ({type(exc).__name__})") from None
    return Path(folder)


def adapter_base_dir(folder: Path, base_model: str | None = None) -> Path:
    """The base model folder of a LoRA adapter folder: ``base_model`` when given, else its config's."""
    reference = base_model or read_adapter_config(folder).base_reference
    if reference is None:
        raise RegMeanError(f"{folder}/adapter_config.json: names no base_model_name_or_path; give the base with "
                           "--base-model PATH")
    try:
        base_dir = resolve_model_dir(reference)
    except RegMeanError as exc:
        raise RegMeanError(f"adapter {folder}: its base {exc}; give the base with --base-model PATH") from None
    if is_adapter(base_dir):
        raise RegMeanError(f"adapter {folder}: its base {base_dir} is itself an adapter; give a full checkpoint")
    return base_dir


def split_adapter_reference(reference: str) -> tuple[str, str | None]:
    """mergekit's ``BASE+ADAPTER`` (a LoRA adapter over BASE): (ADAPTER, BASE); any other reference:
    (reference, None). A path that exists as written is never split, so a folder may keep a '+' in its
    name; like mergekit, only a reference with exactly one '+' is split."""
    if Path(reference).expanduser().exists() or reference.count("+") != 1:
        return reference, None
    base, adapter = reference.split("+")
    if not base or not adapter:
        return reference, None
    return adapter, base


def resolve_adapter_reference(reference: str) -> tuple[Path, str | None]:
    """The folder a model reference names and, for ``BASE+ADAPTER``, the base its adapter goes over (to
    pass to ``open_weights`` as ``base_model``). The part after the '+' must be a LoRA adapter folder:
    a full checkpoint there would otherwise be read as is, its BASE silently ignored."""
    target, base = split_adapter_reference(reference)
    folder = resolve_model_dir(target)
    if base is not None and not is_adapter(folder):
        raise RegMeanError(f"model {reference}: {target} is no LoRA adapter folder (no adapter_config.json); "
                           "BASE+ADAPTER takes an adapter after the '+'")
    return folder, base


def open_weights(folder: Path, *, allow_pickle: bool = False, base_model: str | None = None) -> WeightSource:
    """The checkpoint in a model folder; pickle-based files only when the user opted in.

    A LoRA adapter folder is its base (``base_model``, else the one its config names) with the adapter
    applied on every read (``LoraWeights``).
    """
    folder = Path(folder)
    if is_adapter(folder):
        base_dir = adapter_base_dir(folder, base_model)
        return LoraWeights(read_adapter_config(folder), open_weights(base_dir, allow_pickle=allow_pickle), base_dir)
    if any(folder.glob("*.safetensors")):
        return SafetensorsCheckpoint(folder)
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if not pickles:
        raise RegMeanError(f"{folder}: no model weights (*.safetensors) found")
    if not allow_pickle:
        raise RegMeanError(
            f"{folder}: only pickle weights ({pickles[0].name}); loading them can run code. Convert the "
            "model to safetensors, or pass --allow-pickle if you trust its source"
        )
    state: dict[str, torch.Tensor] = {}
    for file in pickles:
        try:  # weights_only: the restricted unpickler that builds tensors and refuses to call anything else
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RegMeanError(f"{file}: refused or unreadable under torch.load(weights_only=True) ({first})") from None
    return StateDictWeights(state, reference=str(folder))


def _samples(source: WeightSource, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    numel = math.prod(shape)
    if numel <= _FULL_READ_ELEMENTS or not shape:
        yield source.get(name)
        return
    length = shape[0]
    width = 1 if len(shape) > 1 else min(4096, length)
    for i in range(_SAMPLED_ROWS):
        start = (length - width) * i // (_SAMPLED_ROWS - 1)
        yield source.rows(name, start, start + width)


def fingerprint(source: WeightSource) -> str:
    """A digest of names, dtypes, shapes and evenly spaced rows of every tensor.

    Cheap (kilobytes per tensor), yet two fine-tunes of one base differ in every sampled row, so
    a cache computed on other weights is caught without reading whole checkpoints.
    """
    digest = hashlib.sha256()
    for name in sorted(source.names()):
        shape, dtype = source.shape(name), source.dtype(name)
        digest.update(f"{name}|{DTYPE_NAMES.get(dtype, str(dtype))}|{list(shape)}\n".encode())
        for sample in _samples(source, name, shape):
            digest.update(memoryview(sample.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()
