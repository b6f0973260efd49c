"""DARE (Yu et al., 2024): each task-vector entry dropped at random and the rest rescaled, then summed as
task arithmetic (``dare``) or combined as TIES (``dare-ties``)."""

from __future__ import annotations

from dataclasses import dataclass

from regmean_pipeline.merge.methods.base import MergeMethod, MethodInputs, Needs, TensorCombiner, param
from regmean_pipeline.merge.methods.task_vectors import (
    RESCALES,
    Recipe,
    TaskVectorMerge,
    candidate_densities_param,
    merge_func_param,
    scaling_param,
    trim_param,
)


@dataclass(frozen=True)
class DareParams:
    density: float = param(0.5, "DARE: the probability that each task-vector entry is kept (FusionBench's "
                           "sparsity_ratio 0.5 is density 0.5).", low=0.0, low_open=True, high=1.0)
    rescale: str = param("inverse", "DARE: the kept entries divided by density (the paper, FusionBench), scaled to "
                         "keep each tensor's L1 norm (l1, mergekit), or left (none).", choices=RESCALES)
    seed: int = param(0, "Seed of DARE's drop masks (the same masks on any device and batching).")
    scaling: float = scaling_param(0.3)
    candidate_densities: dict[str, float] = candidate_densities_param()


@dataclass(frozen=True)
class DareTiesParams(DareParams):
    trim_density: float = param(0.2, "DARE-TIES: after the drop, the fraction of each task vector kept by TIES' "
                                "magnitude trim; 1 for none (mergekit's dare_ties).", low=0.0, low_open=True, high=1.0)
    trim: str = trim_param()
    merge_func: str = merge_func_param()
    scaling: float = scaling_param(0.5)


def _dare(inputs: MethodInputs, params: DareParams) -> TensorCombiner:
    return TaskVectorMerge(inputs, Recipe(scaling=params.scaling, drop=params.density, rescale=params.rescale,
                                          seed=params.seed, densities=tuple(params.candidate_densities.items())))


def _dare_ties(inputs: MethodInputs, params: DareTiesParams) -> TensorCombiner:
    return TaskVectorMerge(inputs, Recipe(
        scaling=params.scaling, drop=params.density, rescale=params.rescale, seed=params.seed,
        trim=None if params.trim_density >= 1.0 else params.trim_density, trim_scope=params.trim, elect=True,
        merge_func=params.merge_func, densities=tuple(params.candidate_densities.items())))


DARE = MergeMethod(
    name="dare",
    title="DARE ([Yu et al., 2024](https://arxiv.org/abs/2311.03099)): task-vector entries dropped at random and "
          "the rest rescaled, then summed onto the pretrained model",
    help="--pretrained plus the randomly thinned, rescaled task vectors; no caches needed",
    params=DareParams,
    needs=Needs(pretrained=True),
    combiner=_dare,
    identity=lambda copies: {"density": 1.0, "scaling": 1 / copies},
)
DARE_TIES = MergeMethod(
    name="dare-ties",
    title="DARE-TIES ([Yu et al., 2024](https://arxiv.org/abs/2311.03099)): DARE's random drop, then TIES' trim, "
          "sign election and combination of the agreeing values",
    help="DARE's drop, then TIES; no caches needed",
    params=DareTiesParams,
    needs=Needs(pretrained=True),
    combiner=_dare_ties,
    identity=lambda copies: {"density": 1.0, "trim_density": 1.0, "merge_func": "mean", "scaling": 1.0},
)
