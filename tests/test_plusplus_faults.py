"""RegMean++ at scale and under faults: torchrun ranks against one process, SIGKILL at random points
with --resume, and a checkpoint of other inputs refused."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import faults, processes
from tests.conftest import read_json
from tests.reference import relative_error
from tests.test_scale import run_command

SEED = 20261201


def pairs(models, data) -> list:
    args = []
    for i, (model, dataset) in enumerate(zip(models, data)):
        args += ["--model", f"c{i}={model}", "--dataset", f"c{i}={dataset}"]
    return args


def merge_args(models, data, out, *extra) -> list:
    return ["merge", "--method", "regmean++", *pairs(models, data), "--out", out, "--device", "cpu",
            "--num-examples", 40, "--batch-size", 4, *extra]


def test_two_torchrun_processes_equal_one(workspace, tmp_path):
    """Candidates spread over 2 gloo ranks: the merged model equals one process's to 1e-6 in every tensor,
    and the report lists the same layers and solvers."""
    models = [workspace.model("llama", seed) for seed in (1, 2, 3)]
    data = [workspace.text_task(seed) for seed in (1, 2, 3)]
    run_command(merge_args(models, data, tmp_path / "one"))
    run_command(merge_args(models, data, tmp_path / "two"), torchrun=2)
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    worst = max(relative_error(two[name], one[name].double().numpy()) for name in one)
    assert worst <= 1e-6, worst
    report_one, report_two = read_json(tmp_path / "one" / "merge_report.json"), read_json(tmp_path / "two" / "merge_report.json")
    assert report_two["settings"]["ranks"] == 2
    assert {n: e["solver"] for n, e in report_one["layers"].items()} == \
        {n: e["solver"] for n, e in report_two["layers"].items()}


UNITS = 8  # prefix, 6 blocks, tail


def committed_units(out: Path) -> int:
    try:
        return len(json.loads((out.parent / f".{out.name}.checkpoint" / "state.json").read_text())["units"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def six_blocks(workspace):
    models = [workspace.model("bert", seed, num_hidden_layers=6) for seed in (1, 2)]
    data = [workspace.text_task(seed, n=40) for seed in (1, 2)]
    return models, data


def test_plusplus_killed_at_random_points_resumes_to_the_same_model(six_blocks, tmp_path):
    """SIGKILL at random points of one RegMean++ run (before its first checkpoint, between units, while it
    publishes), each time rerun with --resume --overwrite over an earlier output: the earlier output is
    intact after every kill, and the final model equals an uninterrupted run's bit for bit."""
    models, data = six_blocks
    expected = tmp_path / "expected"
    code, output = processes.run(*merge_args(models, data, expected), log=tmp_path / "expected.log")
    assert code == 0, output
    out = tmp_path / "out"
    code, output = processes.run(*merge_args(models[:1], data[:1], out), log=tmp_path / "earlier.log")
    assert code == 0, output
    earlier = faults.snapshot(out)
    rng = random.Random(SEED)
    targets = [0] + sorted(rng.sample(range(1, UNITS), 3)) + [UNITS]
    args = merge_args(models, data, out, "--checkpoint-every", 1, "--resume", "--overwrite")
    for attempt, target in enumerate(targets):
        with faults.trial("regmean++ killed (SIGKILL) at a random point"):
            run = processes.start(*args, log=tmp_path / f"log{attempt}")
            if target:
                processes.wait_for(lambda: committed_units(out) >= target, run=run)
            else:
                processes.wait_for(lambda: False, timeout=rng.uniform(0.2, 1.5), run=run)
            if not run.alive():
                assert run.wait() == 0, run.output()
                break
            run.kill()
            if run.wait() == 0:  # it finished between the check above and the kill
                break
            assert run.wait() == -signal.SIGKILL
            faults.assert_intact("regmean++ killed (SIGKILL) at a random point", out, earlier)
    code, output = processes.run(*args, log=tmp_path / "final.log")
    assert code == 0, output
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(expected / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not (tmp_path / ".out.checkpoint").exists()


def test_resume_refuses_a_checkpoint_of_other_inputs(six_blocks, tmp_path):
    models, data = six_blocks
    out = tmp_path / "out"
    run = processes.start(*merge_args(models, data, out, "--checkpoint-every", 1), log=tmp_path / "log")
    assert processes.wait_for(lambda: committed_units(out) >= 2, run=run)
    run.kill()
    run.wait()
    code, output = processes.run(*merge_args(models, data, out, "--checkpoint-every", 1, "--resume",
                                             "--reduce-non-diagonal-ratio", 0.9), log=tmp_path / "resume.log")
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "reduce_non_diagonal_ratio" in errors[0], output
    assert not out.exists() and committed_units(out) >= 2
