"""Cache folders on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from regmean_pipeline.cache.store import StatsCache

BUCKET = "regmean-test"


@pytest.fixture(scope="module")
def s3():
    """Start moto's S3 server on a free local port, point fsspec/s3fs at it, stop it afterwards."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    variables = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved_env = {key: os.environ.get(key) for key in variables}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(variables)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}  # the env variable is read at import; set it here too
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf


def listing(fs, prefix):
    fs.invalidate_cache()
    return sorted(p.split(prefix, 1)[1] for p in fs.find(f"{BUCKET}/{prefix}"))


def stats(cli, workspace, out, seed, *extra):
    code, _, err = cli("stats", "--model", workspace.model("bert", seed), "--dataset", workspace.text_task(seed),
                       "--out", out, "--num-examples", 16, "--device", "cpu", *extra)
    assert code == 0, err


def test_stats_and_merge_through_s3_match_local_folders(s3, workspace, cli, tmp_path):
    for where in (f"s3://{BUCKET}/run/caches", str(tmp_path / "caches")):
        stats(cli, workspace, f"{where}/a", 1, "--format", "zarr")
        stats(cli, workspace, f"{where}/b", 2, "--format", "safetensors")
    assert "a/manifest.json" in listing(s3, "run/caches/") and "b/grams.safetensors" in listing(s3, "run/caches/")
    for name in ("a", "b"):
        remote, local = StatsCache(f"s3://{BUCKET}/run/caches/{name}"), StatsCache(tmp_path / "caches" / name)
        assert remote.manifest.grams == local.manifest.grams  # same checksums: the same bytes were stored
        for key in local.manifest.grams:
            assert np.array_equal(remote.read_packed(key), local.read_packed(key))
    for caches, out in ((f"s3://{BUCKET}/run/caches", "m_s3"), (tmp_path / "caches", "m_local")):
        code, _, err = cli("merge", "--cache-dir", caches, "--out", tmp_path / out, "--device", "cpu")
        assert code == 0, err
    remote, local = load_file(tmp_path / "m_s3" / "model.safetensors"), load_file(tmp_path / "m_local" / "model.safetensors")
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    report = json.loads((tmp_path / "m_s3" / "merge_report.json").read_text())
    assert report["candidates"][0]["cache"] == f"s3://{BUCKET}/run/caches/a"


def test_shards_on_s3_combine_there(s3, workspace, cli, tmp_path):
    for index in range(2):
        stats(cli, workspace, f"s3://{BUCKET}/shards/a", 1, "--shard", f"{index}/2", "--format", "safetensors")
    code, _, err = cli("combine", f"s3://{BUCKET}/shards/a", "--out", f"s3://{BUCKET}/combined/a")
    assert code == 0, err
    stats(cli, workspace, tmp_path / "whole", 1)
    combined, whole = StatsCache(f"s3://{BUCKET}/combined/a"), StatsCache(tmp_path / "whole")
    assert combined.manifest.examples == whole.manifest.examples == 16
    for key, entry in whole.manifest.grams.items():
        assert combined.manifest.grams[key].tokens == entry.tokens
        expected = whole.read_packed(key).astype(np.float64)
        assert np.linalg.norm(combined.read_packed(key) - expected) <= 1e-6 * np.linalg.norm(expected)


def test_a_failed_write_leaves_nothing_a_merge_accepts(s3, workspace, cli, tmp_path, monkeypatch):
    import regmean_pipeline.cache.store as cache_module

    stats(cli, workspace, f"s3://{BUCKET}/fail/a", 1)
    code, _, err = cli("stats", "--model", workspace.model("bert", 1), "--dataset", workspace.text_task(1),
                       "--out", f"s3://{BUCKET}/fail/a", "--device", "cpu")
    assert code == 2 and "already exists; pass --overwrite" in err

    calls = {"n": 0}
    real = cache_module.array_checksum

    def failing(*args):  # the third Gram cannot be written
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("connection reset")
        return real(*args)

    monkeypatch.setattr(cache_module, "array_checksum", failing)
    code, _, err = cli("stats", "--model", workspace.model("bert", 2), "--dataset", workspace.text_task(2),
                       "--out", f"s3://{BUCKET}/fail/b", "--device", "cpu")
    assert code == 1 and "connection reset" in err
    assert not [p for p in listing(s3, "fail/") if p.startswith("b/")]  # what b wrote was deleted
    # an old cache being overwritten loses its manifest before anything else changes
    calls["n"] = 0
    code, _, err = cli("stats", "--model", workspace.model("bert", 1), "--dataset", workspace.text_task(1),
                       "--out", f"s3://{BUCKET}/fail/a", "--device", "cpu", "--overwrite")
    assert code == 1 and "a/manifest.json" not in listing(s3, "fail/")
    monkeypatch.undo()
    # arrays without a manifest (a writer killed before its last step) are not a cache
    s3.pipe(f"{BUCKET}/fail/c/grams.safetensors", b"\0" * 64)
    code, _, err = cli("merge", "--cache-dir", f"s3://{BUCKET}/fail", "--out", tmp_path / "m")
    assert code == 2 and "no subfolder holds a manifest.json" in err


def test_file_urls_work_like_paths(workspace, cli, tmp_path):
    stats(cli, workspace, f"file://{tmp_path}/caches/a", 1, "--format", "safetensors")
    stats(cli, workspace, f"file://{tmp_path}/caches/b", 2)
    assert (tmp_path / "caches" / "a" / "manifest.json").exists()
    code, _, err = cli("merge", "--cache-dir", f"file://{tmp_path}/caches", "--out", tmp_path / "m", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").exists()
