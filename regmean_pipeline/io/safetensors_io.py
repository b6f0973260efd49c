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
import weakref
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
        return math.prod(self.shape) * self.dtype.itemsize


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


def copy_into(out: torch.Tensor, tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``out`` filled with ``tensor``: a source's ``get(name, out=...)`` when its values are not read from a file."""
    if out.shape != tensor.shape or out.dtype != tensor.dtype:
        raise ValueError(f"tensor {name}: out is {out.dtype}{list(out.shape)}, the tensor {tensor.dtype}{list(tensor.shape)}")
    return out.copy_(tensor)


MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header


class SafetensorsReader:
    """Tensors, or row ranges of them, read from a safetensors file by positioned reads straight into
    the returned tensor's memory.

    ``safetensors.safe_open`` memory-maps the file instead: every page a merge touches then stays
    mapped into the process, counted in its RSS, until the file is closed, so reading K checkpoints
    through it makes a streaming merge's RSS grow with the model. Positioned reads leave the bytes in
    the page cache only. A file on another filesystem (fsspec) is read the same way through
    ``read_range(start, stop) -> bytes`` and its ``size``: one ranged read for the header, one per
    tensor, so nothing is downloaded whole.
    """

    def __init__(self, path: Path | str, read_range: Callable[[int, int], bytes] | None = None,
                 size: int | None = None):
        self.path = Path(path)
        self._fd = -1
        if read_range is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)
            self._read_into, size = self._pread_into, os.fstat(self._fd).st_size
        else:
            def read_into(buffer: memoryview, offset: int) -> None:
                data = read_range(offset, offset + len(buffer))
                if len(data) != len(buffer):
                    raise ValueError(f"{self.path}: file ends early")
                buffer[:] = data

            self._read_into = read_into
        if size < 8:
            raise ValueError("file too short for a safetensors header")
        (length,) = struct.unpack("<Q", self._read_bytes(8, 0))
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {length} is out of range")
        header = json.loads(self._read_bytes(length, 8))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + length
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            dtype = DTYPES_BY_NAME.get(entry.get("dtype")) if isinstance(entry, dict) else None
            if dtype is None:
                raise ValueError(f"tensor {name}: unknown dtype or malformed entry")
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
            if end - begin != TensorSpec(name, dtype, shape).nbytes or not 0 <= begin <= end <= size - data_start:
                raise ValueError(f"tensor {name}: data offsets {begin}..{end} do not fit its shape or the file")
            self._entries[name] = (dtype, shape, data_start + begin)

    def _pread_into(self, buffer: memoryview, offset: int) -> None:
        while buffer:
            done = os.preadv(self._fd, [buffer], offset)
            if done == 0:
                raise ValueError(f"{self.path}: file ends early")
            buffer, offset = buffer[done:], offset + done

    def _read_bytes(self, count: int, offset: int) -> bytes:
        buffer = bytearray(count)
        self._read_into(memoryview(buffer), offset)
        return bytes(buffer)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def read(self, name: str, start: int | None = None, stop: int | None = None, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or rows start:stop of it (along the first dimension); into ``out`` (a contiguous CPU
        tensor of the same dtype and number of elements) when given."""
        dtype, shape, offset = self._entries[name]
        if start is not None or stop is not None:
            start, stop, _ = slice(start, stop).indices(shape[0])
            stop = max(start, stop)
            offset += start * TensorSpec(name, dtype, shape[1:]).nbytes
            shape = (stop - start, *shape[1:])
        if out is None:
            tensor = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or out.numel() != math.prod(shape) or not out.is_contiguous() or out.is_cuda:
            raise ValueError(f"tensor {name}: out is {out.dtype}{list(out.shape)}, the file holds {dtype}{list(shape)}")
        else:
            tensor = out
        if tensor.numel():
            self._read_into(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), offset)
        return tensor
