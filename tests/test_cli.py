"""The regmean command end to end: real processes, configs, and one-line errors that damage nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

from regmean_pipeline.cache.store import array_checksum
from tests.conftest import read_json

REGMEAN = str(Path(sys.executable).with_name("regmean"))
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(*args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([REGMEAN, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_console_script_two_candidates_end_to_end(workspace, tmp_path):
    assert "stats" in run("--help").stdout and "merge" in run("--help").stdout
    assert "--num-examples" in run("stats", "--help").stdout
    for name, seed in (("a", 1), ("b", 2)):
        run("stats", "--model", workspace.model("bert", seed), "--dataset", workspace.text_task(seed),
            "--text-column", "text", "--out", tmp_path / "outputs" / name, "--num-examples", 16)
    result = run("merge", "--cache-dir", tmp_path / "outputs", "--out", tmp_path / "merged")
    assert "merge: 2 candidates" in result.stderr
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 9, 10, 3]])).logits).all()
    manifest = read_json(tmp_path / "outputs" / "a" / "manifest.json")
    assert manifest["format"] == "regmean-stats" and manifest["examples"] == 16
    assert manifest["model"]["architecture"] == "BertForSequenceClassification"
    assert manifest["dataset"]["text_column"] == "text" and manifest["include_padding"] is False


def test_version_is_the_package_version_and_no_arguments_still_show_help():
    from typer.testing import CliRunner

    from regmean_pipeline import __version__
    from stages.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"regmean-pipeline {__version__}\n"
    bare = CliRunner().invoke(app, [])
    assert "Usage:" in bare.stdout and "stats" in bare.stdout and "--version" in bare.stdout


    from regmean_pipeline.config import load_config
    from regmean_pipeline.merge.methods.registry import config_keys

    clip, gpt2, bert = (yaml.safe_load((CONFIGS / f"{n}_regmean.yaml").read_text()) for n in ("clip", "gpt2", "bert"))
    assert clip["reduce_non_diagonal_ratio"] == 0.95 and clip["dataloader_kwargs"]["batch_size"] == 32
    assert clip["weight_transpose"] is True and gpt2["weight_transpose"] is False
    assert gpt2["reduce_non_diagonal_ratio"] == 0.6 and gpt2["cache_dir"] == "outputs"
    assert bert["exclude_param_names_regex"] == [r"classifier\..*"]
    for config in (clip, gpt2, bert):
        assert config["num_regmean_examples"] == 256
    assert load_config(CONFIGS / "clip_regmean.yaml", config_keys())["batch_size"] == 32


def test_config_values_apply_and_flags_override(workspace, cli, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"num_regmean_examples": 8, "reduce_non_diagonal_ratio": 0.5,
                                      "dataloader_kwargs": {"batch_size": 4}, "cache_dir": str(tmp_path / "out"),
                                      "exclude_param_names_regex": [r"classifier\..*"]}))
    model = workspace.model("bert", 1)
    code, _, err = cli("stats", "--model", model, "--dataset", workspace.text_task(1), "--config", config)
    assert code == 0, err
    assert read_json(tmp_path / "out" / model.name / "manifest.json")["examples"] == 8  # config; default out
    code, _, err = cli("stats", "--model", workspace.model("bert", 2), "--dataset", workspace.text_task(2),
                       "--config", config, "--num-examples", 5)
    assert code == 0, err
    assert read_json(tmp_path / "out" / workspace.model("bert", 2).name / "manifest.json")["examples"] == 5
    code, _, err = cli("merge", "--config", config, "--out", tmp_path / "m", "--reduce-non-diagonal-ratio", 0.7)
    assert code == 0, err
    settings = read_json(tmp_path / "m" / "merge_report.json")["settings"]
    assert settings["reduce_non_diagonal_ratio"] == 0.7 and settings["exclude"] == [r"classifier\..*"]


def test_unknown_config_key_is_named(cli, tmp_path, workspace):
    config = tmp_path / "c.yaml"
    config.write_text("num_regmean_exmaples: 8\n")
    code, _, err = cli("stats", "--model", workspace.model("bert", 1), "--dataset", workspace.text_task(1),
                       "--out", tmp_path / "x", "--config", config)
    assert code == 2 and "num_regmean_exmaples" in err and str(config) in err


@pytest.fixture
def two_caches(workspace, cli, tmp_path):
    caches = tmp_path / "caches"
    for name, seed, fmt in (("a", 1, "zarr"), ("b", 2, "safetensors")):
        code, _, err = cli("stats", "--model", workspace.model("bert", seed), "--dataset", workspace.text_task(seed),
                           "--out", caches / name, "--format", fmt, "--device", "cpu")
        assert code == 0, err
    return caches


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_tokens(caches):
    manifest = read_json(caches / "b" / "manifest.json")
    key = next(iter(manifest["grams"]))
    manifest["grams"][key]["tokens"] += 1
    (caches / "b" / "manifest.json").write_text(json.dumps(manifest))
    return key


def _truncate(caches):
    path = caches / "b" / "grams.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "grams.safetensors"


def _nan_gram(caches):
    import zarr

    manifest = read_json(caches / "a" / "manifest.json")
    key = next(iter(manifest["grams"]))
    array = zarr.open_group(str(caches / "a" / "grams.zarr"), mode="r+")[key]
    values = array[...]
    values[3] = np.nan
    array[...] = values
    manifest["grams"][key]["checksum"] = array_checksum(key, manifest["grams"][key]["tokens"], values)
    (caches / "a" / "manifest.json").write_text(json.dumps(manifest))  # a consistent, but poisoned, cache
    return "NaN or Inf"


@pytest.mark.parametrize("damage, expected", [(_edit_tokens, "checksum mismatch"), (_truncate, "grams.safetensors"),
                                              (_nan_gram, "NaN or Inf")])
def test_damaged_caches_are_refused_and_nothing_is_overwritten(damage, expected, two_caches, cli, tmp_path):
    out = tmp_path / "merged"
    code, _, err = cli("merge", "--cache-dir", two_caches, "--out", out)
    assert code == 0, err
    before = snapshot(out)
    detail = damage(two_caches)
    code, stdout, err = cli("merge", "--cache-dir", two_caches, "--out", out, "--overwrite")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and detail in lines[0]
    assert "Traceback" not in err + stdout
    assert snapshot(out) == before  # the earlier merge is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.") and p.name != ".merged.lock"] == []  # no staging left


def test_cache_of_another_architecture_is_named(two_caches, workspace, cli, tmp_path):
    code, _, err = cli("stats", "--model", workspace.model("gpt2", 1), "--dataset", workspace.text_task(3),
                       "--out", two_caches / "c")
    assert code == 0, err
    code, _, err = cli("merge", "--cache-dir", two_caches, "--out", tmp_path / "m")
    assert code == 2 and "candidate c" in err and "GPT2ForSequenceClassification" in err
    assert not (tmp_path / "m").exists()


def test_weights_other_than_the_cache_are_detected(two_caches, workspace, cli, tmp_path):
    code, _, err = cli("merge", "--cache-dir", two_caches, "--out", tmp_path / "m", "--model", f"a={workspace.model('bert', 3)}")
    assert code == 2 and "candidate a" in err and "fingerprint" in err


@pytest.mark.parametrize("args, expected", [
    (("--model", "/nope/model"), "model /nope/model: no such folder"),
    (("--text-column", "sentence"), "no column 'sentence' for --text-column"),
    (("--dataset", "EMPTY"), "empty file"),
    (("--num-examples", "0"), "--num-examples"),
    (("--format", "hdf5"), "--format"),
])
def test_bad_stats_input_gives_one_line(args, expected, workspace, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = {"--model": str(workspace.model("bert", 1)), "--dataset": str(workspace.text_task(1)),
            "--out": str(tmp_path / "existing")}
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    given = dict(zip(args[::2], args[1::2]))
    if given.get("--dataset") == "EMPTY":
        given["--dataset"] = str(empty)
    merged = {**base, **given}
    result = run("stats", *[x for kv in merged.items() for x in kv], "--overwrite", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "existing" / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path, workspace):
    result = run("stats", "--model", "/nope", "--dataset", workspace.text_task(1), "--out", tmp_path / "x", "--debug",
                 check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_existing_output_needs_overwrite(two_caches, cli, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = cli("merge", "--cache-dir", two_caches, "--out", tmp_path / "m")
    assert code == 2 and "--overwrite" in err

