"""TIES merging (Yadav et al., 2023): task vectors trimmed to their largest entries, a sign elected per
parameter by total mass, the agreeing values combined, scaled onto the pretrained model."""

from __future__ import annotations

from dataclasses import dataclass

from regmean_pipeline.merge.methods.base import MergeMethod, MethodInputs, Needs, TensorCombiner, param
from regmean_pipeline.merge.methods.task_vectors import (
    Recipe,
    TaskVectorMerge,
    candidate_densities_param,
    merge_func_param,
    scaling_param,
    trim_param,
)


@dataclass(frozen=True)
class TiesParams:
    density: float = param(0.2, "TIES: the fraction of each task vector's entries kept, largest magnitudes first "
                           "(FusionBench's threshold 20 is 0.2).", low=0.0, low_open=True, high=1.0)
    trim: str = trim_param()
    merge_func: str = merge_func_param()
    scaling: float = scaling_param(0.3)
    candidate_densities: dict[str, float] = candidate_densities_param()


def combiner(inputs: MethodInputs, params: TiesParams) -> TensorCombiner:
    return TaskVectorMerge(inputs, Recipe(scaling=params.scaling, trim=params.density, trim_scope=params.trim,
                                          elect=True, merge_func=params.merge_func,
                                          densities=tuple(params.candidate_densities.items())))


METHOD = MergeMethod(
    name="ties",
    title="TIES merging ([Yadav et al., 2023](https://arxiv.org/abs/2306.01708)): task vectors trimmed to their "
          "largest entries, a sign elected per parameter, the agreeing values combined",
    help="--pretrained plus the trimmed, sign-elected task vectors; no caches needed",
    params=TiesParams,
    needs=Needs(pretrained=True),
    combiner=combiner,
    identity=lambda copies: {"density": 1.0, "merge_func": "mean", "scaling": 1.0},
)
