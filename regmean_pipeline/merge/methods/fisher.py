"""Fisher merging (Matena & Raffel, 2022): every parameter the mean of the candidates' weighted by their
diagonal Fisher information, sum_i c_i F_i theta_i / sum_i c_i F_i, from the caches `regmean stats
--statistics fisher` writes. FusionBench's floor (``minimal_fisher_weight``, added to every F_i) and its
optional per-candidate normalisation (each c_i scaled by the inverse L2 norm of that candidate's Fisher)
are kept. A parameter some candidate has no Fisher for (it was excluded from the stats, or the forward
never reached it) is averaged, and listed in the report.

Per parameter it holds the candidates' Fisher arrays one at a time and two float64 sums of its size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.merge.executor import average_parameter
from regmean_pipeline.merge.methods.base import MergeMethod, MethodInputs, Needs, TensorCombiner, param


@dataclass(frozen=True)
class FisherParams:
    minimal_fisher_weight: float = param(1e-6, "Fisher merging: added to every Fisher value, so that a parameter "
                                         "no candidate's data moved still has a weight (FusionBench's floor).",
                                         low=0.0)
    normalize_fisher_weight: bool = param(True, "Fisher merging: each candidate's weight divided by the L2 norm of "
                                          "its Fisher over the merged parameters, as FusionBench does.",
                                          flag="--normalize-fisher-weight/--no-normalize-fisher-weight")


def mean_fisher(candidate, name: str) -> torch.Tensor:
    """The candidate's Fisher of one parameter, as a mean over its examples (float64, in the parameter's shape)."""
    entry = candidate.stats.manifest.fisher[name]
    values = torch.from_numpy(candidate.stats.read("fisher", name)).to(torch.float64)
    if bool((values < 0).any()):
        raise RegMeanError(f"candidate {candidate.name}: the Fisher of {name} in {candidate.where} holds negative "
                           "values; the cache is damaged (recompute it with `regmean stats --statistics fisher`)")
    return values.reshape(entry.shape) / max(entry.examples, 1)


def combiner(inputs: MethodInputs, params: FisherParams) -> TensorCombiner:
    candidates = inputs.candidates
    floating = [n for n in inputs.names if candidates[0].weights.dtype(n).is_floating_point]
    weighted = [n for n in floating if all(n in c.stats.manifest.fisher for c in candidates)]
    without = [n for n in floating if n not in set(weighted)]
    factors = [c.coefficient for c in candidates]
    report = {"without_fisher": without}
    if params.normalize_fisher_weight:
        norms = []
        for candidate in tqdm(candidates, desc="merge: Fisher norms", unit="candidate", disable=not inputs.progress,
                              leave=False):
            norms.append(math.sqrt(sum(float(mean_fisher(candidate, n).square().sum()) for n in weighted)))
        inverse = [1.0 / (norm + params.minimal_fisher_weight) for norm in norms]
        factors = [c * i / sum(inverse) for c, i in zip(factors, inverse)]
        report["fisher_norms"] = {c.name: norm for c, norm in zip(candidates, norms)}
    report["candidate_factors"] = {c.name: f for c, f in zip(candidates, factors)}
    inputs.report.update(fisher=report)
    coefficient_sum = sum(c.coefficient for c in candidates)
    chosen = set(weighted)

    def combine(name: str) -> torch.Tensor:
        if name not in chosen:
            return average_parameter(name, candidates, coefficient_sum)
        dtype = candidates[0].weights.dtype(name)
        numerator = denominator = None
        for candidate, factor in zip(candidates, factors):
            weight = (mean_fisher(candidate, name) + params.minimal_fisher_weight) * factor
            term = weight * candidate.weights.get(name).to(torch.float64)
            numerator = term if numerator is None else numerator.add_(term)
            denominator = weight if denominator is None else denominator.add_(weight)
        if bool((denominator == 0).any()):  # no Fisher anywhere and no floor: the plain mean there
            mean = average_parameter(name, candidates, coefficient_sum).to(torch.float64)
            return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), mean).to(dtype)
        return numerator.div_(denominator).to(dtype)

    return combine


METHOD = MergeMethod(
    name="fisher",
    title="Fisher merging ([Matena & Raffel, 2022](https://arxiv.org/abs/2111.09832)): each parameter the mean of "
          "the candidates' weighted by their diagonal Fisher information",
    help="each parameter weighted by the candidates' Fisher (caches of `regmean stats --statistics fisher`)",
    params=FisherParams,
    needs=Needs(statistic="fisher"),
    combiner=combiner,
)
