"""Gram caches on disk: a manifest.json beside a zarr v3 group or one safetensors file.

Each Gram is stored as a sum (not a mean), packed to its upper triangle. Its checksum covers the
gram key, token count, dtype and values, so an edited manifest and a flipped byte are both caught
when the Gram is read.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from regmean_pipeline.cache.manifest import CHECKPOINT_FIELD, GramEntry, Manifest, read_manifest
from regmean_pipeline.cache.symmetric import pack_upper, packed_length, unpack_upper
from regmean_pipeline.cache.zarr_plain import check_chunk_files, plain_layout, read_chunks, read_metadata
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
        layout = array = None
        array_folder = self.path.child(key)
        if self.manifest.storage == "zarr":
            if self.folder.is_local:
                inside(self.path.local_path, key, where)
            layout = plain_layout(read_metadata(array_folder, where))
        try:
            if layout is not None:  # the layout this tool writes: read without zarr
                shape, stored = (layout.length,), layout.dtype
            elif self.manifest.storage == "zarr":
                array = self._open(where)[key]
                shape, stored = tuple(array.shape), np.dtype(array.dtype)
            else:
                store = self._open(where)
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
        if layout is not None:
            check_chunk_files(array_folder, layout.chunk_bytes, layout.nchunks, where)
        elif array is not None:
            if array.compressors or array.filters:
                raise RegMeanError(f"{where}: compressed or filtered chunks; this tool writes plain ones")
            check_chunk_files(array_folder, math.prod(array.chunks) * array.dtype.itemsize, array.nchunks,
                              where)
        values = np.empty(length, dtype) if out is None else out
        try:
            if layout is not None:
                read_chunks(layout, array_folder, values)
            elif array is not None:
                values[...] = array[...]
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
