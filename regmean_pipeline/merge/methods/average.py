"""Simple averaging: every parameter the coefficient-weighted mean of the candidates'."""

from __future__ import annotations

from dataclasses import dataclass

from regmean_pipeline.merge.methods.base import MergeMethod


@dataclass(frozen=True)
class AverageParams:
    """No parameters: the candidates' coefficients (--coefficient) are its weights."""


METHOD = MergeMethod(
    name="average",
    title="simple averaging of the parameters",
    help="the coefficient-weighted mean of every parameter; no caches needed",
    params=AverageParams,
)
