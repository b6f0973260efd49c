"""RegMean at several settings from one read of every cache: the merges of a sweep's RegMean points.

For each solve batch every candidate's Grams and weights are read once and added, for each Gram weighting
the points use, into two sums: at reduce_non_diagonal_ratio 1 and at 0 (``SystemSums.blend`` makes any
ratio between from those). Each point is then only its own solve. The averaged and copied parameters do
not depend on the solve's settings: each is computed once and handed to every point's output.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from regmean_pipeline.io.weights import WeightSource
from regmean_pipeline.merge.executor import (
    LOADS_AHEAD,
    Sink,
    _load,
    average_parameter,
    emit_solved,
    gram_scales,
    prefetch,
    solve_report,
)
from regmean_pipeline.merge.plan import Candidate, MergePlan, SolveSettings
from regmean_pipeline.merge.systems import SystemSums

log = logging.getLogger(__name__)


def execute_regmean_points(plan: MergePlan, candidates: list[Candidate], solves: list[SolveSettings],
                           sinks: list[Sink], *, device: torch.device, base: WeightSource | None = None,
                           progress: bool = True) -> list[dict]:
    """``execute_merge`` for each of ``solves`` (its output to the matching sink), reading once; returns each
    point's report layers and timings."""
    started = time.perf_counter()
    first, last = candidates[0], candidates[-1]
    coefficient_sum = sum(c.coefficient for c in candidates)
    keys = sorted({(s.gram_weighting, s.solve_dtype) for s in solves}, key=str)
    reports: list[dict] = [{} for _ in solves]
    sums: dict = {}
    systems = tqdm(total=plan.num_systems, desc="sweep: solve", unit="system", disable=not progress, leave=False)
    work = [(batch, candidate) for batch in plan.batches for candidate in candidates]
    for (batch, candidate), (packed, weights, _) in prefetch(work, lambda item: _load(*item, False, None, True),
                                                            ahead=LOADS_AHEAD):
        for weighting, dtype in keys:
            scales = gram_scales(batch, packed, candidate, candidates, SolveSettings(gram_weighting=weighting))
            if candidate is first:
                pair = sums[(weighting, dtype)] = [SystemSums(len(batch.groups), batch.dim, batch.width, dtype=dtype,
                                                              device=device, reduce_non_diagonal_ratio=ratio)
                                                   for ratio in (1.0, 0.0)]
                for one in pair:
                    one.set_anchor(weights.clone())
                    one.add(packed, scales)
            else:
                for one in sums[(weighting, dtype)]:
                    one.add(packed, scales, weights.clone(), candidate.coefficient / coefficient_sum)
        if candidate is last:
            for index, solve in enumerate(solves):
                full, diagonal = sums[(solve.gram_weighting, solve.solve_dtype)]
                result = SystemSums.blend(full, diagonal, solve.reduce_non_diagonal_ratio).solve()
                emit_solved(batch, result.solution, first.weights.dtype, sinks[index])
                reports[index].update(solve_report(batch, result))
            sums.clear()
            systems.update(len(batch.groups))
    systems.close()
    solved = time.perf_counter()
    for name in tqdm(plan.averaged, desc="sweep: average", unit="tensor", disable=not progress, leave=False):
        tensor = average_parameter(name, candidates, coefficient_sum)
        for sink in sinks:
            sink(name, tensor)
    for name in plan.copied:
        tensor = (base or first.weights).get(name)
        for sink in sinks:
            sink(name, tensor)
    timings = {"solve": solved - started, "average_and_copy": time.perf_counter() - solved,
               "total": time.perf_counter() - started}
    return [{"layers": layers, "timings": dict(timings)} for layers in reports]
