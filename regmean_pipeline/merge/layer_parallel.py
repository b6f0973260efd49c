"""Layer-parallel merge: the solve batches and averaged tensors of one plan shared out among ranks.

Every rank computes the same plan and the same split, so each knows, without asking, which tensors
it produces and which output files it writes; rank 0 also copies the excluded tensors and writes
the index and report once all ranks are done.
"""

from __future__ import annotations

import dataclasses

from regmean_pipeline.merge.plan import MergePlan, SolveBatch


def solve_cost(batch: SolveBatch) -> int:
    """Work of a batch: factorisation (d^3/3) and solves and products (~2 d^2 m) per system."""
    return len(batch.groups) * (batch.dim ** 3 // 3 + 2 * batch.dim * batch.dim * batch.width)


def _balance(items: list, cost, parts: int) -> list[list]:
    """Greedy longest-first assignment to the least loaded part; each part keeps the items' order."""
    loads = [0] * parts
    assigned: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(items)), key=lambda i: -cost(items[i])):
        part = loads.index(min(loads))
        assigned[part].append(index)
        loads[part] += cost(items[index])
    return [[items[i] for i in sorted(indices)] for indices in assigned]


def split_plan(plan: MergePlan, world: int) -> list[MergePlan]:
    """One sub-plan per rank: disjoint solve batches and averaged tensors; the copies go to rank 0."""
    sizes = {spec.name: spec.nbytes for spec in plan.outputs}
    batches = _balance(plan.batches, solve_cost, world)
    averaged = _balance(plan.averaged, sizes.__getitem__, world)
    return [dataclasses.replace(plan, batches=batches[rank], averaged=averaged[rank],
                                copied=plan.copied if rank == 0 else []) for rank in range(world)]


def output_owners(parts: list[MergePlan]) -> dict[str, int]:
    """Tensor name -> the rank that produces it."""
    owners: dict[str, int] = {}
    for rank, part in enumerate(parts):
        for batch in part.batches:
            for group in batch.groups:
                owners.update((layer.weight, rank) for _, layer in group.layers)
        owners.update((name, rank) for name in part.averaged + part.copied)
    return owners
