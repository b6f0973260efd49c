"""Damaged caches: every kind of damage is a one-line error naming the file and the gram key.

Each case damages real files of a real cache (zarr or safetensors), then reads it as merge does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from regmean_pipeline.cache.store import array_checksum
from regmean_pipeline.errors import RegMeanError
from tests import faults
from tests.conftest import read_every_gram as read_all


@pytest.fixture
def pristine(bert_caches) -> dict[str, Path]:
    return bert_caches


def first_key(cache: Path) -> str:
    return next(iter(json.loads((cache / "manifest.json").read_text())["grams"]))


def edit_manifest(cache: Path, edit) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


# Each damage returns (file the message must name, gram key it must name or None, words it must contain).
def zarr_chunk_flipped(cache):
    key = first_key(cache)
    flip_byte(cache / "grams.zarr" / key / "c" / "0", 17)
    return "grams.zarr", key, "checksum mismatch"


def zarr_chunk_truncated(cache):
    key = first_key(cache)
    chunk = cache / "grams.zarr" / key / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    return "grams.zarr", key, "truncated"


def zarr_chunk_deleted(cache):
    key = first_key(cache)
    (cache / "grams.zarr" / key / "c" / "0").unlink()
    return "grams.zarr", key, "missing"


def zarr_array_deleted(cache):
    key = first_key(cache)
    shutil.rmtree(cache / "grams.zarr" / key)
    return "grams.zarr", key, "array missing"


def zarr_metadata_shape_edited(cache):
    key = first_key(cache)
    meta = cache / "grams.zarr" / key / "zarr.json"
    data = json.loads(meta.read_text())
    data["shape"] = [data["shape"][0] - 1]
    meta.write_text(json.dumps(data))
    return "grams.zarr", key, "manifest says"


def zarr_metadata_garbage(cache):
    key = first_key(cache)
    (cache / "grams.zarr" / key / "zarr.json").write_text("{not json")
    return "grams.zarr", key, "unreadable"


def zarr_inf_with_valid_checksum(cache):
    import zarr

    key = first_key(cache)
    array = zarr.open_group(str(cache / "grams.zarr"), mode="r+")[key]
    values = array[...]
    values[0] = np.inf
    array[...] = values
    edit_manifest(cache, lambda m: m["grams"][key].update(checksum=array_checksum(key, m["grams"][key]["tokens"], values)))
    return "grams.zarr", key, "NaN or Inf"


def safetensors_data_flipped(cache):
    path = cache / "grams.safetensors"
    flip_byte(path, path.stat().st_size - 7)  # inside the last tensor
    return "grams.safetensors", list(json.loads((cache / "manifest.json").read_text())["grams"])[-1], "checksum mismatch"


def safetensors_header_flipped(cache):
    flip_byte(cache / "grams.safetensors", 9)  # inside the JSON header
    return "grams.safetensors", first_key(cache), "cannot open"


def safetensors_truncated(cache):
    path = cache / "grams.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    return "grams.safetensors", first_key(cache), "cannot open"


def safetensors_tensor_removed(cache):
    path = cache / "grams.safetensors"
    tensors = load_file(str(path))
    key = first_key(cache)
    del tensors[key]
    save_file(tensors, str(path))
    return "grams.safetensors", key, "array missing"


def edit_first_gram(name: str, change, file: str, words: str):
    """A damage that edits the first gram's manifest entry with ``change(grams, key)``."""
    def damage(cache):
        key = first_key(cache)
        edit_manifest(cache, lambda m: change(m["grams"], key))
        return file, key, words
    damage.__name__ = name
    return damage


manifest_tokens_edited = edit_first_gram("manifest_tokens_edited", lambda grams, key: grams[key].update(
    tokens=grams[key]["tokens"] + 1), "grams.", "checksum mismatch")
manifest_checksum_edited = edit_first_gram("manifest_checksum_edited", lambda grams, key: grams[key].update(
    checksum="sha256:" + "0" * 64), "grams.", "checksum mismatch")
manifest_dim_edited = edit_first_gram("manifest_dim_edited", lambda grams, key: grams[key].update(
    dim=grams[key]["dim"] + 1), "manifest.json", "differs from its gram's dim")
manifest_gram_removed = edit_first_gram("manifest_gram_removed", lambda grams, key: grams.pop(key),
                                        "manifest.json", "does not list")


def manifest_truncated(cache):
    path = cache / "manifest.json"
    path.write_text(path.read_text()[:200])
    return "manifest.json", None, "not valid JSON"


def manifest_deleted(cache):
    (cache / "manifest.json").unlink()
    return "manifest.json", None, "no manifest"


def gram_file_deleted(cache):
    target = cache / ("grams.zarr" if (cache / "grams.zarr").exists() else "grams.safetensors")
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return target.name, None, "incomplete"


ZARR = [zarr_chunk_flipped, zarr_chunk_truncated, zarr_chunk_deleted, zarr_array_deleted, zarr_metadata_shape_edited,
        zarr_metadata_garbage, zarr_inf_with_valid_checksum]
SAFETENSORS = [safetensors_data_flipped, safetensors_header_flipped, safetensors_truncated, safetensors_tensor_removed]
EITHER = [manifest_tokens_edited, manifest_checksum_edited, manifest_dim_edited, manifest_gram_removed,
          manifest_truncated, manifest_deleted, gram_file_deleted]
CASES = ([("zarr", d) for d in ZARR] + [("safetensors", d) for d in SAFETENSORS]
         + [(fmt, d) for d in EITHER for fmt in ("zarr", "safetensors")])


@pytest.mark.parametrize("fmt, damage", CASES, ids=[f"{fmt}-{d.__name__}" for fmt, d in CASES])
def test_damaged_cache_is_refused_naming_file_and_gram(fmt, damage, pristine, tmp_path):
    cache = tmp_path / "a"
    shutil.copytree(pristine[fmt], cache)
    read_all(cache)  # the copy is sound before the damage
    with faults.trial("damaged cache (flipped byte, truncation, edit, missing part)"):
        file, key, words = damage(cache)
        with pytest.raises(RegMeanError) as error:
            read_all(cache)
        message = str(error.value)
        assert "\n" not in message and words in message and file in message and str(cache) in message, message
        if key is not None:
            assert key in message, message


def test_damaged_cache_stops_merge_in_one_line_and_keeps_the_earlier_output(pristine, workspace, cli, tmp_path):
    caches = tmp_path / "caches"
    shutil.copytree(pristine["zarr"], caches / "a")
    shutil.copytree(pristine["safetensors"], caches / "b")
    out = tmp_path / "merged"
    code, _, err = cli("merge", "--cache-dir", caches, "--out", out, "--device", "cpu")
    assert code == 0, err
    before = faults.snapshot(out)
    with faults.trial("damaged cache (flipped byte, truncation, edit, missing part)"):
        _, key, _ = zarr_chunk_flipped(caches / "a")
        code, _, err = cli("merge", "--cache-dir", caches, "--out", out, "--overwrite", "--device", "cpu")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "checksum mismatch" in lines[0] and key in lines[0]
        faults.assert_intact("damaged cache (flipped byte, truncation, edit, missing part)", out, before)
