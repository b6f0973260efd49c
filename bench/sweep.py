"""`make bench`: an N-point RegMean sweep's merges against N separate `regmean merge` runs, side by side.

The sweep's RegMean points read every cache once together (merge/shared_solves.py): per solve batch the
candidates' Grams and weights are read once and added into the sums at a = 1 and a = 0 for each Gram
weighting, and each point is a blend and its own solve. The reference is what a user would otherwise run:
one `regmean merge` process per point. Both sides are child processes (bench/merge_child.py), timed whole,
rounds alternating; only the merges are compared (scoring on validation data is the same on both sides).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.methods import alternating_medians, spec_child

POINTS = [{"reduce_non_diagonal_ratio": a, "gram_weighting": w} for a in (0.1, 0.5, 0.95) for w in ("equal", "trace")]


def run_points(spec: dict) -> dict:
    """merge_child mode `regmean-points`: the sweep's shared merge of spec["points"], each into its own folder."""
    import torch

    from regmean_pipeline.merge.methods.registry import get_method
    from stages.merge import open_candidates
    from stages.merge_options import MergeOptions
    from stages.sweep import merge_regmean_points

    started = time.perf_counter()
    options = MergeOptions(out="", cache_dir=spec["cache_dir"])
    folders = [Path(spec["out"]) / f"point_{index}" for index in range(len(spec["points"]))]
    merge_regmean_points(open_candidates(options, get_method("regmean")), spec["points"], options, folders,
                         torch.device("cpu"), progress=False)
    return {"wall_s": time.perf_counter() - started}


def compare(caches: Path, root: Path, rounds: int, label: str) -> dict:
    """The N points as one sweep process against N `regmean merge` processes (their total time)."""

    def sweep() -> dict:
        started = time.perf_counter()
        spec_child("regmean-points", {"cache_dir": str(caches), "out": str(root / "sweep"), "points": POINTS}, root)
        return {"wall_s": time.perf_counter() - started}

    def separate() -> dict:
        started = time.perf_counter()
        for index, point in enumerate(POINTS):
            spec_child("method", {"method": "regmean", "params": point, "cache_dir": str(caches),
                                  "out": str(root / f"merge_{index}")}, root)
        return {"wall_s": time.perf_counter() - started}

    medians = alternating_medians({"sweep": sweep, "separate": separate}, rounds)
    return {"label": label, "points": len(POINTS), "sweep": medians["sweep"], "separate": medians["separate"]}


def rows(result: dict | None) -> list[tuple]:
    if not result:
        return []
    ours, theirs = result["sweep"]["wall_s"], result["separate"]["wall_s"]
    return [(f"{result['points']}-point RegMean sweep ({result['label']} K=5; a 0.1, 0.5, 0.95 x equal, trace "
             "weighting): its merges, one process reading the caches once, vs one `regmean merge` process per point",
             f"{ours:.1f} s", f"{theirs:.1f} s", f"{theirs / ours:.2f}x faster", "", "")]


if __name__ == "__main__":  # pragma: no cover - a helper for trying it alone
    print(json.dumps(compare(Path("outputs/bench/minilm/caches"), Path("outputs/bench/sweep"), 1, "MiniLM-L6")))
