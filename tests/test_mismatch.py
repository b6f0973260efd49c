"""Candidates that do not fit together are refused before any Gram is read.

To show the order, candidate a's first Gram is damaged in every case: had the merge read a Gram
before checking, the error would be a checksum mismatch instead of the mismatch named here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from regmean_pipeline.testing import VOCAB_SIZE
from stages.stats import StatsOptions, run_stats
from tests import faults

FAULT = "mismatched candidates (found before heavy work)"


@pytest.fixture(scope="module")
def built(workspace, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mismatch")
    models = {"a": workspace.model("bert", 1), "b": workspace.model("bert", 2), "gpt2": workspace.model("gpt2", 1),
              "vocab": workspace.model("bert", 3, vocab_size=VOCAB_SIZE + 5),
              "hidden": workspace.model("bert", 4, hidden_size=48)}
    for name, model in models.items():
        run_stats(StatsOptions(model=str(model), dataset=str(workspace.text_task(1)), out=str(root / name),
                               device="cpu", progress=False, num_examples=8))
    return root


def cache_dir(built: Path, tmp_path: Path, *names: str) -> Path:
    """a (a copy, its first Gram damaged) plus the named caches."""
    caches = tmp_path / "caches"
    shutil.copytree(built / "a", caches / "a")
    key = next(iter(json.loads((caches / "a" / "manifest.json").read_text())["grams"]))
    chunk = caches / "a" / "grams.zarr" / key / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    for name in names:
        shutil.copytree(built / name, caches / name)
    return caches


def edit(manifest_path: Path, change) -> None:
    manifest = json.loads(manifest_path.read_text())
    change(manifest)
    manifest_path.write_text(json.dumps(manifest))


def drop_layer(manifest: dict) -> None:
    name = "bert.encoder.layer.1.output.dense"  # fed by its own input: its Gram goes with it
    gram = manifest["layers"].pop(name)["gram"]
    manifest["grams"].pop(gram)


def expect_refusal(cli, tmp_path, args, *words):
    out = tmp_path / "merged"
    with faults.trial(FAULT):
        code, _, err = cli("merge", *args, "--out", out, "--device", "cpu")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "checksum" not in lines[0] and all(w in lines[0] for w in words), lines[0]
        assert not out.exists()


def test_other_architecture(built, cli, tmp_path):
    caches = cache_dir(built, tmp_path, "gpt2")
    expect_refusal(cli, tmp_path, ["--cache-dir", caches], "candidate gpt2", "GPT2ForSequenceClassification")


def test_other_vocabulary(built, cli, tmp_path):
    caches = cache_dir(built, tmp_path, "vocab")
    expect_refusal(cli, tmp_path, ["--cache-dir", caches], "candidate vocab", f"vocab_size = {VOCAB_SIZE + 5}",
                   f"has {VOCAB_SIZE}")


def test_other_hidden_size(built, cli, tmp_path):
    caches = cache_dir(built, tmp_path, "hidden")
    expect_refusal(cli, tmp_path, ["--cache-dir", caches], "candidate hidden", "hidden_size = 48", "has 32")


def test_missing_layer(built, cli, tmp_path):
    caches = cache_dir(built, tmp_path, "b")
    edit(caches / "b" / "manifest.json", drop_layer)
    expect_refusal(cli, tmp_path, ["--cache-dir", caches], "candidate b", "no Gram for layer",
                   "bert.encoder.layer.1.output.dense")


def test_grams_of_other_weights(built, workspace, cli, tmp_path):
    caches = cache_dir(built, tmp_path, "b")
    expect_refusal(cli, tmp_path, ["--cache-dir", caches, "--model", f"b={workspace.model('bert', 3)}"],
                   "candidate b", "other weights", "fingerprint")


def test_duplicate_candidate_names(built, cli, tmp_path):
    caches = cache_dir(built, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    shutil.copytree(built / "b", tmp_path / "elsewhere" / "a")
    expect_refusal(cli, tmp_path, ["--cache", caches / "a", "--cache", tmp_path / "elsewhere" / "a"],
                   "candidate name 'a' is used twice")


def test_cache_format_from_the_future(built, cli, tmp_path):
    caches = cache_dir(built, tmp_path, "b")
    edit(caches / "b" / "manifest.json", lambda m: m.update(version=3))
    expect_refusal(cli, tmp_path, ["--cache-dir", caches], "b/manifest.json", "version 3 is newer", "upgrade")
