"""RegMean: every linear layer solved in closed form from the candidates' input Grams; the rest averaged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regmean_pipeline.merge.methods.base import MergeMethod, Needs, param
from regmean_pipeline.merge.plan import GRAM_WEIGHTINGS, SolveSettings


@dataclass(frozen=True)
class SolveParams:
    """The solve's parameters, shared by every method that solves from Grams."""

    reduce_non_diagonal_ratio: float = param(
        0.95, "a in G~ = a*G + (1-a)*diag(G): how much of the Grams' off-diagonal part the solve keeps.",
        low=0.0, high=1.0)
    gram_weighting: str = param(
        "equal", "equal: each candidate's Gram is its mean over tokens (paper, FusionBench); tokens: candidates "
        "weigh by their token counts.", choices=GRAM_WEIGHTINGS)
    solve_dtype: str = param("float32", "dtype of the solves.", choices=("float32", "float64"))


def solve_settings(params: SolveParams) -> SolveSettings:
    return SolveSettings(params.reduce_non_diagonal_ratio, params.gram_weighting, getattr(torch, params.solve_dtype))


METHOD = MergeMethod(
    name="regmean",
    title="RegMean ([Jin et al., 2023](https://arxiv.org/abs/2212.09849)): each linear layer solved in closed "
          "form from the candidates' input Gram matrices",
    help="each linear layer solved from the candidates' Gram caches (`regmean stats`); the rest averaged",
    params=SolveParams,
    needs=Needs(statistic="gram"),
    solve=solve_settings,
)
