"""Statistics caches on disk: a manifest.json beside one zarr v3 group or one safetensors file per
statistic (grams.zarr, fisher.zarr, ...).

Every array is stored as a flat sum (not a mean); a Gram packed to its upper triangle. Its checksum
covers the key, the count, the dtype and the values, so an edited manifest and a flipped byte are both
caught when the array is read.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import posixpath
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from regmean_pipeline.cache.manifest import CHECKPOINT_FIELD, Manifest, read_manifest
from regmean_pipeline.cache.statistics import GRAM, STATISTICS
from regmean_pipeline.cache.symmetric import pack_upper, unpack_upper
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.paths import inside
from regmean_pipeline.io.safetensors_io import DTYPE_NAMES, SafetensorsFileWriter, SafetensorsReader, TensorSpec
from regmean_pipeline.io.storage import Folder

log = logging.getLogger(__name__)

STORAGE_SUFFIXES = {"zarr": ".zarr", "safetensors": ".safetensors"}
ZARR_CHUNK_ELEMENTS = 1 << 23  # 32 MiB float32 chunks: few files, reads still partial
ZARR_METADATA = "zarr.json"
MAX_ZARR_METADATA_BYTES = 1 << 20  # a cache's zarr.json is a few hundred bytes; a larger one is not opened

# An array as a writer takes it: the flat stored values of one key of one statistic.
StoredArray = Callable[[str], "torch.Tensor | np.ndarray"]


def statistic_file(statistic: str, storage: str) -> str:
    return STATISTICS[statistic].file_stem + STORAGE_SUFFIXES[storage]


def array_checksum(key: str, count: int, values: np.ndarray) -> str:
    digest = hashlib.sha256(f"{key}\n{count}\n{values.dtype.str}\n{values.size}\n".encode())
    digest.update(memoryview(np.ascontiguousarray(values)).cast("B"))
    return "sha256:" + digest.hexdigest()


def write_cache(folder: Path | Folder, manifest: Manifest, sums: Mapping[str, torch.Tensor],
                fisher: Mapping[str, torch.Tensor] | None = None) -> Manifest:
    """Write every Gram of ``sums`` (packed) and every Fisher array of ``fisher`` (keys and counts already
    in the manifest), then the manifest."""
    arrays = {GRAM.name: lambda key: pack_upper(sums[key])}
    if fisher is not None:
        arrays["fisher"] = lambda key: fisher[key].reshape(-1)
    return write_arrays(folder, manifest, arrays)


def write_arrays(folder: Path | Folder, manifest: Manifest, arrays: Mapping[str, StoredArray]) -> Manifest:
    """Write each statistic's arrays as ``arrays[statistic](key)`` yields them, one at a time, then the
    manifest, whose checksums this fills in.

    The manifest goes last: a folder without one is never a cache. On an object store (no rename)
    this order is what keeps a reader from ever accepting half a cache.
    """
    folder = Folder(folder)
    for statistic in manifest.statistics:
        _write_statistic(folder, manifest, statistic, arrays[statistic])
    manifest.write(folder)
    return manifest


def _write_statistic(folder: Folder, manifest: Manifest, statistic: str, stored: StoredArray) -> None:
    dtype = getattr(torch, manifest.accumulate_dtype)
    entries = manifest.entries(statistic)
    specs = [TensorSpec(key, dtype, (entry.length,)) for key, entry in entries.items()]
    name = statistic_file(statistic, manifest.storage)
    scratch = sink = group = None
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
            values = torch.as_tensor(stored(spec.name)).to("cpu", dtype)
            entry = entries[spec.name]
            entry.checksum = array_checksum(spec.name, entry.count, values.numpy())
            if sink is not None:
                sink.write(spec.name, values)
            else:
                chunk = min(spec.shape[0], ZARR_CHUNK_ELEMENTS)
                array = group.create_array(spec.name, shape=spec.shape, dtype=values.numpy().dtype,
                                           chunks=(chunk,), compressors=None, fill_value=0,
                                           config={"write_empty_chunks": True})  # readers count chunks
                array[...] = values.numpy()
        if sink is not None:
            sink.close()
            if scratch is not None:
                folder.put_file(path, name)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()


class StatsCache:
    """A finished cache folder (local or an fsspec URL), read lazily one array at a time.

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
        for statistic in self.manifest.statistics:
            file = statistic_file(statistic, self.manifest.storage)
            if self.folder.is_local:
                inside(self.folder.local_path, file, str(self.folder))
            if not self.folder.exists(file):
                raise RegMeanError(f"{self.folder.child(file)}: missing; the cache in {self.folder} is incomplete")
        self._stores: dict[str, object] = {}

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def path(self) -> Folder:
        """The Grams' file (grams.zarr or grams.safetensors)."""
        return self.folder.child(statistic_file(GRAM.name, self.manifest.storage))

    def _open(self, statistic: str, where: str):
        if statistic not in self._stores:
            file = statistic_file(statistic, self.manifest.storage)
            try:
                if self.manifest.storage == "zarr":
                    import zarr

                    store = zarr.open_group(self.folder.zarr_store(file, writable=False), mode="r")
                elif self.folder.is_local:
                    store = SafetensorsReader(self.folder.child(file).local_path)
                else:
                    store = SafetensorsReader(str(self.folder.child(file)), functools.partial(self.folder.read_range,
                                                                                             file),
                                              self.folder.size(file))
            except Exception as exc:  # damaged file: say which
                raise RegMeanError(f"{where}: cannot open the file ({_first_line(exc)})") from None
            self._stores[statistic] = store
        return self._stores[statistic]

    def read(self, statistic: str, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """One stored array (flat), after checking shape and dtype against the manifest, then its checksum.

        ``out``, when given (a contiguous array of the stored length and the accumulation dtype), receives
        the values: the merge passes its batch buffer."""
        if statistic not in self.manifest.statistics:
            raise RegMeanError(f"{self.folder}: holds no {statistic} statistic "
                               f"(it holds {', '.join(self.manifest.statistics)})")
        entry = self.manifest.entries(statistic)[key]
        file = self.folder.child(statistic_file(statistic, self.manifest.storage))
        where = f"{file} ({STATISTICS[statistic].name} {key})"
        length = entry.length
        dtype = np.dtype(self.manifest.accumulate_dtype)
        if out is not None and (out.shape != (length,) or out.dtype != dtype or not out.flags.c_contiguous):
            raise ValueError(f"{where}: out must be a contiguous {dtype}[{length}], got {out.dtype}{list(out.shape)}")
        array = None
        try:
            if self.manifest.storage == "zarr":
                if self.folder.is_local:
                    inside(file.local_path, key, where)
                _check_zarr_metadata(file.child(key), where)
                array = self._open(statistic, where)[key]
                shape, stored = tuple(array.shape), np.dtype(array.dtype)
            else:
                store = self._open(statistic, where)
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
        if array is not None:
            if array.compressors or array.filters:
                raise RegMeanError(f"{where}: compressed or filtered chunks; this tool writes plain ones")
            _check_chunk_files(file.child(key), math.prod(array.chunks) * array.dtype.itemsize, array.nchunks, where)
        values = np.empty(length, dtype) if out is None else out
        try:
            if array is not None:
                values[...] = array[...]
            else:
                store.read(key, out=torch.from_numpy(values))
        except Exception as exc:
            raise RegMeanError(f"{where}: unreadable ({_first_line(exc)})") from None
        if array_checksum(key, entry.count, values) != entry.checksum:
            raise RegMeanError(f"{where}: checksum mismatch; the cache is damaged or was edited")
        if not np.isfinite(values).all():
            raise RegMeanError(f"{where}: holds NaN or Inf; recompute this candidate's stats")
        return values

    def read_packed(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The packed upper triangle of one Gram sum."""
        return self.read(GRAM.name, key, out)

    def gram(self, key: str) -> torch.Tensor:
        """The full symmetric (d, d) Gram sum."""
        return unpack_upper(torch.from_numpy(self.read_packed(key)), self.manifest.grams[key].dim)

    def fisher(self, name: str) -> torch.Tensor:
        """The Fisher sum of one parameter, in its shape."""
        return torch.from_numpy(self.read("fisher", name)).reshape(self.manifest.fisher[name].shape)


def _check_zarr_metadata(array: Folder, where: str) -> None:
    """The array's zarr.json present and of a cache's size before zarr parses it."""
    try:
        size = array.size(ZARR_METADATA)
    except FileNotFoundError:
        raise KeyError(where) from None
    if size > MAX_ZARR_METADATA_BYTES:
        raise RegMeanError(f"{where}: {ZARR_METADATA} holds {size} bytes; not a cache's array")


def _check_chunk_files(array: Folder, chunk_bytes: int, nchunks: int, where: str) -> None:
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
        if info.get("type") != "file" or relative == ZARR_METADATA:
            continue
        if info.get("size") != chunk_bytes:
            raise RegMeanError(f"{where}: chunk {relative} holds {info.get('size')} bytes, not {chunk_bytes}; "
                               "the file is truncated or damaged")
        found += 1
    if found != nchunks:
        raise RegMeanError(f"{where}: {found} chunk files on disk where {nchunks} belong; chunks are "
                           "missing or foreign")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


_NP_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "V2"}


class InMemoryStats:
    """Statistics still in memory (the Python API): the same interface the merge reads caches through."""

    def __init__(self, manifest: Manifest, sums: Mapping[str, torch.Tensor],
                 fisher: Mapping[str, torch.Tensor] | None = None):
        self.manifest, self._sums, self._fisher = manifest, sums, fisher or {}

    def read(self, statistic: str, key: str, out: np.ndarray | None = None) -> np.ndarray:
        values = (pack_upper(self._sums[key]) if statistic == GRAM.name else self._fisher[key].reshape(-1))
        values = values.cpu().numpy()
        if out is None:
            return values
        out[...] = values
        return out
