"""Gram reads straight from the files into the caller's buffer: the same values as zarr's own reads, for
arrays of one chunk or many, and zarr's reader for arrays this tool would not write."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec

from regmean_pipeline.cache import store
from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.cache.symmetric import packed_length


def zarr_values(folder, key) -> np.ndarray:
    return zarr.open_group(str(folder / "grams.zarr"), mode="r")[key][...]


@pytest.mark.parametrize("fmt", ["zarr", "safetensors"])
def test_a_read_into_a_buffer_equals_a_plain_read(bert_caches, fmt):
    cache = StatsCache(bert_caches[fmt])
    for key, entry in cache.manifest.grams.items():
        plain = cache.read_packed(key)
        buffer = np.full(packed_length(entry.dim), np.nan, dtype=np.float32)
        assert cache.read_packed(key, out=buffer) is buffer
        assert np.array_equal(buffer, plain)
        if fmt == "zarr":
            assert np.array_equal(plain, zarr_values(bert_caches[fmt], key))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        cache.read_packed(key, out=np.empty(packed_length(entry.dim) + 1, dtype=np.float32))


def test_arrays_of_many_chunks_are_read_whole(workspace, tmp_path, monkeypatch):
    """Chunks of 7 elements (the last one padded): every chunk file is checked and read, and the values are
    zarr's own, byte for byte."""
    from stages.stats import StatsOptions, run_stats

    monkeypatch.setattr(store, "ZARR_CHUNK_ELEMENTS", 7)
    run_stats(StatsOptions(model=str(workspace.model("bert", 1)), dataset=str(workspace.text_task(1)),
                           out=str(tmp_path / "cache"), format="zarr", device="cpu", progress=False))
    cache = StatsCache(tmp_path / "cache")
    for key, entry in cache.manifest.grams.items():
        assert packed_length(entry.dim) % 7 and packed_length(entry.dim) > 7  # several chunks, the last padded
        assert np.array_equal(cache.read_packed(key), zarr_values(tmp_path / "cache", key))


def test_an_array_in_the_other_byte_order_is_read(bert_caches, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(bert_caches["zarr"], folder)
    key = next(iter(StatsCache(folder).manifest.grams))
    values = zarr_values(folder, key)
    group = zarr.open_group(str(folder / "grams.zarr"), mode="a")
    del group[key]
    big = group.create_array(key, shape=values.shape, dtype=values.dtype, chunks=values.shape, compressors=None,
                             serializer=BytesCodec(endian="big"), fill_value=0)
    big[...] = values
    assert np.array_equal(StatsCache(folder).read_packed(key), values)  # checksum and values hold


def test_an_oversized_deeply_nested_or_non_object_zarr_json_is_refused(bert_caches, tmp_path, monkeypatch):
    from regmean_pipeline.errors import RegMeanError

    folder = tmp_path / "cache"
    shutil.copytree(bert_caches["zarr"], folder)
    key = next(iter(StatsCache(folder).manifest.grams))
    for text in ("[1, 2]", "[" * 100_000):  # not an object; nesting that a JSON parser recurses on
        (folder / "grams.zarr" / key / "zarr.json").write_text(text)
        with pytest.raises(RegMeanError, match="unreadable") as raised:
            StatsCache(folder).read_packed(key)
        assert "\n" not in str(raised.value)
    (folder / "grams.zarr" / key / "zarr.json").write_text("[1, 2]")
    monkeypatch.setattr(store, "MAX_ZARR_METADATA_BYTES", 4)
    with pytest.raises(RegMeanError, match="holds 6 bytes"):
        StatsCache(folder).read_packed(key)
