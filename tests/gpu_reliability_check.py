"""The CUDA paths of the reliability features, checked by hand on a GPU machine:
``python tests/gpu_reliability_check.py OUTDIR [--small]`` (from the repository root; `python -m bench.gpu_session`
runs it with the other GPU checks).

Needs datasets (`regmean stats` reads its task data with it) and pytest (the test helpers it reuses); caches are
safetensors, so zarr is not needed. Without datasets it writes a one-line skip and exits 0. ``--small``: fewer
examples and earlier kills (the CPU smoke run of the tests).

  1. stats on the GPU with a checkpoint every batch, SIGKILLed mid-run three times and resumed with
     --resume: the cache equals an uninterrupted GPU run's to 1e-6 (accumulators go GPU -> checkpoint
     file -> GPU);
  2. a float16 forward pass on the GPU that overflows stops stats naming the layer;
  3. singular systems (dead features, one repeated sentence, a = 1) merged on the GPU: the merge objective
     is within 1e-5 (float32 solve) of the float64 least-squares optimum.
Writes OUTDIR/gpu_reliability_check.json and exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regmean_pipeline.testing import make_model, save_model, write_text_task  # noqa: E402
from tests import processes  # noqa: E402
from tests.test_kill import assert_same_cache, checkpoint_batches  # noqa: E402
from tests.test_numeric_faults import dead_feature_model, objective_gaps  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMAT = ("--format", "safetensors")  # the GPU machine has no zarr
EXAMPLES, KILLS = 512, (10, 40, 90)  # batches of 4: 128 batches, killed after 10, 40 and 90 of them
SMALL_EXAMPLES, SMALL_KILLS = 48, (6,)  # one kill, after 6 of 12 batches


def resume_check(root: Path) -> dict:
    model = save_model(make_model("llama", seed=1), root / "llama")
    data = write_text_task(root / "data.jsonl", n=EXAMPLES, seed=1)
    args = ["stats", "--model", model, "--dataset", data, "--num-examples", EXAMPLES, "--batch-size", 4,
            "--device", DEVICE, *FORMAT]
    code, output = processes.run(*args, "--out", root / "whole", log=root / "whole.log")
    assert code == 0, output
    out = root / "resumed"
    kills = 0
    for target in KILLS:
        run = processes.start(*args, "--out", out, "--checkpoint-every", 1, "--resume", log=root / f"kill{target}.log")
        processes.wait_for(lambda: checkpoint_batches(out) >= target, run=run)
        if run.alive():
            run.kill()
            assert run.wait() == -signal.SIGKILL
            kills += 1
    code, output = processes.run(*args, "--out", out, "--checkpoint-every", 1, "--resume", log=root / "final.log")
    assert code == 0, output
    return {"kills": kills, "worst_relative_difference": assert_same_cache(out, root / "whole")}


def overflow_check(root: Path) -> dict:
    model = make_model("bert", seed=1)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.LayerNorm.weight.mul_(100.0)
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(1e4)
    folder = save_model(model, root / "overflow")
    code, output = processes.run("stats", "--model", folder, "--dataset", write_text_task(root / "d.jsonl", n=16),
                                 "--out", root / "overflow-cache", "--dtype", "float16", "--device", DEVICE,
                                 *FORMAT, log=root / "overflow.log")
    assert code == 2 and "layer bert.encoder.layer.0.output.dense" in output, output
    return {"error": [line for line in output.splitlines() if line.startswith("error:")][0]}


def singular_check(root: Path) -> dict:
    data = root / "duplicated.jsonl"
    data.write_text("".join(json.dumps({"text": "the movie was really great"}) + "\n" for _ in range(24)))
    models = [dead_feature_model(seed, root / f"dead{seed}") for seed in (1, 2)]
    for i, model in enumerate(models):
        code, output = processes.run("stats", "--model", model, "--dataset", data, "--out", root / "caches" / f"c{i}",
                                     "--device", DEVICE, "--dtype", "float64", "--accumulate-dtype", "float64",
                                     *FORMAT, log=root / f"singular{i}.log")
        assert code == 0, output
    code, output = processes.run("merge", "--cache-dir", root / "caches", "--out", root / "merged", "--device", DEVICE,
                                 "--reduce-non-diagonal-ratio", 1.0, log=root / "merge.log")
    assert code == 0, output
    gaps = objective_gaps(root / "caches", models, root / "merged", 1.0, bounded=True)
    assert max(gaps.values()) <= 1e-5 and min(gaps.values()) >= -1e-12, gaps
    return {"worst_objective_gap": max(gaps.values())}


def main() -> int:
    global EXAMPLES, KILLS
    args = [a for a in sys.argv[1:] if a != "--small"]
    root = Path(args[0] if args else "gpu-reliability-check")
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"}
    if "--small" in sys.argv[1:]:
        EXAMPLES, KILLS = SMALL_EXAMPLES, SMALL_KILLS
    try:
        import datasets  # noqa: F401
    except Exception as exc:  # `regmean stats` cannot read a data file without it
        results["skipped"] = f"needs datasets, which `regmean stats` reads task data with ({type(exc).__name__}: {exc})"
        (root / "gpu_reliability_check.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"skipped: {results['skipped']}")
        return 0
    failed = False
    for name, check in (("resume", resume_check), ("fp16_overflow", overflow_check), ("singular", singular_check)):
        folder = root / name
        folder.mkdir(exist_ok=True)
        try:
            results[name] = {"ok": True, **check(folder)}
        except Exception as exc:  # report every check, then fail
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            failed = True
    (root / "gpu_reliability_check.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
