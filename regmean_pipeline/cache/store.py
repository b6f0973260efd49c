"""Gram caches on disk: a manifest.json beside a zarr v3 group or one safetensors file.

Each Gram is stored as a sum (not a mean), packed to its upper triangle. Its checksum covers the
gram key, token count, dtype and values, so an edited manifest and a flipped byte are both caught
when the Gram is read.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import math
import posixpath
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from regmean_pipeline.cache.manifest import CHECKPOINT_FIELD, GramEntry, Manifest, read_manifest
from regmean_pipeline.cache.symmetric import pack_upper, packed_length, unpack_upper
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.paths import inside
from regmean_pipeline.io.safetensors_io import DTYPE_NAMES, SafetensorsFileWriter, SafetensorsReader, TensorSpec
from regmean_pipeline.io.storage import Folder

log = logging.getLogger(__name__)

GRAM_FILES = {"zarr": "grams.zarr", "safetensors": "grams.safetensors"}
ZARR_CHUNK_ELEMENTS = 1 << 23  # 32 MiB float32 chunks: few files, reads still partial


def gram_checksum(key: str, tokens: int, packed: np.ndarray) -> str:
    digest = hashlib.sha256(f"{key}\n{tokens}\n{packed.dtype.str}\n{packed.size}\n".encode())
    digest.update(memoryview(np.ascontiguousarray(packed)).cast("B"))
    return "sha256:" + digest.hexdigest()


def write_cache(
    folder: Path | Folder,
    manifest: Manifest,
    sums: Mapping[str, torch.Tensor],
) -> Manifest:
    """Write every Gram of ``sums`` (keys and tokens already in ``manifest.grams``), then the manifest."""
    return write_packed_cache(folder, manifest, lambda key: pack_upper(sums[key]))


def write_packed_cache(
    folder: Path | Folder,
    manifest: Manifest,
    packed_gram: Callable[[str], torch.Tensor | np.ndarray],
) -> Manifest:
    """Write each Gram, packed, as ``packed_gram(key)`` yields it one at a time, then the manifest.

    The manifest goes last: a folder without one is never a cache. On an object store (no rename)
    this order is what keeps a reader from ever accepting half a cache.
    """
    folder = Folder(folder)
    dtype = getattr(torch, manifest.accumulate_dtype)
    specs = [TensorSpec(key, dtype, (packed_length(entry.dim),)) for key, entry in manifest.grams.items()]
    name = GRAM_FILES[manifest.storage]
    if manifest.storage == "safetensors":
        # Written locally at its offsets, then uploaded whole when the folder is remote.
        scratch = tempfile.TemporaryDirectory(prefix="regmean-cache-") if not folder.is_local else None
        path = Path(scratch.name if scratch else folder.path) / name
        sink = SafetensorsFileWriter(path, specs, metadata={"format": "regmean-stats"})
    else:
        import zarr

        group = zarr.open_group(folder.zarr_store(name, writable=True), mode="w-")
    try:
        for spec in specs:
            packed = torch.as_tensor(packed_gram(spec.name)).to("cpu", dtype)
            entry = manifest.grams[spec.name]
            entry.checksum = gram_checksum(spec.name, entry.tokens, packed.numpy())
            if manifest.storage == "safetensors":
                sink.write(spec.name, packed)
            else:
                chunk = min(spec.shape[0], ZARR_CHUNK_ELEMENTS)
                array = group.create_array(spec.name, shape=spec.shape, dtype=packed.numpy().dtype,
                                           chunks=(chunk,), compressors=None, fill_value=0,
                                           config={"write_empty_chunks": True})  # readers count chunks
                array[...] = packed.numpy()
        if manifest.storage == "safetensors":
            sink.close()
            if scratch is not None:
                folder.put_file(path, name)
    except BaseException:
        if manifest.storage == "safetensors":
            sink.abort()
        raise
    finally:
        if manifest.storage == "safetensors" and scratch is not None:
            scratch.cleanup()
    manifest.write(folder)
    return manifest


class GramCache:
    """A finished cache folder (local or an fsspec URL), read lazily one Gram at a time.

    Nothing in the folder is trusted: the manifest is parsed strictly, files may not lead outside
    the folder, and each array's shape, dtype and bytes on disk are checked against the manifest
    before anything is allocated, then its checksum and values after reading.
    """

    def __init__(self, folder: Path | str | Folder, *, checkpoint: bool = False):
        self.folder = Folder(folder)
        self.manifest = read_manifest(self.folder)
        if (CHECKPOINT_FIELD in self.manifest.extra) != checkpoint:
            raise RegMeanError(f"{self.folder}: a checkpoint of an unfinished `regmean stats` run, not a cache; "
                               "finish it with `regmean stats ... --resume`" if not checkpoint
                               else f"{self.folder}: a finished cache, not a checkpoint")
        file = GRAM_FILES[self.manifest.storage]
        if self.folder.is_local:
            inside(self.folder.local_path, file, str(self.folder))
        self.path = self.folder.child(file)
        if not self.folder.exists(file):
            raise RegMeanError(f"{self.path}: missing; the cache in {self.folder} is incomplete")
        self._store = None
        if self.manifest.storage == "zarr":
            _import_zarr_in_background()

    @property
    def name(self) -> str:
        return self.folder.name

    def _open(self, where: str):
        if self._store is None:
            file = GRAM_FILES[self.manifest.storage]
            try:
                if self.manifest.storage == "zarr":
                    import zarr

                    self._store = zarr.open_group(self.folder.zarr_store(file, writable=False), mode="r")
                elif self.folder.is_local:
                    self._store = SafetensorsReader(self.path.local_path)
                else:
                    self._store = SafetensorsReader(str(self.path), functools.partial(self.folder.read_range, file),
                                                    self.folder.size(file))
            except Exception as exc:  # damaged file: say which
                raise RegMeanError(f"{where}: cannot open the file ({_first_line(exc)})") from None
        return self._store

    def read_packed(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The packed Gram sum, after checking shape and dtype against the manifest, then its checksum.

        ``out``, when given (a contiguous array of the packed length and the accumulation dtype), receives
        the values, which are read into it straight from the file: the merge passes its batch buffer."""
        entry: GramEntry = self.manifest.grams[key]
        where = f"{self.path} (gram {key})"
        length = packed_length(entry.dim)
        dtype = np.dtype(self.manifest.accumulate_dtype)
        if out is not None and (out.shape != (length,) or out.dtype != dtype or not out.flags.c_contiguous):
            raise ValueError(f"{where}: out must be a contiguous {dtype}[{length}], got {out.dtype}{list(out.shape)}")
        store = self._open(where)
        try:
            if self.manifest.storage == "zarr":
                if self.folder.is_local:
                    inside(self.path.local_path, key, where)
                array = store[key]
                shape, stored = tuple(array.shape), np.dtype(array.dtype)
            else:
                if key not in store.keys():
                    raise KeyError(key)
                shape, stored = store.shape(key), np.dtype(_NP_DTYPES.get(DTYPE_NAMES[store.dtype(key)], "V"))
        except KeyError:
            raise RegMeanError(f"{where}: array missing") from None
        except RegMeanError:
            raise
        except Exception as exc:
            raise RegMeanError(f"{where}: unreadable ({_first_line(exc)})") from None
        if shape != (length,) or stored != dtype:
            raise RegMeanError(f"{where}: stored as {stored}{list(shape)}, manifest says {dtype}[{length}]")
        if self.manifest.storage == "zarr":
            _check_zarr_chunks(array, self.path.child(key), where)
        values = np.empty(length, dtype) if out is None else out
        try:
            if self.manifest.storage == "zarr":
                _read_plain_chunks(array, self.path.child(key), values)
            else:
                store.read(key, out=torch.from_numpy(values))
        except Exception as exc:
            raise RegMeanError(f"{where}: unreadable ({_first_line(exc)})") from None
        if gram_checksum(key, entry.tokens, values) != entry.checksum:
            raise RegMeanError(f"{where}: checksum mismatch; the cache is damaged or was edited")
        if not np.isfinite(values).all():
            raise RegMeanError(f"{where}: holds NaN or Inf; recompute this candidate's stats")
        return values

    def read(self, key: str) -> torch.Tensor:
        """The full symmetric (d, d) Gram sum."""
        return unpack_upper(torch.from_numpy(self.read_packed(key)), self.manifest.grams[key].dim)


@functools.cache
def _import_zarr_in_background() -> None:
    """Start importing zarr on a thread of its own, once per process: the import takes about 0.25 s on a
    2-core machine, which then overlaps a merge's planning instead of delaying its first Gram read.
    (Python's import lock makes a later ``import zarr`` wait for it, not import twice.)"""
    if "zarr" not in sys.modules:
        threading.Thread(target=importlib.import_module, args=("zarr",), name="regmean-import-zarr",
                         daemon=True).start()


def _check_zarr_chunks(array, folder: Folder, where: str) -> None:
    """Uncompressed chunks, all present as plain files of the full chunk size, before any read.

    This bounds what reading can allocate by what is really on disk: metadata alone (a hostile
    zarr.json with a huge shape and no chunks) cannot make us allocate, and a missing chunk is not
    silently read as zeros.
    """
    if array.compressors or array.filters:
        raise RegMeanError(f"{where}: compressed or filtered chunks; this tool writes plain ones")
    chunk_bytes = math.prod(array.chunks) * array.dtype.itemsize
    found = 0
    for path, info in folder.fs.find(folder.path, withdirs=True, detail=True).items():
        relative = posixpath.relpath(path, folder.path)
        if info.get("islink"):
            raise RegMeanError(f"{where}: {relative} is a link; a cache holds only plain files")
        if info.get("type") != "file" or relative == "zarr.json":
            continue
        if info.get("size") != chunk_bytes:
            raise RegMeanError(f"{where}: chunk {relative} holds {info.get('size')} bytes, not {chunk_bytes}; "
                               "the file is truncated or damaged")
        found += 1
    if found != array.nchunks:
        raise RegMeanError(f"{where}: {found} chunk files on disk where {array.nchunks} belong; chunks are "
                           "missing or foreign")


def _read_plain_chunks(array, folder: Folder, values: np.ndarray) -> None:
    """A 1-D zarr array's values read from its chunk files straight into ``values``.

    ``_check_zarr_chunks`` has made sure that each chunk is a plain file of the full chunk size; with
    the bytes codec as the only codec (what this tool writes), a chunk file is its elements' raw bytes.
    Reading them so skips zarr's event-loop round trip and its intermediate copies (3 to 7x faster on
    a cached file here); an array with any other codec or byte order is read through zarr.
    """
    from zarr.codecs import BytesCodec

    serializer = getattr(array, "serializer", None)
    endian = getattr(getattr(serializer, "endian", None), "value", None)
    if not isinstance(serializer, BytesCodec) or (values.itemsize > 1 and endian != sys.byteorder):
        values[...] = array[...]
        return
    chunk = array.chunks[0]
    raw = memoryview(values).cast("B")
    for index in range(array.nchunks):
        name = array.metadata.encode_chunk_key((index,))
        begin, end = index * chunk * values.itemsize, min((index + 1) * chunk, values.size) * values.itemsize
        if folder.is_local:
            with open(folder.local_path / name, "rb", buffering=0) as file:
                target = raw[begin:end]
                while target:
                    count = file.readinto(target)
                    if not count:
                        raise ValueError(f"chunk {name} ends early")
                    target = target[count:]
        else:
            data = folder.read_range(name, 0, end - begin)
            if len(data) != end - begin:
                raise ValueError(f"chunk {name} ends early")
            raw[begin:end] = data


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


_NP_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "V2"}


class InMemoryGrams:
    """Grams still in memory (the Python API): the same interface the merge reads caches through."""

    def __init__(self, manifest: Manifest, sums: Mapping[str, torch.Tensor]):
        self.manifest, self._sums = manifest, sums

    def read_packed(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        packed = pack_upper(self._sums[key]).cpu().numpy()
        if out is None:
            return packed
        out[...] = packed
        return out
