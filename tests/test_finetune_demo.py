"""Fine-tuning (seeded, recorded, cached) and the demo's own Makefile steps, end to end on tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from regmean_pipeline.testing import make_model, save_model, write_classification_task
from tests.conftest import read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny pretrained body and two learnable tasks with 2 and 3 labels."""
    root = tmp_path_factory.mktemp("tiny_demo")
    base = save_model(make_model("bert", seed=0, architectures=["BertModel"]), root / "base")
    tasks = root / "tasks"
    write_classification_task(tasks / "alpha", ["no", "yes"], n_train=96, n_test=40, seed=1)
    write_classification_task(tasks / "beta", ["x", "y", "z"], n_train=96, n_test=40, seed=2)
    return base, tasks


def finetune(cli, base, tasks, out, *args, names=("alpha", "beta")):
    return cli("finetune", "--base", base, *[f"--task={tasks / name}" for name in names], "--out", out,
               "--device", "cpu", "--batch-size", 8, *args)


def test_finetune_is_seeded_recorded_and_reused(tiny_setup, cli, tmp_path):
    base, tasks = tiny_setup
    recipe = ("--steps", 30, "--learning-rate", 3e-3)
    code, out, err = finetune(cli, base, tasks, tmp_path / "one", *recipe)
    assert code == 0, err
    assert "alpha: test accuracy" in out and "beta: test accuracy" in out
    record = read_json(tmp_path / "one" / "beta" / "finetune.json")
    assert record["recipe"]["settings"]["steps"] == 30 and record["labels"] == ["x", "y", "z"]
    assert record["test"]["total"] == 40
    assert record["train_loss"]["last_20_steps"] < record["train_loss"]["first_10_steps"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "one" / "beta"))
    assert model.config.num_labels == 3 and model.config.id2label[2] == "z"

    code, _, err = finetune(cli, base, tasks, tmp_path / "two", *recipe, names=["beta"])  # same seed, same weights
    assert code == 0, err
    assert (tmp_path / "one" / "beta" / "model.safetensors").read_bytes() == \
           (tmp_path / "two" / "beta" / "model.safetensors").read_bytes()

    before = (tmp_path / "one" / "alpha" / "finetune.json").read_text()
    code, out, err = finetune(cli, base, tasks, tmp_path / "one", *recipe)  # cached: nothing retrained
    assert code == 0, err
    assert (tmp_path / "one" / "alpha" / "finetune.json").read_text() == before

    changed = ("--steps", 31, "--learning-rate", 3e-3)
    code, _, err = finetune(cli, base, tasks, tmp_path / "one", *changed, names=["alpha"])
    assert code == 2 and "--overwrite" in err and "alpha" in err
    assert (tmp_path / "one" / "alpha" / "finetune.json").read_text() == before
    code, _, err = finetune(cli, base, tasks, tmp_path / "one", *changed, "--overwrite", names=["alpha"])
    assert code == 0, err
    assert read_json(tmp_path / "one" / "alpha" / "finetune.json")["recipe"]["settings"]["steps"] == 31


def test_finetune_freeze_keeps_parameters_at_the_base(tiny_setup, cli, tmp_path):
    base, tasks = tiny_setup
    code, _, err = cli("finetune", "--base", base, "--task", tasks / "alpha", "--out", tmp_path, "--device", "cpu",
                       "--steps", 3, "--freeze", r"bert\.embeddings\..*")
    assert code == 0, err
    from safetensors.torch import load_file

    tuned, pre = load_file(str(tmp_path / "alpha" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert (tuned["bert.embeddings.word_embeddings.weight"] == pre["embeddings.word_embeddings.weight"]).all()
    assert not (tuned["bert.pooler.dense.weight"] == pre["pooler.dense.weight"]).all()
    code, _, err = cli("finetune", "--base", base, "--task", tasks / "alpha", "--out", tmp_path / "x", "--freeze", ".*")
    assert code == 2 and "freezes every parameter" in err


def test_make_demo_steps_end_to_end_on_tiny_models(tiny_setup, cli, tmp_path):
    """The Makefile's own demo steps (tasks, finetune with a validation split, stats with the Fisher, merge,
    RegMean++, the other methods, a sweep, eval) on a tiny base and two tasks."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed; the demo is driven by the Makefile")
    base, tasks = tiny_setup
    demo = tmp_path / "demo"
    grid = tmp_path / "grid.yaml"
    grid.write_text("- method: regmean\n  reduce_non_diagonal_ratio: [0.5, 0.95]\n- method: ties\n")
    command = ["make", "--no-print-directory", "-C", str(ROOT), "demo-steps", f"VENV={sys.prefix}",
               f"DEMO_DIR={demo}", f"DEMO_DATA={tasks}", "DEMO_TASKS=alpha beta", f"DEMO_BASE={base}",
               "DEMO_SCALINGS=0.5", "FINETUNE_ARGS=--steps 12 --batch-size 8 --device cpu --quiet --validation-fraction 0.2",
               "MERGE_ARGS=--device cpu", f"SWEEP_ARGS=--grid {grid} --device cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "REGMEAN_DEBUG": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 9):
        assert f"== {step}/8" in result.stdout
    results = read_json(demo / "eval" / "results.json")
    assert list(results["methods"]) == ["individual", "average", "task-arithmetic-0.5", "ties", "dare", "fisher",
                                        "regmean", "regmean++", "sweep"]
    assert not (tasks / "alpha" / "validation.jsonl").exists()  # the demo's own copies got the validation splits
    assert (demo / "tasks" / "alpha" / "validation.jsonl").exists()
    sweep = read_json(demo / "sweep" / "sweep.json")
    assert len(sweep["points"]) == 3 and "chosen on validation" in result.stdout
    assert "best grid point on the test sets" in result.stdout
    assert [t["name"] for t in results["tasks"]] == ["alpha", "beta"]
    scored = ("accuracy", "correct", "total")
    for task in ("alpha", "beta"):  # the candidates' own scores are taken from their fine-tuning records
        recorded = read_json(demo / "candidates" / task / "finetune.json")["test"]
        individual = results["methods"]["individual"]["per_task"][task]
        assert individual["reused"] is True and individual["key"] == recorded["key"]
        assert {k: individual[k] for k in scored} == {k: recorded[k] for k in scored}
    assert results["reused_scores"] == 2 and "reused" not in results["methods"]["regmean"]["per_task"]["alpha"]
    regmean = results["methods"]["regmean"]
    assert regmean["average"] == pytest.approx(sum(v["accuracy"] for v in regmean["per_task"].values()) / 2)
    assert read_json(demo / "merged" / "task_arithmetic_0.5" / "merge_report.json")["settings"]["scaling"] == 0.5
    assert (demo / "eval" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (demo / "eval" / "results.md").read_text()
    assert table.splitlines()[0] == "| method | alpha | beta | average | vs. individual |"
    assert table in result.stdout and str(demo / "eval" / "accuracy.png") in result.stdout
    for method in ("regmean", "regmean_plusplus"):
        assert json.loads((demo / "merged" / method / "per_candidate" / "beta" / "config.json").read_text())[
            "id2label"] == {"0": "x", "1": "y", "2": "z"}
    assert read_json(demo / "merged" / "regmean_plusplus" / "merge_report.json")["settings"]["method"] == "regmean++"


def test_eval_reuses_scores_only_for_unchanged_models(tiny_setup, cli, tmp_path):
    """Scores are recomputed without --reuse-scores and equal the recorded ones (the same computation);
    with it, a rerun scores nothing again, and a model whose weights changed is scored again."""
    base, tasks = tiny_setup
    code, _, err = finetune(cli, base, tasks, tmp_path / "cands", "--steps", 20, "--learning-rate", 3e-3)
    assert code == 0, err
    for name in ("alpha", "beta"):  # a second method: copies of the candidates, one of them changed below
        shutil.copytree(tmp_path / "cands" / name, tmp_path / "copies" / name)
        (tmp_path / "copies" / name / "finetune.json").unlink()

    def evaluate(out, *args):
        code, _, err = cli("eval", "--task", tasks / "alpha", "--task", tasks / "beta", "--device", "cpu",
                           "--method", f"individual={tmp_path / 'cands'}", "--method", f"copies={tmp_path / 'copies'}",
                           "--out", out, *args)
        assert code == 0, err
        return read_json(out / "results.json")

    fresh = evaluate(tmp_path / "fresh")
    assert fresh["reused_scores"] == 0
    for name in ("alpha", "beta"):
        recorded = read_json(tmp_path / "cands" / name / "finetune.json")["test"]
        assert fresh["methods"]["individual"]["per_task"][name] == recorded
        assert fresh["methods"]["copies"]["per_task"][name]["key"]["model"] == recorded["key"]["model"]

    first = evaluate(tmp_path / "eval", "--reuse-scores")
    assert first["reused_scores"] == 4  # the copies have the candidates' files, so the records' keys match
    again = evaluate(tmp_path / "eval", "--reuse-scores", "--overwrite")
    assert again["reused_scores"] == 4

    from safetensors.torch import load_file, save_file

    weights_path = tmp_path / "copies" / "beta" / "model.safetensors"
    weights = load_file(str(weights_path))
    weights = {k: (-v if k.startswith("classifier.") else v) for k, v in weights.items()}  # flip the head
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    changed = evaluate(tmp_path / "eval", "--reuse-scores", "--overwrite")
    assert changed["reused_scores"] == 3
    beta = changed["methods"]["copies"]["per_task"]["beta"]
    assert "reused" not in beta and beta["key"]["model"] != fresh["methods"]["copies"]["per_task"]["beta"]["key"]["model"]
    assert beta["correct"] != fresh["methods"]["copies"]["per_task"]["beta"]["correct"]
    other = evaluate(tmp_path / "eval", "--reuse-scores", "--overwrite", "--max-length", 16)
    assert other["reused_scores"] == 0  # other settings, other keys
