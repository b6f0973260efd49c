"""`regmean sweep` end to end on tiny models, its shared RegMean solves against separate merges, the
validation split finetune holds out, trace weighting, resuming, and the refusals of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from regmean_pipeline.merge.methods.task_vectors import stream_key  # noqa: F401  (the registry is importable)
from regmean_pipeline.tasks.validation import held_out, read_rows, row_identity
from regmean_pipeline.testing import make_model, save_model, write_classification_task
from tests.conftest import read_json
from tests.faults import trial

HEAD = r"classifier\..*"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base, two learnable tasks, a candidate per task fine-tuned with a validation split held
    out, and each candidate's Gram and Fisher cache over its training rows."""
    from typer.testing import CliRunner

    from stages.cli import app

    root = tmp_path_factory.mktemp("sweep")
    base = save_model(make_model("bert", seed=0, architectures=["BertModel"]), root / "base")
    tasks = {name: write_classification_task(root / "tasks" / name, labels, n_train=120, n_test=40, seed=seed)
             for seed, (name, labels) in enumerate((("alpha", ["no", "yes"]), ("beta", ["x", "y", "z"])), start=1)}
    runner = CliRunner()

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args] + ["--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        return result

    cli("finetune", "--base", base, *[f"--task={folder}" for folder in tasks.values()], "--out", root / "candidates",
        "--device", "cpu", "--batch-size", 8, "--steps", 25, "--learning-rate", 3e-3, "--validation-fraction", 0.2)
    for name in tasks:
        cli("stats", "--model", root / "candidates" / name, "--dataset", tasks[name] / "train.jsonl",
            "--out", root / "caches" / name, "--device", "cpu", "--statistics", "gram,fisher", "--batch-size", 8)
    return root, base, tasks


def test_finetune_holds_the_validation_rows_out_of_training(setup):
    root, _, tasks = setup
    for name, folder in tasks.items():
        record = read_json(root / "candidates" / name / "finetune.json")
        held = record["validation"]
        train, validation = read_rows(folder / "train.jsonl"), read_rows(folder / "validation.jsonl")
        assert held["rows"] == len(validation) > 0 and held["train_rows"] + held["rows"] == len(train)
        assert [row_identity(r) for r in validation] == \
            [row_identity(r) for r in train if held_out(r, 0.2, 0)]  # the seeded rule, in file order
        assert record["recipe"]["settings"]["validation_fraction"] == 0.2


def sweep(cli, setup, out, *args):
    root, base, tasks = setup
    return cli("sweep", "--cache-dir", root / "caches", *[f"--task={n}={f}" for n, f in tasks.items()],
               "--pretrained", base, "--exclude", HEAD, "--out", out, "--device", "cpu", *args)


def test_a_sweep_chooses_on_validation_and_publishes_the_best(setup, cli, tmp_path):
    root, base, tasks = setup
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([
        {"method": "regmean", "reduce_non_diagonal_ratio": [0.5, 0.95], "gram_weighting": ["equal", "trace"]},
        {"method": "ties", "scaling": [0.3, 1.0]},
        {"method": "fisher"},
        {"method": "average"},
    ]))
    code, printed, err = sweep(cli, setup, tmp_path / "out", "--grid", grid, "--score-test")
    assert code == 0, err
    result = read_json(tmp_path / "out" / "sweep.json")
    assert len(result["points"]) == 8 and "chosen: #" in printed
    for point in result["points"]:
        assert set(point["validation"]) == set(tasks) and set(point["test"]) == set(tasks)
        own = result["individual_validation"]
        ratios = [point["validation"][t]["accuracy"] / own[t]["accuracy"] for t in tasks]
        assert point["objective"] == pytest.approx(np.exp(np.mean(np.log(ratios))))  # their geometric mean
        assert point["validation"]["alpha"]["total"] == result["validation"]["alpha"]["rows"]
    best = result["best"]
    assert result["points"][best]["objective"] == max(p["objective"] for p in result["points"])
    chosen = tmp_path / "out" / "best"
    report = read_json(chosen / "merge_report.json")
    assert report["settings"]["method"] == result["points"][best]["method"]
    assert sorted(report["per_candidate"]) == sorted(tasks)
    card = (chosen / "README.md").read_text()
    assert "Chosen by `regmean sweep`" in card and "validation" in card
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert table.count("\n") >= 10 and "**" in table


def test_shared_regmean_solves_equal_separate_merges(setup, cli, tmp_path):
    """The sweep's RegMean points, read once and solved from shared sums, against `regmean merge` with the
    same settings (float32 sums in another order: 1e-5)."""
    from regmean_pipeline.io.safetensors_io import ShardedCheckpointWriter
    from regmean_pipeline.merge.methods.registry import get_method
    from regmean_pipeline.merge.plan import MergeSettings, SolveSettings, plan_merge
    from regmean_pipeline.merge.shared_solves import execute_regmean_points
    from stages.merge import open_candidates
    from stages.merge_options import MergeOptions

    root, _, _ = setup
    settings = [SolveSettings(a, w) for a in (0.0, 0.5, 1.0) for w in ("equal", "tokens", "trace")]
    candidates = open_candidates(MergeOptions(out="", cache_dir=str(root / "caches")), get_method("regmean"))
    plan = plan_merge(candidates, MergeSettings([HEAD], 1 << 30, settings[0], "gram"))
    folders = [tmp_path / f"p{i}" for i in range(len(settings))]
    writers = []
    for folder in folders:
        folder.mkdir()
        writers.append(ShardedCheckpointWriter(folder, plan.outputs, 1 << 40))
    execute_regmean_points(plan, candidates, settings, [w.write for w in writers], device=torch.device("cpu"),
                           progress=False)
    for writer in writers:
        writer.close()
    for solve, folder in zip(settings, folders):
        code, _, err = cli("merge", "--cache-dir", root / "caches", "--exclude", HEAD, "--out", tmp_path / "m",
                           "--reduce-non-diagonal-ratio", solve.reduce_non_diagonal_ratio, "--gram-weighting",
                           solve.gram_weighting, "--device", "cpu", "--overwrite")
        assert code == 0, err
        ours, separate = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "m" / "model.safetensors"))
        for name, tensor in separate.items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{solve} {name}")


def test_trace_weighting_divides_each_gram_by_its_trace(setup, cli, tmp_path):
    """With a = 1: sum_i G_i/tr(G_i) W_i solved, against the float64 formula from the caches."""
    from regmean_pipeline.cache.store import StatsCache

    root, _, tasks = setup
    code, _, err = cli("merge", "--cache-dir", root / "caches", "--exclude", HEAD, "--out", tmp_path / "m",
                       "--reduce-non-diagonal-ratio", 1.0, "--gram-weighting", "trace", "--solve-dtype", "float64",
                       "--device", "cpu")
    assert code == 0, err
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    caches = [StatsCache(root / "caches" / name) for name in sorted(tasks)]
    states = [load_file(str(root / "candidates" / name / "model.safetensors")) for name in sorted(tasks)]
    for layer, entry in caches[0].manifest.layers.items():
        if entry.weight.startswith("classifier."):
            continue
        grams = [c.gram(entry.gram).double() for c in caches]
        scaled = [g / torch.trace(g) for g in grams]
        expected = torch.linalg.solve(sum(scaled), sum(g @ s[entry.weight].double().T for g, s in zip(scaled, states)))
        torch.testing.assert_close(merged[entry.weight].double(), expected.T, rtol=1e-4, atol=1e-6, msg=layer)


def test_a_killed_sweep_resumes_without_redoing_finished_points(setup, cli, tmp_path, monkeypatch):
    from stages import sweep as sweep_stage

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"method": "average"}, {"method": "ties", "scaling": [0.3, 0.6]}]))
    merges = []
    original = sweep_stage.run_merge

    def failing(options):
        merges.append(options.method)
        if len(merges) == 2:
            raise KeyboardInterrupt
        return original(options)

    monkeypatch.setattr(sweep_stage, "run_merge", failing)
    code, _, _ = sweep(cli, setup, tmp_path / "out", "--grid", grid)
    assert code == 130
    assert len(read_json(tmp_path / "out" / "sweep.json")["points"]) == 1
    merges.clear()
    monkeypatch.setattr(sweep_stage, "run_merge", lambda options: (merges.append(options.method), original(options)))
    code, _, err = sweep(cli, setup, tmp_path / "out", "--grid", grid)
    assert code == 0, err
    # the first point is reused: two merges are left to do, and one more makes the chosen merge
    assert merges == ["ties", "ties", read_json(tmp_path / "out" / "sweep.json")["points"][
        read_json(tmp_path / "out" / "sweep.json")["best"]]["method"]]


@pytest.mark.parametrize("grid, message", [
    ([], "the grid is empty"),
    ([{"method": "ties", "reduce_non_diagonal_ratio": [0.5]}], "only --method regmean, regmean++ use it (not ties)"),
    ([{"method": "ties", "density": [0.5, 2.0]}], "must lie in (0, 1], got 2.0"),
    ([{"method": "mean"}], "'mean' is not one of"),
    ([{"scaling": [1.0]}], "must be a mapping with a 'method'"),
])
def test_a_bad_grid_is_one_line_before_any_merge(setup, cli, tmp_path, grid, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    with trial("bad sweep input (grid, validation split, labels)"):
        code, _, err = sweep(cli, setup, tmp_path / "out", "--grid", path)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out" / "best").exists()


def test_tasks_without_validation_overlapping_or_with_other_labels_are_refused(setup, cli, tmp_path):
    root, base, tasks = setup
    copies = {name: shutil.copytree(folder, tmp_path / "tasks" / name) for name, folder in tasks.items()}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"method": "average"}]))

    def refused(message, folders):
        with trial("bad sweep input (grid, validation split, labels)"):
            code, _, err = cli("sweep", "--cache-dir", root / "caches", *[f"--task={n}={f}" for n, f in folders.items()],
                               "--exclude", HEAD, "--out", tmp_path / "out", "--grid", grid)
            assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err

    kept = (copies["alpha"] / "validation.jsonl").read_text()
    (copies["alpha"] / "validation.jsonl").unlink()
    refused("task alpha: no validation.jsonl", copies)
    (copies["alpha"] / "validation.jsonl").write_text(kept)
    trained = [row for row in read_rows(copies["beta"] / "train.jsonl") if not held_out(row, 0.2, 0)][:3]
    (copies["beta"] / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in trained))
    refused("3 rows of", copies)
    (copies["beta"] / "validation.jsonl").write_text(json.dumps({"text": "a b", "label": 0}) + "\n")
    labels = json.loads((copies["beta"] / "labels.json").read_text())
    (copies["beta"] / "labels.json").write_text(json.dumps({**labels, "labels": ["x", "y"]}))
    refused("has 3 labels but task beta", copies)


def test_the_normalized_objective_does_not_reward_keeping_one_task_and_losing_the_others():
    """Loss ratios own/merged are at most 1 and near 0 for a lost task: their arithmetic mean prefers a merge
    that keeps one task, their geometric mean (the default) the one that keeps all of them somewhat."""
    from regmean_pipeline.errors import RegMeanError
    from regmean_pipeline.sweep.objective import objective_value

    own = {t: {"loss": 0.2} for t in ("a", "b", "c")}
    lopsided = {"a": {"loss": 0.25}, "b": {"loss": 8.0}, "c": {"loss": 8.0}}
    balanced = {"a": {"loss": 1.5}, "b": {"loss": 1.5}, "c": {"loss": 1.5}}
    assert objective_value(lopsided, own, "arithmetic") > objective_value(balanced, own, "arithmetic")
    assert objective_value(balanced, own, "normalized") > objective_value(lopsided, own, "normalized")
    assert objective_value(balanced, own, "mean") == pytest.approx(-1.5)
    accuracy = {"a": {"accuracy": 0.9}}
    assert objective_value(accuracy, {"a": {"accuracy": 0.9}}, "normalized") == pytest.approx(1.0)
    with pytest.raises(RegMeanError, match="--objective"):
        objective_value(accuracy, {"a": {"accuracy": 0.0}}, "normalized")
