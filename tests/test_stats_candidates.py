"""Several candidates in one `regmean stats` call: each cache the same, byte for byte, as its own process
writes; pairing by name, the YAML list, and the options that mean something per candidate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from regmean_pipeline.cache.shards import ShardSpec
from regmean_pipeline.cache.store import StatsCache
from tests.test_cli import REGMEAN

STATS = ("--num-examples", 12, "--batch-size", 4, "--device", "cpu")


def cache_bytes(folder: Path) -> tuple[dict, dict[str, bytes]]:
    """The manifest without its timestamp, and the bytes of every Gram."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("created")
    cache = StatsCache(folder)
    return manifest, {key: cache.read_packed(key).tobytes() for key in cache.manifest.grams}


@pytest.fixture(scope="module")
def pair(workspace):
    """Two candidates of different architectures, each with its own task data."""
    return {"alpha": (workspace.model("bert", 1), workspace.text_task(1)),
            "beta": (workspace.model("llama", 2), workspace.text_task(2))}


def flags(pair) -> list:
    return [item for name, (model, task) in pair.items()
            for item in ("--model", f"{name}={model}", "--dataset", f"{name}={task}")]


def test_each_cache_equals_its_own_process(pair, cli, tmp_path):
    code, _, err = cli("stats", *flags(pair), "--out", tmp_path / "together", *STATS)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "together").iterdir() if not p.name.startswith(".")) == ["alpha", "beta"]
    for name, (model, task) in pair.items():  # the single-candidate form, each in a fresh process
        single = subprocess.run([REGMEAN, "stats", "--model", model, "--dataset", task, "--out", tmp_path / name,
                                 *map(str, STATS), "--quiet"], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        assert single.returncode == 0, single.stderr[-2000:]
        assert cache_bytes(tmp_path / "together" / name) == cache_bytes(tmp_path / name), name


def test_yaml_list_and_bare_paths_name_the_same_candidates(workspace, cli, tmp_path):
    """Bare paths name a candidate after the model folder and the data file's folder; the YAML form with
    explicit names writes the same caches."""
    models, data = tmp_path / "runs", tmp_path / "data"
    models.mkdir()
    for name, seed in (("sst2", 1), ("trec", 2)):
        (models / name).symlink_to(workspace.model("bert", seed), target_is_directory=True)
        (data / name).mkdir(parents=True)
        (data / name / "train.jsonl").write_bytes(workspace.text_task(seed).read_bytes())
    code, _, err = cli("stats", "--model", models / "sst2", "--model", models / "trec", "--dataset",
                       data / "trec" / "train.jsonl", "--dataset", data / "sst2" / "train.jsonl",
                       "--out", tmp_path / "bare", *STATS)
    assert code == 0, err
    listing = tmp_path / "candidates.yaml"
    listing.write_text("candidates:\n" + "".join(
        f"  - {{name: {name}, model: '{models / name}', dataset: '{data / name / 'train.jsonl'}'}}\n"
        for name in ("trec", "sst2")))
    code, _, err = cli("stats", "--candidates", listing, "--out", tmp_path / "listed", *STATS)
    assert code == 0, err
    for name in ("sst2", "trec"):
        assert cache_bytes(tmp_path / "bare" / name) == cache_bytes(tmp_path / "listed" / name)


@pytest.mark.parametrize("args, expected", [
    (["--model", "a=M", "--dataset", "b=D"], "--dataset b=D: no --model is named 'b'"),
    (["--model", "a=M", "--model", "b=M", "--dataset", "a=D"], "--model b=M: no --dataset is named 'b'"),
    (["--model", "a=M", "--model", "a=N", "--dataset", "a=D"], "a second candidate named 'a'"),
    (["--model", "M"], "--dataset: missing"),
    (["--model", "a=M", "--dataset", "a=D", "--candidates", "c.yaml"], "--candidates: list the candidates either"),
])
def test_unpaired_candidates_are_one_line_and_write_nothing(args, expected, cli, tmp_path):
    code, _, err = cli("stats", *args, "--out", tmp_path / "out", *STATS)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [
    ("candidates:\n  - {model: m, dataset: d, task: x}\n", "candidates[0]: unknown field 'task'"),
    ("candidates:\n  - {name: a, model: m}\n", "candidates[0].dataset: missing"),
    ("candidates:\n  - {model: m, dataset: [d]}\n", "candidates[0].dataset: must be a non-empty string"),
    ("candidates:\n  - {name: a, model: m, dataset: d}\n  - {name: a, model: n, dataset: d}\n",
     "candidates[1].name: 'a' names an earlier entry too"),
    ("candidates:\n  - {name: ../up, model: m, dataset: d}\n", "candidates[0].name: '../up' is not a candidate name"),
    ("models: []\n", "must be a mapping with the one key 'candidates'"),
    ("candidates: []\n", "'candidates' must be a non-empty list"),
    ("candidates: [\n", "not valid YAML"),
])
def test_candidate_file_is_parsed_strictly(text, expected, cli, tmp_path):
    listing = tmp_path / "candidates.yaml"
    listing.write_text(text)
    code, _, err = cli("stats", "--candidates", listing, "--out", tmp_path / "out", *STATS)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_every_target_is_checked_before_the_first_candidate_runs(pair, cli, tmp_path):
    (tmp_path / "out" / "beta").mkdir(parents=True)
    (tmp_path / "out" / "beta" / "mine.txt").write_text("keep")
    code, _, err = cli("stats", *flags(pair), "--out", tmp_path / "out", *STATS)
    assert code == 2 and "--overwrite" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["beta"]  # alpha did not run
    assert (tmp_path / "out" / "beta" / "mine.txt").read_text() == "keep"


def test_resume_and_shard_act_per_candidate(pair, cli, tmp_path, caplog):
    """--resume keeps the finished candidates and measures the missing one; --shard I/N writes each
    candidate's share to its shard folder under OUT/NAME, the same as a single run of that candidate writes."""
    code, _, err = cli("stats", *flags(pair), "--out", tmp_path / "out", *STATS, "--checkpoint-every", 1)
    assert code == 0, err
    assert not any(p.name.endswith(".checkpoint") for p in (tmp_path / "out").iterdir())
    kept = (tmp_path / "out" / "alpha" / "manifest.json").read_text()
    beta = cache_bytes(tmp_path / "out" / "beta")
    shutil.rmtree(tmp_path / "out" / "beta")
    code, _, err = cli("stats", *flags(pair), "--out", tmp_path / "out", *STATS, "--resume")
    assert code == 0, err
    assert (tmp_path / "out" / "alpha" / "manifest.json").read_text() == kept  # not measured again
    assert cache_bytes(tmp_path / "out" / "beta") == beta

    code, _, err = cli("stats", *flags(pair), "--out", tmp_path / "shards", *STATS, "--shard", "1/2")
    assert code == 0, err
    model, task = pair["beta"]
    code, _, err = cli("stats", "--model", model, "--dataset", task, "--out", tmp_path / "beta-alone", *STATS,
                       "--shard", "1/2")
    assert code == 0, err
    shard = ShardSpec.parse("1/2").folder_name
    assert cache_bytes(tmp_path / "shards" / "beta" / shard) == cache_bytes(tmp_path / "beta-alone" / shard)
    assert (tmp_path / "shards" / "alpha" / shard / "manifest.json").exists()


def test_several_candidates_are_refused_under_torchrun(pair, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = cli("stats", *flags(pair), "--out", tmp_path / "out", *STATS)
    assert code == 2 and "launch one torchrun per candidate" in err
    assert not (tmp_path / "out").exists()


def test_a_cache_folder_is_not_a_folder_of_candidates(pair, bert_caches, cli, tmp_path):
    shutil.copytree(bert_caches["safetensors"], tmp_path / "cache")
    code, _, err = cli("stats", *flags(pair), "--out", tmp_path / "cache", *STATS)
    assert code == 2 and "is a stats cache itself" in err
