"""The one zarr v3 array layout this tool writes, read without zarr: the metadata from zarr.json, the
values straight from the chunk files.

A cache's arrays are 1-D, uncompressed, in regular chunks with the ``bytes`` codec as their only
codec: each chunk file is its elements' raw bytes. For such arrays zarr adds nothing to a read but its
cost: its import (0.17 s after torch's, on the bench's 2-core EPYC, and GIL-bound, so it stalls
whatever else the merge runs meanwhile), an event-loop round trip per array opened, and intermediate
copies. Any other layout (``plain_layout`` returns None for it) is read through zarr itself.
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass

import numpy as np

from regmean_pipeline.cache.manifest import decode_json
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.storage import Folder

METADATA_FILE = "zarr.json"
# A cache's zarr.json is a few hundred bytes; a larger one is not read into memory.
MAX_METADATA_BYTES = 1 << 20
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


@dataclass(frozen=True)
class PlainArray:
    """A 1-D array of ``length`` ``dtype`` values in chunks of ``chunk`` elements, raw bytes on disk."""

    length: int
    dtype: np.dtype
    chunk: int
    separator: str

    @property
    def chunk_bytes(self) -> int:
        return self.chunk * self.dtype.itemsize

    @property
    def nchunks(self) -> int:
        return -(-self.length // self.chunk)

    def chunk_name(self, index: int) -> str:
        """The chunk file's path in the array folder (zarr v3's default chunk key encoding)."""
        return f"c{self.separator}{index}"


def read_metadata(array: Folder, where: str) -> dict:
    """The array's zarr.json as a dict, read and decoded as untrusted (like a manifest); RegMeanError when
    there is none (the array is missing), it is too large, or it is not a JSON object."""
    try:
        size = array.size(METADATA_FILE)
    except FileNotFoundError:
        raise RegMeanError(f"{where}: array missing") from None
    except OSError as exc:
        raise RegMeanError(f"{where}: unreadable {METADATA_FILE} ({exc})") from None
    if size > MAX_METADATA_BYTES:
        raise RegMeanError(f"{where}: {METADATA_FILE} holds {size} bytes; not a cache's array")
    try:
        raw = array.read_range(METADATA_FILE, 0, size)
    except OSError as exc:
        raise RegMeanError(f"{where}: unreadable {METADATA_FILE} ({exc})") from None
    metadata = decode_json(raw, f"{where}: unreadable {METADATA_FILE}")
    if not isinstance(metadata, dict):
        raise RegMeanError(f"{where}: {METADATA_FILE} is not a JSON object")
    return metadata


def plain_layout(metadata: dict) -> PlainArray | None:
    """The layout of a zarr v3 array's metadata when it is the plain one described above, else None."""
    shape, grid, keys = metadata.get("shape"), metadata.get("chunk_grid"), metadata.get("chunk_key_encoding")
    if metadata.get("zarr_format") != 3 or metadata.get("node_type") != "array" or metadata.get("storage_transformers"):
        return None
    if not (isinstance(shape, list) and len(shape) == 1 and _count(shape[0]) and isinstance(grid, dict)
            and grid.get("name") == "regular" and isinstance(keys, dict) and keys.get("name") == "default"):
        return None
    chunks = (grid.get("configuration") or {}).get("chunk_shape")
    separator = (keys.get("configuration") or {}).get("separator", "/")
    dtype = DTYPES.get(metadata.get("data_type")) if isinstance(metadata.get("data_type"), str) else None
    if not (isinstance(chunks, list) and len(chunks) == 1 and _count(chunks[0]) and chunks[0] > 0
            and separator in ("/", ".") and dtype is not None):
        return None
    codecs = metadata.get("codecs")
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)
            and codecs[0].get("name") == "bytes"
            and (codecs[0].get("configuration") or {}).get("endian") == sys.byteorder):
        return None
    return PlainArray(shape[0], np.dtype(dtype), chunks[0], separator)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_chunk_files(array: Folder, chunk_bytes: int, nchunks: int, where: str) -> None:
    """Every chunk present as a plain file of the full chunk size, and nothing else, before any read.

    This bounds what reading can allocate by what is really on disk: metadata alone (a hostile
    zarr.json with a huge shape and no chunks) cannot make us allocate, and a missing chunk is not
    silently read as zeros.
    """
    found = 0
    for path, info in array.fs.find(array.path, withdirs=True, detail=True).items():
        relative = posixpath.relpath(path, array.path)
        if info.get("islink"):
            raise RegMeanError(f"{where}: {relative} is a link; a cache holds only plain files")
        if info.get("type") != "file" or relative == METADATA_FILE:
            continue
        if info.get("size") != chunk_bytes:
            raise RegMeanError(f"{where}: chunk {relative} holds {info.get('size')} bytes, not {chunk_bytes}; "
                               "the file is truncated or damaged")
        found += 1
    if found != nchunks:
        raise RegMeanError(f"{where}: {found} chunk files on disk where {nchunks} belong; chunks are "
                           "missing or foreign")


def read_chunks(layout: PlainArray, array: Folder, values: np.ndarray) -> None:
    """The array's values read from its chunk files straight into ``values`` (of ``layout.length``
    elements), after ``check_chunk_files`` has made sure each is a plain file of the full chunk size."""
    raw = memoryview(values).cast("B")
    itemsize = values.itemsize
    for index in range(layout.nchunks):
        name = layout.chunk_name(index)
        begin, end = index * layout.chunk * itemsize, min((index + 1) * layout.chunk, layout.length) * itemsize
        if array.is_local:
            with open(array.local_path / name, "rb", buffering=0) as file:
                target = raw[begin:end]
                while target:
                    count = file.readinto(target)
                    if not count:
                        raise ValueError(f"chunk {name} ends early")
                    target = target[count:]
        else:
            data = array.read_range(name, 0, end - begin)
            if len(data) != end - begin:
                raise ValueError(f"chunk {name} ends early")
            raw[begin:end] = data

