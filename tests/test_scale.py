"""At scale: torchrun data-parallel stats, shard caches and combine, multi-pass accumulation, device maps,
layer-parallel merge. Every variant is checked against the plain single-process result."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from regmean_pipeline.cache.store import StatsCache
from stages.stats import StatsOptions, run_stats
from tests.conftest import read_json
from tests.test_cli import REGMEAN

STATS = ("--num-examples", 24, "--batch-size", 5, "--device", "cpu")


def run_command(args, *, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """The regmean command in a fresh process, or N of them under torchrun (gloo on CPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun),
                   "-m", "stages"]
    else:
        command = [REGMEAN]
    result = subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def grams_of(folder) -> tuple[dict, dict[str, np.ndarray]]:
    cache = StatsCache(folder)
    return read_json(Path(folder) / "manifest.json"), {key: cache.read_packed(key).astype(np.float64)
                                                        for key in cache.manifest.grams}


def assert_same_cache(folder, reference, rtol: float) -> dict:
    """Same layers, Grams, token and example counts; every Gram within ``rtol`` relative (Frobenius)."""
    (manifest, grams), (expected_manifest, expected) = grams_of(folder), grams_of(reference)
    assert manifest["layers"] == expected_manifest["layers"]
    assert manifest["examples"] == expected_manifest["examples"]
    assert {k: e["tokens"] for k, e in manifest["grams"].items()} == \
        {k: e["tokens"] for k, e in expected_manifest["grams"].items()}
    for key, values in expected.items():
        assert np.linalg.norm(grams[key] - values) <= rtol * np.linalg.norm(values), key
    return manifest


@pytest.fixture(scope="module")
def single(workspace, tmp_path_factory):
    """One process, whole data set: what every other way of computing the stats must reproduce."""
    out = tmp_path_factory.mktemp("single") / "a"
    run_stats(StatsOptions(model=str(workspace.model("bert", 1)), dataset=str(workspace.text_task(1, n=30)),
                           out=str(out), num_examples=24, batch_size=5, device="cpu", format="safetensors",
                           progress=False))
    return out


def stats_args(workspace, out, *extra, seed=1):
    return ["stats", "--model", workspace.model("bert", seed), "--dataset", workspace.text_task(1, n=30),
            "--out", out, *STATS, *extra]


def test_torchrun_two_processes_give_the_cache_of_one(workspace, single, tmp_path):
    result = run_command(stats_args(workspace, tmp_path / "a"), torchrun=2)
    assert "over 2 processes" in result.stderr
    manifest = assert_same_cache(tmp_path / "a", single, rtol=1e-6)
    assert manifest["examples"] == 24 and manifest["shard"] is None


def test_shards_combine_exactly_and_merge_reads_a_folder_of_shards(workspace, single, cli, tmp_path):
    candidate = tmp_path / "caches" / "a"
    for index in range(3):
        code, _, err = cli(*stats_args(workspace, candidate, "--shard", f"{index}/3"))
        assert code == 0, err
    shard = read_json(candidate / "shard-00001-of-00003" / "manifest.json")
    assert shard["shard"] == {"index": 1, "count": 3} and shard["examples"] == 8
    assert shard["dataset"]["num_examples"] == 24  # the whole run's settings
    code, _, err = cli("combine", candidate, "--out", tmp_path / "combined")
    assert code == 0, err
    assert_same_cache(tmp_path / "combined", single, rtol=1e-6)

    # merge takes the folder of shards as the candidate, with the same result as the combined cache
    code, _, err = cli(*stats_args(workspace, tmp_path / "caches" / "b", seed=2))
    assert code == 0, err
    (tmp_path / "combined_caches").mkdir()
    shutil.copytree(tmp_path / "combined", tmp_path / "combined_caches" / "a")
    shutil.copytree(tmp_path / "caches" / "b", tmp_path / "combined_caches" / "b")
    for caches, out in ((tmp_path / "caches", "m_shards"), (tmp_path / "combined_caches", "m_combined")):
        code, _, err = cli("merge", "--cache-dir", caches, "--out", tmp_path / out, "--device", "cpu")
        assert code == 0, err
    with safe_open(tmp_path / "m_shards" / "model.safetensors", "pt") as a, \
            safe_open(tmp_path / "m_combined" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    assert read_json(tmp_path / "m_shards" / "merge_report.json")["candidates"][0]["examples"] == 24


def test_missing_duplicate_and_mismatched_shards_are_named(workspace, cli, tmp_path):
    candidate = tmp_path / "a"
    code, _, err = cli(*stats_args(workspace, candidate, "--shard", "0/2"))
    assert code == 0, err

    def error(*args):
        code, stdout, err = cli(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err + stdout, err
        return lines[0]

    assert "shard 1 of 2 missing" in error("combine", candidate, "--out", tmp_path / "x")
    shard0 = candidate / "shard-00000-of-00002"
    assert "duplicate of shard 0 of 2" in error("combine", shard0, shard0, "--out", tmp_path / "x")
    assert "shard 0 of 2 of a candidate" in error("merge", "--cache", shard0, "--out", tmp_path / "m")
    # shard 1 from other weights, then from other settings (another shuffle seed)
    other_model = tmp_path / "other_model"
    code, _, err = cli(*stats_args(workspace, other_model, "--shard", "1/2", seed=2))
    assert code == 0, err
    line = error("combine", shard0, other_model / "shard-00001-of-00002", "--out", tmp_path / "x")
    assert "another model's weights" in line and "shard-00001-of-00002" in line
    other_seed = tmp_path / "other_seed"
    code, _, err = cli(*stats_args(workspace, other_seed, "--shard", "1/2", "--seed", 7))
    assert code == 0, err
    line = error("combine", shard0, other_seed / "shard-00001-of-00002", "--out", tmp_path / "x")
    assert "other settings (dataset differs)" in line
    assert "expected I/N" in error(*stats_args(workspace, tmp_path / "y", "--shard", "2/2"))
    assert not (tmp_path / "x").exists()


def test_gram_memory_budget_splits_into_passes_with_the_same_cache(workspace, single, cli, tmp_path, caplog):
    # tiny BERT: 4 KiB Grams for the 32-wide inputs, 16 KiB for the 64-wide ones, 64 KiB in all
    with caplog.at_level(logging.INFO, logger="regmean_pipeline.measure.passes"):
        run_stats(StatsOptions(model=str(workspace.model("bert", 1)), dataset=str(workspace.text_task(1, n=30)),
                               out=str(tmp_path / "a"), num_examples=24, batch_size=5, device="cpu",
                               format="safetensors", progress=False, max_gram_memory="20KiB"))
    announced = [r.getMessage() for r in caplog.records if "passes over the data" in r.getMessage()]
    assert len(announced) == 1 and "over --max-gram-memory 20.0 KiB" in announced[0], announced
    assert int(announced[0].split(" passes over the data")[0].rsplit(" ", 1)[-1]) >= 2
    assert_same_cache(tmp_path / "a", single, rtol=0.0)  # the same forward passes: bit for bit
    code, _, err = cli(*stats_args(workspace, tmp_path / "b", "--max-gram-memory", "8KiB"))
    assert code == 2 and "alone needs 16.0 KiB" in err


def test_device_map_auto_gives_the_same_cache(workspace, single, cli, tmp_path):
    args = stats_args(workspace, tmp_path / "a", "--device-map", "auto", "--format", "safetensors")
    args.remove("--device"), args.remove("cpu")
    code, _, err = cli(*args)
    assert code == 0, err
    assert_same_cache(tmp_path / "a", single, rtol=1e-6)


def test_layer_parallel_merge_under_torchrun_equals_one_process(workspace, cli, tmp_path):
    caches = tmp_path / "caches"
    for name, seed in (("a", 1), ("b", 2)):
        code, _, err = cli(*stats_args(workspace, caches / name, seed=seed))
        assert code == 0, err
    args = ["merge", "--cache-dir", caches, "--device", "cpu", "--max-shard-size", "40KB", "--batch-memory", "64KiB"]
    run_command(args + ["--out", tmp_path / "one"])
    result = run_command(args + ["--out", tmp_path / "two"], torchrun=2)
    assert "over 2 processes" in result.stderr
    one, two = (read_json(tmp_path / m / "model.safetensors.index.json")["weight_map"] for m in ("one", "two"))
    assert set(one) == set(two)
    assert len(set(two.values())) > 2  # several files, written by both ranks
    for name in one:
        with safe_open(tmp_path / "one" / one[name], "pt") as a, safe_open(tmp_path / "two" / two[name], "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    report = read_json(tmp_path / "two" / "merge_report.json")
    assert report["settings"]["ranks"] == 2 and len(report["timings"]["per_rank"]) == 2
    assert report["layers"] == read_json(tmp_path / "one" / "merge_report.json")["layers"]
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "two")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 9, 10, 3]])).logits).all()


LEAVE_SCRIPT = """
import sys
from regmean_pipeline.distributed import all_ok, process_group
from regmean_pipeline.errors import RegMeanError
try:
    with process_group() as ranks:
        all_ok(True)  # the last collective of a stage; rank 0 then publishes
        if ranks.rank == 0 and sys.argv[1] == "fail":
            raise SystemExit(3)
except RegMeanError as exc:
    print(f"rank {ranks.rank}: {exc}", flush=True)
    raise SystemExit(2)
print(f"rank {ranks.rank}: left", flush=True)
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_ranks_leave_the_group_together(tmp_path, outcome):
    """Every rank waits for the others before tearing the group down; when rank 0 fails after the last
    collective (while publishing), the other rank stops with one line instead of reporting success."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), outcome], capture_output=True, text=True, env=env, timeout=300)
    if outcome == "ok":
        assert result.returncode == 0, result.stderr[-3000:]
        # both ranks share one stdout, so their lines may interleave
        assert sorted(re.findall(r"rank \d: left", result.stdout)) == ["rank 0: left", "rank 1: left"], result.stdout
    else:
        assert result.returncode != 0
        assert "rank 1: another rank of this torchrun job failed before finishing" in result.stdout, result.stdout
        assert "rank 0: left" not in result.stdout
