"""Fuzzing the manifest parser: whatever a manifest.json holds, the answer is a Manifest that keeps
every invariant the readers rely on, or one RegMeanError; never another exception."""

from __future__ import annotations

import copy
import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regmean_pipeline.cache.manifest import MAX_DIM, Manifest, parse_manifest, read_manifest
from regmean_pipeline.errors import RegMeanError

VALID = {
    "format": "regmean-stats", "version": 1,
    "model": {"reference": "/models/a", "architecture": "BertForSequenceClassification", "model_type": "bert",
              "fingerprint": "sha256:" + "1" * 64, "config": {"hidden_size": 32}},
    "dataset": {"path": "/data/a.jsonl", "split": "train", "num_examples": 8, "seed": 0},
    "examples": 8, "include_padding": False, "accumulate_dtype": "float32", "forward_dtype": "float32",
    "storage": "zarr", "layout": "packed-upper",
    "layers": {
        "encoder.q": {"gram": "encoder.q", "weight": "encoder.q.weight", "in_features": 32, "out_features": 32,
                      "transposed": False},
        "encoder.k": {"gram": "encoder.q", "weight": "encoder.k.weight", "in_features": 32, "out_features": 32,
                      "transposed": False},
        "encoder.out": {"gram": "encoder.out", "weight": "encoder.out.weight", "in_features": 64, "out_features": 32,
                        "transposed": True},
    },
    "grams": {"encoder.q": {"dim": 32, "tokens": 100, "checksum": "sha256:" + "a" * 64},
              "encoder.out": {"dim": 64, "tokens": 100, "checksum": "sha256:" + "b" * 64}},
    "tool": "regmean-pipeline 0.1.0", "created": "2026-11-27T00:00:00+00:00", "extra": {},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def plain(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_.\-]+", name)) and name not in (".", "..") and not name.startswith("__")


def holds_invariants(manifest: Manifest) -> None:
    """What StatsCache, the planner and the checkpoint loader take for granted after parsing."""
    assert manifest.storage in ("zarr", "safetensors") and manifest.accumulate_dtype in ("float32", "float64")
    for key, gram in manifest.grams.items():
        assert plain(key), key
        assert 1 <= gram.dim <= MAX_DIM and gram.tokens >= 0 and gram.checksum.startswith("sha256:")
    for name, layer in manifest.layers.items():
        assert plain(name), name
        assert layer.gram in manifest.grams and layer.in_features == manifest.grams[layer.gram].dim
    assert {layer.gram for layer in manifest.layers.values()} == set(manifest.grams)
    assert isinstance(manifest.extra, dict) and isinstance(manifest.model, dict)


def parse_or_refuse(data) -> None:
    try:
        manifest = parse_manifest(data, "manifest.json")
    except RegMeanError as exc:
        assert str(exc).startswith("manifest.json") and "\n" not in str(exc)
        return
    holds_invariants(manifest)


def test_the_valid_manifest_parses_and_round_trips():
    manifest = parse_manifest(copy.deepcopy(VALID), "manifest.json")
    holds_invariants(manifest)
    assert parse_manifest(json.loads(manifest.to_json()), "manifest.json") == manifest


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value(data):
    parse_or_refuse(data)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_valid_manifest_with_one_field_replaced_or_removed(data):
    manifest = copy.deepcopy(VALID)
    paths = [p for p in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    parse_or_refuse(manifest)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_valid_manifest_with_a_hostile_name(data):
    """Names become array names and paths: whatever text a key holds, it is refused or plain."""
    manifest = copy.deepcopy(VALID)
    name = data.draw(st.text(min_size=0, max_size=40) | st.sampled_from(
        ["..", ".", "../x", "/etc/passwd", "a/../../b", "__proto__", "x\n", "C:\\x", "a" * 401, "zarr.json"]))
    where = data.draw(st.sampled_from(["gram", "layer"]))
    if where == "gram":
        manifest["grams"][name] = manifest["grams"].pop("encoder.out")
        manifest["layers"]["encoder.out"]["gram"] = name
    else:
        manifest["layers"][name] = manifest["layers"].pop("encoder.out")
    parse_or_refuse(manifest)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_manifest_file(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "manifest.json").write_bytes(raw)
    try:
        holds_invariants(read_manifest(folder))
    except RegMeanError as exc:
        assert "manifest.json" in str(exc)


def test_pathological_json_is_one_clear_error(tmp_path):
    for raw in (b"[" * 100_000, b'{"version": ' + b"9" * 10_000 + b"}", b"\xff\xfe{}", b'{"a": NaN}'):
        (tmp_path / "manifest.json").write_bytes(raw)
        try:
            read_manifest(tmp_path)
        except RegMeanError as exc:
            assert "manifest.json" in str(exc) and "\n" not in str(exc)
        else:
            raise AssertionError(f"accepted {raw[:20]!r}")
