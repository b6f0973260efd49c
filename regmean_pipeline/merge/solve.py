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
    residual: list[float]  # normwise relative residual ||A X - B|| / (||A|| ||X||) (a backward error), estimated
    rank: list[int | None]  # numerical rank of the systems that took the fallback; None for the others


def _cholesky_condition(factor: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Condition estimate from the Cholesky factor's diagonal; with ``matrix``, that of the
    equilibrated system D A D (D = diag(A)^-1/2), which scaling of the features alone does not worsen."""
    diagonal = factor.diagonal(dim1=-2, dim2=-1).abs()
    if matrix is not None:
        diagonal = diagonal / matrix.diagonal(dim1=-2, dim2=-1).abs().sqrt().clamp_min(torch.finfo(factor.dtype).tiny)
    return (diagonal.amax(-1) / diagonal.amin(-1).clamp_min(torch.finfo(factor.dtype).tiny)) ** 2


# Columns of the random probe block that estimates the residual (see solve_batch).
RESIDUAL_PROBES = 8


def _probe_block(width: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed standard normal (width, p) block: E||E v||^2 = ||E||_F^2 for v ~ N(0, I)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(width, RESIDUAL_PROBES, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def solve_batch(matrix: torch.Tensor, rhs: torch.Tensor, anchor: torch.Tensor,
                fallback_target: torch.Tensor, *, noise: float | None = None,
                workspace: torch.Tensor | None = None) -> SolveResult:
    """Solve matrix @ D = rhs for a batch of symmetric PSD systems and return anchor + D.

    Cholesky where positive definite (float32 solves with a poor condition estimate are redone in
    float64). Where it is not (dead features, rank-deficient Grams), or where the condition of the
    equilibrated system exceeds 1 / ``noise`` (the relative precision of the Grams: eps of the dtype
    they were accumulated in, or of the solve's if coarser; beyond it rounding and a small eigenvalue
    look alike), an LU solve in float64 of the ridge system (A + R) D = rhs + R * fallback_target,
    R = lambda * diag(A) (floored), lambda = sqrt(d) * noise * lambda_max(D A D): just above the
    Grams' rounding level, relative to each feature's own scale. Directions the inputs reached are
    solved exactly (the least-squares optimum); directions no input reached, or only rounding did,
    keep the plain average instead of being blown up by it.

    ``workspace`` (shaped like ``matrix``, free to overwrite) receives the Cholesky factor, so a
    batch needs no third (B, d, d) tensor. The residual ||A D - rhs||_F is estimated from a block of
    RESIDUAL_PROBES random columns instead of the full product, which would cost as much as the solve.
    """
    dtype = matrix.dtype
    dim = matrix.shape[-1]
    noise = max(noise or 0.0, torch.finfo(dtype).eps)  # the matrix holds no more digits than its dtype
    batch, _, width = rhs.shape
    probes = _probe_block(width, rhs)
    rhs_probed = torch.matmul(rhs, probes)
    out = None if workspace is None else (workspace, torch.empty(batch, dtype=torch.int32, device=matrix.device))
    factor, info = torch.linalg.cholesky_ex(matrix, out=out)
    correction = torch.cholesky_solve(rhs, factor)
    condition = _cholesky_condition(factor)
    ok = (info == 0) & torch.isfinite(condition) & torch.isfinite(correction).flatten(1).all(1) \
        & (_cholesky_condition(factor, matrix) <= 1.0 / noise)
    solver = ["cholesky"] * matrix.shape[0]
    conditions: list[float | None] = condition.tolist()
    ranks: list[int | None] = [None] * matrix.shape[0]

    promote = ok & (condition > PROMOTE_CONDITION.get(dtype, float("inf")))
    for i in promote.nonzero().flatten().tolist():
        factor64, info64 = torch.linalg.cholesky_ex(matrix[i].double())
        if int(info64) == 0 and float(_cholesky_condition(factor64, matrix[i].double())) <= 1.0 / noise:
            correction[i] = torch.cholesky_solve(rhs[i].double(), factor64).to(dtype)
            solver[i] = "cholesky-float64"
        else:
            ok[i] = False

    for i in (~ok).nonzero().flatten().tolist():
        a = matrix[i].double()
        diagonal = a.diagonal().clamp_min(0.0)
        scales = diagonal.clamp_min(noise * (diagonal.max().item() or 1.0))  # dead features: a floor
        inverse_root = scales.rsqrt()
        scaled_eigenvalues = torch.linalg.eigvalsh(a * inverse_root[:, None] * inverse_root[None, :])
        ridge = dim ** 0.5 * noise * scaled_eigenvalues.abs().max().item()
        regularised = a + torch.diag(ridge * scales)
        target = rhs[i].double() + (ridge * scales)[:, None] * fallback_target[i].double()
        correction[i] = torch.linalg.solve(regularised, target).to(dtype)
        solver[i] = "lu-ridge"
        eigenvalues = torch.linalg.eigvalsh(a)
        largest, smallest = eigenvalues.abs().max().item(), eigenvalues.min().item()
        conditions[i] = None if smallest <= noise * largest else largest / smallest
        ranks[i] = int((scaled_eigenvalues > ridge).sum())
        log.info("system %d is singular or nearly (condition %s, rank %d of %d): ridged LU solve", i,
                 "inf" if conditions[i] is None else f"{conditions[i]:.3g}", ranks[i], dim)

    error = torch.linalg.matrix_norm(torch.bmm(matrix, torch.matmul(correction, probes)).sub_(rhs_probed))
    error /= RESIDUAL_PROBES ** 0.5
    solution = anchor.add_(correction)
    scale = torch.linalg.matrix_norm(matrix) * torch.linalg.matrix_norm(solution)
    residual = (error / scale.clamp_min(torch.finfo(dtype).tiny)).tolist()
    return SolveResult(solution, solver, conditions, residual, ranks)
