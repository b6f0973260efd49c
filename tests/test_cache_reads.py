"""Gram reads straight from the files into the caller's buffer: the same values as zarr's own reads, for
arrays of one chunk or many, and zarr's reader for arrays this tool would not write."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec

from regmean_pipeline.cache import store
from regmean_pipeline.cache.store import GramCache
from regmean_pipeline.cache.symmetric import packed_length


def zarr_values(folder, key) -> np.ndarray:
    return zarr.open_group(str(folder / "grams.zarr"), mode="r")[key][...]


@pytest.mark.parametrize("fmt", ["zarr", "safetensors"])
def test_a_read_into_a_buffer_equals_a_plain_read(bert_caches, fmt):
    cache = GramCache(bert_caches[fmt])
    for key, entry in cache.manifest.grams.items():
        plain = cache.read_packed(key)
        buffer = np.full(packed_length(entry.dim), np.nan, dtype=np.float32)
        assert cache.read_packed(key, out=buffer) is buffer
        assert np.array_equal(buffer, plain)
        if fmt == "zarr":
            assert np.array_equal(plain, zarr_values(bert_caches[fmt], key))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        cache.read_packed(key, out=np.empty(packed_length(entry.dim) + 1, dtype=np.float32))


def test_arrays_of_many_chunks_are_read_from_their_files(workspace, tmp_path, monkeypatch):
    """Chunks of 7 elements (the last one padded): every chunk file is read, in order, without zarr's
    reader, and the values are zarr's own, byte for byte."""
    from stages.stats import StatsOptions, run_stats

    monkeypatch.setattr(store, "ZARR_CHUNK_ELEMENTS", 7)
    run_stats(StatsOptions(model=str(workspace.model("bert", 1)), dataset=str(workspace.text_task(1)),
                           out=str(tmp_path / "cache"), format="zarr", device="cpu", progress=False))
    cache = GramCache(tmp_path / "cache")
    expected = {key: zarr_values(tmp_path / "cache", key) for key in cache.manifest.grams}

    def refuse(*_):
        raise AssertionError("read through zarr")

    monkeypatch.setattr(zarr.Array, "__getitem__", refuse)
    for key, entry in cache.manifest.grams.items():
        assert packed_length(entry.dim) % 7 and packed_length(entry.dim) > 7  # several chunks, the last padded
        assert np.array_equal(cache.read_packed(key), expected[key])


def test_an_array_in_the_other_byte_order_is_read_through_zarr(bert_caches, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(bert_caches["zarr"], folder)
    key = next(iter(GramCache(folder).manifest.grams))
    values = zarr_values(folder, key)
    group = zarr.open_group(str(folder / "grams.zarr"), mode="a")
    del group[key]
    big = group.create_array(key, shape=values.shape, dtype=values.dtype, chunks=values.shape, compressors=None,
                             serializer=BytesCodec(endian="big"), fill_value=0)
    big[...] = values
    assert np.array_equal(GramCache(folder).read_packed(key), values)  # checksum and values hold


def test_reading_a_cache_this_tool_wrote_does_not_import_zarr(bert_caches):
    """zarr's import (0.17 s, GIL-bound) and its event loop are skipped for the arrays this tool writes;
    the values still pass their checksums (read_packed checks them)."""
    import subprocess

    code = ("import sys; from regmean_pipeline.cache.store import GramCache; "
            f"cache = GramCache({str(bert_caches['zarr'])!r}); "
            "total = sum(float(cache.read_packed(key).sum()) for key in cache.manifest.grams); "
            "print(len(cache.manifest.grams), 'zarr' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, imported = result.stdout.split()
    assert int(count) > 0 and imported == "False"


def tool_metadata(bert_caches) -> dict:
    key = next(iter(GramCache(bert_caches["zarr"]).manifest.grams))
    return json.loads((bert_caches["zarr"] / "grams.zarr" / key / "zarr.json").read_text())


def test_the_plain_layout_is_recognised_only_as_this_tool_writes_it(bert_caches):
    from regmean_pipeline.cache.zarr_plain import plain_layout

    metadata = tool_metadata(bert_caches)
    layout = plain_layout(metadata)
    assert layout is not None and layout.length == metadata["shape"][0] and layout.dtype == np.float32
    assert layout.chunk_name(3) == "c/3" and layout.nchunks == -(-layout.length // layout.chunk)

    def edited(change) -> dict:
        copy = json.loads(json.dumps(metadata))
        change(copy)
        return copy

    others = [
        lambda m: m["codecs"].append({"name": "zstd", "configuration": {"level": 0}}),  # compressed
        lambda m: m["codecs"][0]["configuration"].update(endian="big" if sys.byteorder == "little" else "little"),
        lambda m: m.update(shape=[2, m["shape"][0]]),  # not 1-D
        lambda m: m.update(zarr_format=2),
        lambda m: m.update(node_type="group"),
        lambda m: m.update(storage_transformers=[{"name": "sharding"}]),
        lambda m: m["chunk_key_encoding"].update(name="v2"),
        lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[0]),
        lambda m: m.update(data_type="int32"),
        lambda m: m.update(shape=[True]),
    ]
    for change in others:
        assert plain_layout(edited(change)) is None


def test_an_oversized_deeply_nested_or_non_object_zarr_json_is_refused(bert_caches, tmp_path, monkeypatch):
    from regmean_pipeline.cache import zarr_plain
    from regmean_pipeline.errors import RegMeanError

    folder = tmp_path / "cache"
    shutil.copytree(bert_caches["zarr"], folder)
    key = next(iter(GramCache(folder).manifest.grams))
    (folder / "grams.zarr" / key / "zarr.json").write_text("[1, 2]")
    with pytest.raises(RegMeanError, match="not a JSON object"):
        GramCache(folder).read_packed(key)
    (folder / "grams.zarr" / key / "zarr.json").write_text("[" * 100_000)  # nesting that json.loads recurses on
    with pytest.raises(RegMeanError, match="unreadable zarr.json: not acceptable JSON"):
        GramCache(folder).read_packed(key)
    (folder / "grams.zarr" / key / "zarr.json").write_text("[1, 2]")
    monkeypatch.setattr(zarr_plain, "MAX_METADATA_BYTES", 4)
    with pytest.raises(RegMeanError, match="holds 6 bytes"):
        GramCache(folder).read_packed(key)
