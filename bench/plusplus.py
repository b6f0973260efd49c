"""RegMean++ against the project's own RegMean on the same candidates and examples, side by side.

Each side runs in a fresh child process, timed from after its imports, so its peak RSS (VmHWM) is its own:
- regmean: `regmean stats` for every candidate (in that one process, one after the other), then
  `regmean merge` over their caches;
- regmean++: one `regmean merge --method regmean++` over the same models and data.

    python -m bench.plusplus child regmean|regmean++ SPEC.json   (what bench/run.py starts)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(mode: str, spec: dict) -> dict:
    from bench.fixtures import peak_rss_bytes
    from stages.merge import run_merge
    from stages.merge_options import MergeOptions
    from stages.stats import StatsOptions, run_stats

    root = Path(spec["root"])
    data = {"num_examples": spec["examples"], "batch_size": spec["batch_size"], "max_length": spec["max_length"]}
    started = time.perf_counter()
    if mode == "regmean":
        for name, (model, task) in spec["candidates"].items():
            run_stats(StatsOptions(model=model, dataset=task, out=str(root / "caches" / name), device="cpu",
                                   overwrite=True, progress=False, **data))
        stats_done = time.perf_counter()
        report = run_merge(MergeOptions(out=str(root / "merged_regmean"), cache_dir=str(root / "caches"),
                                        device="cpu", overwrite=True, progress=False))
        phases = {"stats_s": stats_done - started, "merge_s": time.perf_counter() - stats_done}
    else:
        report = run_merge(MergeOptions(
            out=str(root / "merged_plusplus"), method="regmean++", device="cpu", overwrite=True, progress=False,
            models={name: model for name, (model, _) in spec["candidates"].items()},
            params={"datasets": {name: task for name, (_, task) in spec["candidates"].items()}, **data}))
        phases = {unit: sum(u.get(unit, 0.0) for u in report["units"]) for unit in ("grams_s", "solve_s", "advance_s")}
    return {"wall_s": time.perf_counter() - started, "peak_rss": peak_rss_bytes(), **phases,
            "layers_solved": report["totals"]["layers_solved"]}


def compare(root: Path, candidates: dict[str, tuple[Path, Path]], *, examples: int, batch_size: int,
            max_length: int) -> dict:
    """Both sides on the same candidates ({name: (model folder, task file)}); wall seconds and peak RSS."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {"root": str(root), "examples": examples, "batch_size": batch_size, "max_length": max_length,
            "candidates": {name: [str(model), str(task)] for name, (model, task) in candidates.items()}}
    path = root / "spec.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {}
    for mode in ("regmean", "regmean++"):
        done = subprocess.run([sys.executable, "-m", "bench.plusplus", "child", mode, str(path)],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def rows(results: dict, label: str, k: int) -> list[tuple]:
    """Table rows (measurement, ours, reference, ratio, target, met) for bench/run.py's table."""
    ours, theirs = results["regmean++"], results["regmean"]
    ratio = ours["wall_s"] / theirs["wall_s"]
    return [
        (f"RegMean++ {label} K={k}: wall s (grams {ours['grams_s']:.1f}, solve {ours['solve_s']:.1f}, advance "
         f"{ours['advance_s']:.1f}) vs RegMean stats + merge (stats {theirs['stats_s']:.1f}, merge "
         f"{theirs['merge_s']:.1f})", f"{ours['wall_s']:.1f}", f"{theirs['wall_s']:.1f}", f"{ratio:.2f}x time",
         "<= 2x", "yes" if ratio <= 2 else "NO"),
        (f"RegMean++ {label} K={k}: peak RSS MiB vs RegMean stats + merge", f"{ours['peak_rss'] / 2**20:.0f}",
         f"{theirs['peak_rss'] / 2**20:.0f}", f"{ours['peak_rss'] / theirs['peak_rss']:.2f}x", "", ""),
    ]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "child":
        raise SystemExit(__doc__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(_child(sys.argv[2], json.loads(Path(sys.argv[3]).read_text()))))
