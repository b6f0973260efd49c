"""Processes killed with SIGKILL at random points, two runs on one output, a full disk.

Every run here is a real OS process running the real CLI (tests/processes.py); kills are real
SIGKILLs, the disk fills up through RLIMIT_FSIZE, and every check reads the files left on disk.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.checkpoint import checkpoint_folder
from stages.merge import discover_caches
from tests import faults, processes
from tests.test_cli import REGMEAN

SEED = 20261127
BATCHES = 60  # of 2 examples each
STATS_ARGS = ("--num-examples", 2 * BATCHES, "--batch-size", 2, "--device", "cpu", "--format", "zarr")


def stats_args(workspace, out: Path, *extra) -> list:
    return ["stats", "--model", workspace.model("bert", 1), "--dataset", workspace.text_task(31, n=2 * BATCHES),
            "--out", out, *STATS_ARGS, *extra]


def checkpoint_batches(out: Path) -> int:
    """Batches covered by the newest checkpoint on disk (0 if none)."""
    folder = checkpoint_folder(out)
    done = [int(p.name.split("-")[1]) for p in folder.glob("batches-*")] if folder.is_dir() else []
    return max(done, default=0)


def phase_at_kill(out: Path) -> str:
    if any(out.parent.glob(f".{out.name}.partial-*")):
        return "publishing the cache"
    if checkpoint_folder(out).is_dir() and any(checkpoint_folder(out).glob(".batches-*.partial-*")):
        return "writing a checkpoint"
    return "between checkpoints" if checkpoint_batches(out) else "before the first checkpoint"


def assert_no_cache_merge_accepts(out: Path) -> None:
    assert not out.exists()
    with pytest.raises(RegMeanError, match="no subfolder holds a manifest.json"):
        discover_caches(str(out.parent), [])
    for generation in checkpoint_folder(out).glob("batches-*"):
        with pytest.raises(RegMeanError, match="checkpoint of an unfinished"):
            StatsCache(generation)


def assert_same_cache(actual: Path, expected: Path, tolerance: float = 1e-6) -> float:
    ours, theirs = StatsCache(actual), StatsCache(expected)
    assert ours.manifest.examples == theirs.manifest.examples
    assert ours.manifest.layers == theirs.manifest.layers
    assert {k: e.tokens for k, e in ours.manifest.grams.items()} == {k: e.tokens for k, e in theirs.manifest.grams.items()}
    worst = 0.0
    for key in theirs.manifest.grams:
        a, b = ours.read_packed(key).astype(np.float64), theirs.read_packed(key).astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    assert worst <= tolerance, worst
    return worst


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "a"
    code, output = processes.run(*stats_args(workspace, out), log=out.parent / "log")
    assert code == 0, output
    return out


def test_stats_killed_at_random_points_resumes_to_the_same_cache(workspace, uninterrupted, tmp_path):
    """SIGKILL at random points of one stats run (before any checkpoint, between and during checkpoint
    writes, while publishing), each time resumed with --resume: no kill leaves a cache merge accepts,
    and the final cache equals the uninterrupted run's to 1e-6 (it is in fact bit for bit)."""
    rng = random.Random(SEED)
    out = tmp_path / "caches" / "a"
    out.parent.mkdir()
    # Kill points: some time after the start, then after a random checkpoint, then after the last one.
    targets = [0] + sorted(rng.sample(range(1, BATCHES), 5)) + [BATCHES]
    phases = []
    for attempt, target in enumerate(targets):
        with faults.trial("stats killed (SIGKILL) at a random point"):
            run = processes.start(*stats_args(workspace, out, "--checkpoint-every", 1, "--resume"),
                                  log=tmp_path / f"log{attempt}")
            if target:
                processes.wait_for(lambda: checkpoint_batches(out) >= target, run=run)
            else:
                processes.wait_for(lambda: False, timeout=rng.uniform(0.2, 1.5), run=run)
            processes.wait_for(lambda: False, timeout=rng.uniform(0, 0.02), run=run)
            if not run.alive():
                assert run.wait() == 0, run.output()
                phases.append("finished before the kill")
                break
            run.kill()
            if run.wait() == 0:  # it finished between the check above and the kill
                phases.append("finished before the kill")
                break
            phases.append(phase_at_kill(out))
            assert run.wait() == -signal.SIGKILL
            assert_no_cache_merge_accepts(out)
    code = processes.start(*stats_args(workspace, out, "--checkpoint-every", 1, "--resume"),
                           log=tmp_path / "final").wait()
    assert code == 0, (tmp_path / "final").read_text()
    print("kill points:", list(zip(targets, phases)))
    assert assert_same_cache(out, uninterrupted) <= 1e-6
    assert not checkpoint_folder(out).exists()  # cleaned up once the cache is published
    assert [p.name for p in out.parent.iterdir() if p.name != ".a.lock"] == ["a"]


def test_resume_refuses_a_checkpoint_of_other_inputs(workspace, tmp_path):
    out = tmp_path / "a"
    run = processes.start(*stats_args(workspace, out, "--checkpoint-every", 2), log=tmp_path / "log")
    assert processes.wait_for(lambda: checkpoint_batches(out) >= 4, run=run)
    run.kill()
    run.wait()
    # Without --resume the checkpoint is not silently thrown away.
    code, output = processes.run(*stats_args(workspace, out), log=tmp_path / "log2")
    assert code == 2 and "pass --resume to continue it, or --overwrite" in output
    # Another batch size would batch (and pad) the examples differently: refused, naming the option.
    args = stats_args(workspace, out, "--resume")
    args[args.index("--batch-size") + 1] = 4
    code, output = processes.run(*args, log=tmp_path / "log3")
    assert code == 2 and "batch_size = 2" in output and "this run has 4" in output
    assert checkpoint_batches(out) >= 4  # still there for a proper resume


def test_merge_killed_at_random_points_never_leaves_half_an_output(workspace, uninterrupted, tmp_path):
    """SIGKILL during merges at random moments and while the output is being written: OUT is never
    half written, an earlier output stays intact, and the rerun gives the full result."""
    rng = random.Random(SEED + 1)
    caches = tmp_path / "caches"
    caches.mkdir()
    (caches / "a").symlink_to(uninterrupted)
    code, output = processes.run("stats", "--model", workspace.model("bert", 2), "--dataset", workspace.text_task(2),
                                 "--out", caches / "b", "--device", "cpu", log=tmp_path / "stats-b")
    assert code == 0, output
    merge = ["merge", "--cache-dir", caches, "--device", "cpu", "--max-shard-size", "20KB", "--batch-memory", "8KB"]
    started = time.monotonic()
    code, output = processes.run(*merge, "--out", tmp_path / "expected", log=tmp_path / "expected.log")
    duration = time.monotonic() - started
    assert code == 0, output
    out = tmp_path / "merged"
    code, output = processes.run(*merge, "--out", out, "--reduce-non-diagonal-ratio", 0.5, log=tmp_path / "old.log")
    assert code == 0, output
    earlier = faults.snapshot(out)

    staging = lambda: next(iter(tmp_path.glob(".merged.partial-*/model-00001-*")), None)  # noqa: E731
    kills = 0
    for attempt in range(8):
        run = processes.start(*merge, "--out", out, "--overwrite", log=tmp_path / f"merge{attempt}")
        if attempt % 2:
            processes.wait_for(lambda: staging() is not None, run=run)  # while shards are being written
        else:
            processes.wait_for(lambda: False, timeout=rng.uniform(0, 0.9 * duration), run=run)
        if not run.alive():  # finished before the kill: a complete output, as it should be
            assert run.wait() == 0, run.output()
            earlier = faults.snapshot(out)
            continue
        run.kill()
        if run.wait() == 0:  # it finished between the check above and the kill: a complete output
            assert same_merge(out, tmp_path / "expected")
            earlier = faults.snapshot(out)
            continue
        with faults.trial("merge killed (SIGKILL) at a random point"):
            assert run.wait() == -signal.SIGKILL
            if faults.snapshot(out) != earlier and same_merge(out, tmp_path / "expected"):
                earlier = faults.snapshot(out)  # killed after publishing, before exiting: the new output is whole
            else:
                faults.assert_intact("merge killed (SIGKILL) at a random point", out, earlier)
            kills += 1
    assert kills >= 4
    code, output = processes.run(*merge, "--out", out, "--overwrite", log=tmp_path / "final.log")
    assert code == 0, output
    assert same_merge(out, tmp_path / "expected")
    assert not list(tmp_path.glob(".merged.*-*"))  # no staging or moved-aside output left behind


def same_merge(out: Path, expected: Path) -> bool:
    """The same files as ``expected`` (the records aside: the report's timings, the card's title), every
    tensor equal."""
    records = ("merge_report.json", "README.md")
    ours, theirs = faults.snapshot(out), faults.snapshot(expected)
    if {k for k in ours if k not in records} != {k for k in theirs if k not in records}:
        return False
    for name in ours:
        if name.endswith(".safetensors"):
            a, b = load_file(str(out / name)), load_file(str(expected / name))
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in b):
                return False
        elif name not in records and ours[name] != theirs[name]:
            return False
    return True


def test_two_stats_runs_on_one_output(workspace, tmp_path):
    """The second run stops at once with a clear message; the first finishes and its cache is valid."""
    out = tmp_path / "caches" / "a"
    with faults.trial("two stats runs writing one OUT"):
        first = processes.start(*stats_args(workspace, out, "--checkpoint-every", 10), log=tmp_path / "first")
        assert processes.wait_for(lambda: checkpoint_batches(out) >= 10, run=first)
        os.kill(first.pid, signal.SIGSTOP)  # held mid-run (its lock held), however fast the machine is
        try:
            code, output = processes.run(*stats_args(workspace, out, "--overwrite"), log=tmp_path / "second")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert code == 2 and "another regmean run is writing it right now" in output, output
        assert first.wait() == 0, first.output()
        cache = StatsCache(out)
        for key in cache.manifest.grams:
            cache.read_packed(key)  # checksums hold
        assert cache.manifest.examples == 2 * BATCHES


@pytest.mark.parametrize("stage", ["stats", "merge"])
def test_disk_full_while_writing(stage, workspace, uninterrupted, tmp_path):
    """Writes fail with EFBIG past a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored), as on a full disk:
    one clear line, no partial output, the earlier output intact; with room again the run succeeds."""
    fault = f"disk full while {stage} writes its output"
    if stage == "stats":
        args = stats_args(workspace, tmp_path / "a", "--num-examples", 20)
        out = tmp_path / "a"
    else:
        (tmp_path / "caches").mkdir()
        (tmp_path / "caches" / "a").symlink_to(uninterrupted)
        args = ["merge", "--cache-dir", tmp_path / "caches", "--device", "cpu", "--out", tmp_path / "merged"]
        out = tmp_path / "merged"
    code, output = processes.run(*args, log=tmp_path / "first")
    assert code == 0, output
    before = faults.snapshot(out)
    limit = max(len(data) for data in before.values()) // 2  # the largest file no longer fits
    with faults.trial(fault):
        code, output = processes.run(*args, "--overwrite", log=tmp_path / "full", file_size_limit=limit)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "out of disk space" in errors[0] and str(out) in errors[0], output
        assert "Traceback" not in output
        faults.assert_intact(fault, out, before)
        assert [p.name for p in tmp_path.glob(f".{out.name}.*") if not p.name.endswith(".lock")] == []
    code, output = processes.run(*args, "--overwrite", log=tmp_path / "again")
    assert code == 0, output


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(workspace, uninterrupted, tmp_path):
    """A checkpoint that does not fit stops the run clearly; the previous checkpoint still resumes."""
    out = tmp_path / "a"
    run = processes.start(*stats_args(workspace, out, "--checkpoint-every", 20), log=tmp_path / "log")
    assert processes.wait_for(lambda: checkpoint_batches(out) >= 20, run=run)
    run.kill()
    run.wait()
    biggest = max(p.stat().st_size for p in checkpoint_folder(out).rglob("*") if p.is_file())
    with faults.trial("disk full while writing a checkpoint"):
        code, output = processes.run(*stats_args(workspace, out, "--checkpoint-every", 20, "--resume"),
                                     log=tmp_path / "full", file_size_limit=biggest // 2)
        assert code == 2 and "out of disk space" in output, output
        assert not out.exists() and checkpoint_batches(out) >= 20
        code, output = processes.run(*stats_args(workspace, out, "--checkpoint-every", 20, "--resume"),
                                     log=tmp_path / "resumed")
        assert code == 0, output
        assert_same_cache(out, uninterrupted)


def test_console_script_kill_and_resume(workspace, tmp_path):
    """The installed `regmean` script itself, killed once; the resumed run finishes its cache."""
    import os
    import subprocess

    out = tmp_path / "a"
    args = [str(a) for a in stats_args(workspace, out, "--checkpoint-every", 10, "--quiet", "--num-examples", 100)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with faults.trial("stats killed (SIGKILL) at a random point"):
        proc = subprocess.Popen([REGMEAN, *args], env=env)
        assert processes.wait_for(lambda: checkpoint_batches(out) >= 10, timeout=300)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert_no_cache_merge_accepts(out)
        code, output = processes.run(*args, "--resume", log=tmp_path / "resumed")
        assert code == 0, output
        assert StatsCache(out).manifest.examples == 100


def test_an_output_moved_aside_by_a_killed_publish_is_put_back(tmp_path):
    """Where the OS cannot exchange two folders atomically, publishing moves the old output aside first;
    a kill right then leaves it in .NAME.old-*/previous, and the next run on that output restores it."""
    from regmean_pipeline.io.atomic import output_lock

    target = tmp_path / "merged"
    (tmp_path / ".merged.old-x1y2" / "previous").mkdir(parents=True)
    (tmp_path / ".merged.old-x1y2" / "previous" / "model.safetensors").write_text("earlier output")
    (tmp_path / ".merged.partial-abc").mkdir()  # and a staging folder of the killed run
    with faults.trial("merge killed (SIGKILL) at a random point"), output_lock(target):
        assert (target / "model.safetensors").read_text() == "earlier output"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.lock", "merged"]
