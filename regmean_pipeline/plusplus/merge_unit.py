"""Merge one unit (the prefix, a block, or the tail) exactly as ``regmean merge`` merges a model.

Its linear layers that have Grams are solved in batches of equal-shaped systems (shared-input groups as
one system, the same planner, ``SystemSums`` and solver with their fallbacks); its other parameters are
averaged, anchored at the first candidate; excluded ones come from the first candidate or the base.
Every sum is formed from this process's candidates and summed across processes before the solve, and
each batch is solved by one process and shared, so that a candidate's Grams never leave its process.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from regmean_pipeline.cache.manifest import LayerEntry
from regmean_pipeline.cache.symmetric import pack_upper
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.weights import WeightSource
from regmean_pipeline.measure.gram import GramStats
from regmean_pipeline.merge.averaging import anchored_mean as averaged
from regmean_pipeline.merge.executor import emit_solved, solve_report, stack_weights
from regmean_pipeline.merge.layer_parallel import split_plan
from regmean_pipeline.merge.plan import GramGroup, MergePlan, MergeSettings, SolveBatch, solve_batches
from regmean_pipeline.merge.systems import SystemSums
from regmean_pipeline.plusplus.collective import Collective


@dataclass
class UnitCandidate:
    """A candidate as every process knows it: name, lazily read weights and coefficient."""

    name: str
    weights: WeightSource
    coefficient: float = 1.0


def _layout(stats: GramStats, names: set[str], excluded: Callable[[str], bool]) -> list[GramGroup]:
    """The unit's systems: layers with a Gram whose weight is in the unit and not excluded, grouped by
    the input they share, in module order."""
    grouped: dict[str, list[tuple[str, LayerEntry]]] = defaultdict(list)
    for name, layer in stats.layers.items():
        if layer.weight not in names or excluded(layer.weight):
            continue
        key = stats.layer_grams[name]
        grouped[key].append((name, LayerEntry(key, layer.weight, layer.in_features, layer.out_features,
                                              layer.transposed)))
    return [GramGroup(key, members[0][1].in_features, members) for key, members in grouped.items()]


def _describe(groups: list[GramGroup]) -> str:
    return "\n".join(f"{group.key}:{group.dim}:" + ",".join(name for name, _ in group.layers) for group in groups)


def merge_unit(names: list[str], candidates: list[UnitCandidate], grams: dict[int, GramStats],
               settings: MergeSettings, *, excluded: Callable[[str], bool], copy_source: WeightSource,
               device: torch.device, collective: Collective, label: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict], int]:
    """Merged tensors of the unit (CPU, the first candidate's dtypes), the report entry of each solved
    layer and the number of solve batches. ``grams`` holds this process's candidates' Grams of the unit,
    by index into ``candidates``."""
    first = candidates[0]
    unit = set(names)
    local = sorted(grams)
    groups = _layout(grams[local[0]], unit, excluded) if local else []
    layout = _describe(groups)
    for index in local[1:]:
        if _describe(_layout(grams[index], unit, excluded)) != layout:
            raise RegMeanError(f"{label}: candidate {candidates[index].name} measured other linear layers or "
                               f"shared inputs than {candidates[local[0]].name}")
    collective.check_same(layout, f"the linear layers of {label}")
    for index in local:
        for group in groups:
            if grams[index].tokens[group.key] == 0:
                raise RegMeanError(f"candidate {candidates[index].name}: layer {group.layers[0][0]}: no token "
                                   "reached its input")
    coefficient_sum = sum(c.coefficient for c in candidates)
    totals = collective.sum_counts([sum(grams[i].tokens[g.key] for i in local) for g in groups])
    total_tokens = {group.key: total for group, total in zip(groups, totals)}

    merged: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    batches = solve_batches(groups, settings)
    parts = split_plan(MergePlan(batches, [], [], [], {}), collective.world)
    owner = {id(batch): rank for rank, part in enumerate(parts) for batch in part.batches}
    for batch in batches:
        solution = _solve_batch(batch, candidates, grams, local, settings, device, collective,
                                total_tokens, coefficient_sum, owner[id(batch)], report)
        emit_solved(batch, solution, first.weights.dtype, merged.__setitem__)
    solved = set(merged)
    for name in names:
        if name in solved:
            continue
        if excluded(name):
            merged[name] = copy_source.get(name)
        else:
            merged[name] = anchored_mean(name, candidates, local, coefficient_sum, collective)
    return merged, report, len(batches)


def _solve_batch(batch: SolveBatch, candidates: list[UnitCandidate], grams: dict[int, GramStats],
                 local: list[int], settings: MergeSettings, device: torch.device, collective: Collective,
                 total_tokens: dict[str, int], coefficient_sum: float, owner: int,
                 report: dict[str, dict]) -> torch.Tensor:
    solve = settings.solve
    sums = SystemSums(len(batch.groups), batch.dim, batch.width, dtype=solve.solve_dtype, device=device,
                      reduce_non_diagonal_ratio=solve.reduce_non_diagonal_ratio, sum_dtype=torch.float64)
    sums.set_anchor(stack_weights(batch, candidates[0].weights))
    for index in local:
        stats, candidate = grams[index], candidates[index]
        packed = torch.stack([pack_upper(stats.sums[group.key]) for group in batch.groups])
        scales = torch.tensor([solve.gram_scale(candidate.coefficient, stats.tokens[g.key], total_tokens[g.key],
                                                float(stats.sums[g.key].diagonal().sum(dtype=torch.float64)))
                               for g in batch.groups], dtype=torch.float64)
        if index == 0:
            sums.add(packed, scales)
        else:
            sums.add(packed, scales, stack_weights(batch, candidate.weights),
                     candidate.coefficient / coefficient_sum)
        del packed
    collective.sum_(sums.partial_sums())
    if collective.rank == owner:
        result = sums.solve()
        solution, entries = result.solution, solve_report(batch, result)
    else:
        solution = torch.empty(len(batch.groups), batch.dim, batch.width, dtype=solve.solve_dtype, device=device)
        entries = None
    collective.broadcast_(solution, owner)
    if collective.world > 1:
        entries = json.loads(collective.broadcast_text(json.dumps(entries) if entries is not None else None, owner))
    report.update(entries)
    return solution


def anchored_mean(name: str, candidates: list[UnitCandidate], local: list[int], coefficient_sum: float,
                  collective: Collective) -> torch.Tensor:
    """W_1 + sum_{i>1} c_i (W_i - W_1) / sum(c) over every process's candidates (``averaging.anchored_mean``):
    the offsets of float32 (or narrower) weights are exact in float64, so the sum over processes comes out
    the same however the candidates are grouped, and it is divided and rounded once. The merged prefix and
    blocks feed the next blocks' Grams, so their rounding must not depend on the grouping."""
    others = ((candidates[i].weights.get(name), candidates[i].coefficient) for i in local if i)
    return averaged(candidates[0].weights.get(name), others, coefficient_sum,
                    sum_offsets=lambda offset: collective.sum_([offset]))
