"""The RegMean linear systems, solved in batches without inverses.

With A = sum_i G~_i and the first candidate's W_1^T as anchor, RegMean's
    X = A^-1 sum_i G~_i W_i^T
is solved as X = W_1^T + A^-1 sum_{i>1} G~_i (W_i - W_1)^T. Same answer in exact arithmetic, but the
solve only carries the small differences between fine-tunes, so its rounding error shrinks with
them: K copies of one model (or K = 1) come back bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Above this Cholesky-based estimate a float32 solve loses too many digits: redo it in float64.
PROMOTE_CONDITION = {torch.float32: 1e5, torch.float64: float("inf")}
RIDGE = 1e-7  # relative to the mean diagonal; pulls a singular system towards the plain average


def reduce_off_diagonal_(grams: torch.Tensor, ratio: float) -> torch.Tensor:
    """G~ = ratio * G + (1 - ratio) * diag(G), in place, over the last two dimensions."""
    if ratio != 1.0:
        diagonal = grams.diagonal(dim1=-2, dim2=-1).clone()
        grams.mul_(ratio)
        grams.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
    return grams


@dataclass
class SolveResult:
    solution: torch.Tensor  # (B, d, m): anchor + correction
    solver: list[str]
    condition: list[float | None]  # None: singular
    residual: list[float]  # normwise relative residual ||A X - B|| / (||A|| ||X||) (a backward error)


def _cholesky_condition(factor: torch.Tensor) -> torch.Tensor:
    diagonal = factor.diagonal(dim1=-2, dim2=-1).abs()
    return (diagonal.amax(-1) / diagonal.amin(-1).clamp_min(torch.finfo(factor.dtype).tiny)) ** 2


def solve_batch(matrix: torch.Tensor, rhs: torch.Tensor, anchor: torch.Tensor,
                fallback_target: torch.Tensor) -> SolveResult:
    """Solve matrix @ D = rhs for a batch of symmetric PSD systems and return anchor + D.

    Cholesky where positive definite (float32 solves with a poor condition estimate are redone in
    float64). Where it is not (dead features, rank-deficient Grams), an LU solve in float64 of the
    ridge system (A + lambda I) D = rhs + lambda * fallback_target, which tends to the least-squares
    optimum as lambda -> 0 and keeps the plain average in directions no input ever reached.
    """
    dtype = matrix.dtype
    factor, info = torch.linalg.cholesky_ex(matrix)
    correction = torch.cholesky_solve(rhs, factor)
    condition = _cholesky_condition(factor)
    ok = (info == 0) & torch.isfinite(condition) & torch.isfinite(correction).flatten(1).all(1)
    solver = ["cholesky"] * matrix.shape[0]
    conditions: list[float | None] = condition.tolist()

    promote = ok & (condition > PROMOTE_CONDITION.get(dtype, float("inf")))
    for i in promote.nonzero().flatten().tolist():
        factor64, info64 = torch.linalg.cholesky_ex(matrix[i].double())
        if int(info64) == 0:
            correction[i] = torch.cholesky_solve(rhs[i].double(), factor64).to(dtype)
            solver[i] = "cholesky-float64"
        else:
            ok[i] = False

    for i in (~ok).nonzero().flatten().tolist():
        a = matrix[i].double()
        ridge = RIDGE * (a.diagonal().mean().clamp_min(0.0).item() or 1.0)
        regularised = a + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        target = rhs[i].double() + ridge * fallback_target[i].double()
        correction[i] = torch.linalg.solve(regularised, target).to(dtype)
        solver[i] = "lu-ridge"
        eigenvalues = torch.linalg.eigvalsh(a).abs()
        largest, smallest = eigenvalues.max().item(), eigenvalues.min().item()
        conditions[i] = None if smallest <= largest * 1e-15 else largest / smallest
        log.info("system %d is not positive definite (condition %s): LU solve with ridge %.3g", i,
                 "inf" if conditions[i] is None else f"{conditions[i]:.3g}", ridge)

    error = torch.linalg.matrix_norm(torch.bmm(matrix, correction) - rhs)
    solution = anchor.add_(correction)
    scale = torch.linalg.matrix_norm(matrix) * torch.linalg.matrix_norm(solution)
    residual = (error / scale.clamp_min(torch.finfo(dtype).tiny)).tolist()
    return SolveResult(solution, solver, conditions, residual)
