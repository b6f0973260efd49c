"""Streaming safetensors writing: the header is written first from known shapes, then each tensor
lands at its offset as soon as it is produced, so no writer ever holds a whole file in memory.

The files are ordinary safetensors (read back with ``safetensors.safe_open`` and transformers);
only the order of production is free.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPE_NAMES[torch.float8_e4m3fn] = "F8_E4M3"
    DTYPE_NAMES[torch.float8_e5m2] = "F8_E5M2"
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsFileWriter:
    """One safetensors file whose tensors are all declared up front and written in any order."""

    def __init__(self, path: Path | str, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = {spec.name: spec for spec in specs}
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._offsets: dict[str, int] = {}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes],
            }
            self._offsets[spec.name] = offset
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._data_start = 8 + len(encoded)
        self.size = self._data_start + offset
        self._pending = set(self.specs)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_at(struct.pack("<Q", len(encoded)) + encoded, 0)
        except BaseException:
            os.close(self._fd)
            raise

    def _write_at(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype}{tuple(tensor.shape)}, declared {spec.dtype}{spec.shape}")
        if name not in self._pending:
            raise ValueError(f"{name}: written twice")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._write_at(data, self._data_start + self._offsets[name])
        self._pending.discard(name)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._pending:
                raise ValueError(f"{self.path}: tensors never written: {sorted(self._pending)[:3]}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def shard_layout(specs: Iterable[TensorSpec], max_shard_bytes: int,
                 owner_of: Callable[[str], int] | None = None) -> list[tuple[str, list[TensorSpec], int]]:
    """(file name, tensors, owner) of a Hugging Face checkpoint: each owner's tensors, in order, cut into
    files of at most ``max_shard_bytes`` (a larger tensor gets a file of its own); one file is
    ``model.safetensors``, several are ``model-0000i-of-0000n.safetensors``."""
    by_owner: dict[int, list[TensorSpec]] = {}
    for spec in specs:
        by_owner.setdefault(owner_of(spec.name) if owner_of else 0, []).append(spec)
    shards: list[tuple[list[TensorSpec], int]] = []
    for owner in sorted(by_owner):
        shards.append(([], owner))
        size = 0
        for spec in by_owner[owner]:
            if shards[-1][0] and size + spec.nbytes > max_shard_bytes:
                shards.append(([], owner))
                size = 0
            shards[-1][0].append(spec)
            size += spec.nbytes
    if len(shards) <= 1:
        return [("model.safetensors", shard, owner) for shard, owner in shards] or [("model.safetensors", [], 0)]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", shard, owner)
            for i, (shard, owner) in enumerate(shards)]


class ShardedCheckpointWriter:
    """A Hugging Face style checkpoint (model.safetensors, or numbered shards plus an index).

    Under a layer-parallel merge each rank opens only the files it owns (``owner_of``); the files of
    all ranks together form one checkpoint, whose index rank 0 writes.
    """

    def __init__(self, folder: Path | str, specs: Iterable[TensorSpec], max_shard_bytes: int, *,
                 owner_of: Callable[[str], int] | None = None, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank
        layout = shard_layout(specs, max_shard_bytes, owner_of)
        self.total_size = sum(spec.nbytes for _, shard, _ in layout for spec in shard)
        self.weight_map = {spec.name: file for file, shard, _ in layout for spec in shard}
        self._num_files = len(layout)
        self._files: dict[str, SafetensorsFileWriter] = {}
        try:
            for file, shard, owner in layout:
                if owner == rank:
                    self._files[file] = SafetensorsFileWriter(self.folder / file, shard)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._files[self.weight_map[name]].write(name, tensor)

    def close(self) -> None:
        for writer in self._files.values():
            writer.close()
        if self._num_files > 1 and self.rank == 0:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for writer in self._files.values():
            writer.abort()


MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header


class _TensorInfo:
    def __init__(self, dtype: str, shape: list[int]):
        self._dtype, self._shape = dtype, shape

    def get_dtype(self) -> str:
        return self._dtype

    def get_shape(self) -> list[int]:
        return list(self._shape)


class RangedSafetensorsReader:
    """Lazy reads of a safetensors file on any fsspec filesystem: one ranged read for the header,
    one per tensor (as mergekit's lazy loader does locally), so nothing is downloaded whole.

    Offers the subset of ``safe_open``'s interface the cache reader uses (numpy tensors).
    """

    _NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1"}

    def __init__(self, read_range, size: int, where: str):
        """``read_range(start, stop)`` returns those bytes of the file, whose length is ``size``."""
        self._read_range, self.where = read_range, where
        if size < 8:
            raise ValueError("file too short for a safetensors header")
        (length,) = struct.unpack("<Q", read_range(0, 8))
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {length} is out of range")
        header = json.loads(read_range(8, 8 + length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self._data_start = 8 + length
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= size - self._data_start:
                raise ValueError(f"tensor {name}: data offsets {begin}..{end} lie outside the file")
            self._entries[name] = (entry["dtype"], list(entry["shape"]), begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_slice(self, name: str) -> _TensorInfo:
        dtype, shape, _, _ = self._entries[name]
        return _TensorInfo(dtype, shape)

    def get_tensor(self, name: str):
        import numpy as np

        dtype, shape, begin, end = self._entries[name]
        data = self._read_range(self._data_start + begin, self._data_start + end)
        values = np.frombuffer(bytearray(data), dtype=np.dtype(self._NUMPY[dtype]))  # writable, like safe_open
        if values.size != math.prod(shape):
            raise ValueError(f"tensor {name}: {values.size} values, shape {shape}")
        return values.reshape(shape)
