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
from collections.abc import Iterable, Sequence
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


class ShardedCheckpointWriter:
    """A Hugging Face style checkpoint (model.safetensors, or numbered shards plus an index)."""

    def __init__(self, folder: Path | str, specs: Iterable[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.total_size = sum(spec.nbytes for shard in shards for spec in shard)
        self.weight_map = {spec.name: file for file, shard in zip(names, shards) for spec in shard}
        self._files: dict[str, SafetensorsFileWriter] = {}
        try:
            for file, shard in zip(names, shards):
                self._files[file] = SafetensorsFileWriter(self.folder / file, shard)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._files[self.weight_map[name]].write(name, tensor)

    def close(self) -> None:
        for writer in self._files.values():
            writer.close()
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for writer in self._files.values():
            writer.abort()
