"""The RegMean linear systems, solved in batches without inverses.

With A = sum_i G~_i and the first candidate's W_1^T as anchor, RegMean's
    X = A^-1 sum_i G~_i W_i^T
is solved as X = W_1^T + A^-1 sum_{i>1} G~_i (W_i - W_1)^T. Same answer in exact arithmetic, but the
solve only carries the small differences between fine-tunes, so its rounding error shrinks with
them: K copies of one model (or K = 1) come back bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def _cholesky_in_place(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factors of symmetric ``matrix`` written over it (and LAPACK's info), column-major.

    LAPACK works on column-major matrices: given row-major ones, torch copies the input into a
    column-major temporary and copies the factor back. A symmetric matrix read transposed is itself, so
    handing it over as ``matrix.mT`` (column-major), with that same view as the output, makes torch's
    CPU path factor it in place: no temporary, no second (d, d) buffer, and no copy of the matrix (given two
    views of it, torch copies each value onto itself before zeroing the other triangle, at strided
    addresses: 287 ms against 237 ms for a batch of four d = 2816 systems on the bench's 2-core EPYC).
    """
    info = torch.empty(matrix.shape[:-2], dtype=torch.int32, device=matrix.device)
    column_major = matrix.mT  # one view for input and output: torch then sees an in-place call and only
    return torch.linalg.cholesky_ex(column_major, out=(column_major, info))  # zeroes the other triangle


def _cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A^-1 rhs from the lower factor L of A = L L^T: two triangular solves in one new row-major tensor.

    MKL's triangular solves run about twice as fast on a right-hand side whose rows (the width) are
    contiguous as on one whose columns are (measured on AVX-512 for d = 1024, width 3072 to 5632; as
    fast as a GEMM of the same flops), so rhs is copied into a row-major correction, whatever its own
    layout (``out``: a contiguous tensor shaped like rhs), and solved there in place: ``solve_triangular``
    with ``out`` solves the transposed system for a row-major right-hand side and reads a column-major
    factor as it is. (``torch.cholesky_solve`` instead clones both operands into column-major copies.)
    """
    correction = torch.empty(rhs.shape, dtype=rhs.dtype, device=rhs.device) if out is None else out
    torch.linalg.solve_triangular(factor, rhs, upper=False, out=correction)
    return torch.linalg.solve_triangular(factor.mT, correction, upper=True, out=correction)


def _add_corrections_(anchor: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """anchor += correction, in place, for the systems whose correction is not zero everywhere; the others
    (every candidate equal to the anchor there) keep the anchor bit for bit, -0.0 included, which adding
    a +0.0 correction would turn into +0.0."""
    moved = correction.flatten(1).any(1)
    if bool(moved.all()):
        return anchor.add_(correction)
    for i in moved.nonzero().flatten().tolist():
        anchor[i].add_(correction[i])
    return anchor


def _cholesky_condition(factor: torch.Tensor, matrix_diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """Condition estimate from the Cholesky factor's diagonal; with the matrix's own diagonal, that of
    the equilibrated system D A D (D = diag(A)^-1/2), which scaling of the features alone does not worsen."""
    diagonal = factor.diagonal(dim1=-2, dim2=-1).abs()
    if matrix_diagonal is not None:
        diagonal = diagonal / matrix_diagonal.abs().sqrt().clamp_min(torch.finfo(factor.dtype).tiny)
    return (diagonal.amax(-1) / diagonal.amin(-1).clamp_min(torch.finfo(factor.dtype).tiny)) ** 2


# Columns of the random probe block that estimates the residual (see solve_batch).
RESIDUAL_PROBES = 8


def _probe_block(rows: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed standard normal (rows, p) block: E||E v||^2 = ||E||_F^2 for v ~ N(0, I)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, RESIDUAL_PROBES, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


def solve_batch(matrix: torch.Tensor, rhs: torch.Tensor, anchor: torch.Tensor,
                fallback_target: torch.Tensor, *, noise: float | None = None,
                rebuild: Callable[[int], torch.Tensor] | None = None,
                correction_out: torch.Tensor | None = None) -> SolveResult:
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

    With ``rebuild``, ``matrix`` is overwritten by its Cholesky factor (no second (d, d) tensor is made);
    the float64 redo and the fallback, which only rare systems take, then get a system's matrix from
    ``rebuild(i)`` (``SystemSums`` keeps it packed, at half the size). Without it, the factor goes into a
    copy and ``matrix`` is left as it is.
    ``correction_out``, when given, is a tensor shaped like ``rhs`` free to overwrite: it receives the
    correction, which is otherwise made anew.

    The residual ||A D - rhs||_F is estimated from RESIDUAL_PROBES random rows, P^T (A D - rhs) =
    (A P)^T D - P^T rhs, instead of the full product, which would cost as much as the solve. A P is
    formed before the factorisation overwrites A, so the estimate needs nothing of A after it.
    """
    if rebuild is None:  # the caller's matrix is left as it is: the factor goes into a copy
        rebuild, matrix = matrix.__getitem__, matrix.clone()
    dtype = matrix.dtype
    dim = matrix.shape[-1]
    noise = max(noise or 0.0, torch.finfo(dtype).eps)  # the matrix holds no more digits than its dtype
    probes = _probe_block(dim, matrix)
    matrix_probed = torch.matmul(matrix, probes)  # A P = (P^T A)^T: A is symmetric
    rhs_probed = torch.matmul(probes.mT, rhs)
    matrix_diagonal = matrix.diagonal(dim1=-2, dim2=-1).clone()
    matrix_size = torch.linalg.matrix_norm(matrix)
    factor, info = _cholesky_in_place(matrix)
    correction = _cholesky_solve(factor, rhs, correction_out)

    def residual_block(i: int | slice = slice(None)) -> torch.Tensor:
        """P^T (A D - rhs) of the systems i: a NaN or Inf anywhere in a correction reaches it (A P has no
        zero row where Cholesky succeeds), so it doubles as the finiteness check, at the cost of one read
        where isfinite() makes four passes and three temporaries as large as the correction."""
        return torch.matmul(matrix_probed[i].mT, correction[i]).sub_(rhs_probed[i])

    residuals = residual_block()
    condition = _cholesky_condition(factor)
    ok = (info == 0) & torch.isfinite(condition) & torch.isfinite(residuals).flatten(1).all(1) \
        & (_cholesky_condition(factor, matrix_diagonal) <= 1.0 / noise)
    solver = ["cholesky"] * matrix.shape[0]
    conditions: list[float | None] = condition.tolist()
    ranks: list[int | None] = [None] * matrix.shape[0]

    promote = ok & (condition > PROMOTE_CONDITION.get(dtype, float("inf")))
    for i in promote.nonzero().flatten().tolist():
        a = rebuild(i).double()
        factor64, info64 = torch.linalg.cholesky_ex(a)
        if int(info64) == 0 and float(_cholesky_condition(factor64, a.diagonal())) <= 1.0 / noise:
            correction[i] = torch.cholesky_solve(rhs[i].double(), factor64).to(dtype)
            residuals[i] = residual_block(i)
            solver[i] = "cholesky-float64"
        else:
            ok[i] = False

    for i in (~ok).nonzero().flatten().tolist():
        a = rebuild(i).double()
        diagonal = a.diagonal().clamp_min(0.0)
        scales = diagonal.clamp_min(noise * (diagonal.max().item() or 1.0))  # dead features: a floor
        inverse_root = scales.rsqrt()
        scaled_eigenvalues = torch.linalg.eigvalsh(a * inverse_root[:, None] * inverse_root[None, :])
        ridge = dim ** 0.5 * noise * scaled_eigenvalues.abs().max().item()
        regularised = a + torch.diag(ridge * scales)
        target = rhs[i].double() + (ridge * scales)[:, None] * fallback_target[i].double()
        correction[i] = torch.linalg.solve(regularised, target).to(dtype)
        residuals[i] = residual_block(i)
        solver[i] = "lu-ridge"
        eigenvalues = torch.linalg.eigvalsh(a)
        largest, smallest = eigenvalues.abs().max().item(), eigenvalues.min().item()
        conditions[i] = None if smallest <= noise * largest else largest / smallest
        ranks[i] = int((scaled_eigenvalues > ridge).sum())
        log.info("system %d is singular or nearly (condition %s, rank %d of %d): ridged LU solve", i,
                 "inf" if conditions[i] is None else f"{conditions[i]:.3g}", ranks[i], dim)

    error = torch.linalg.matrix_norm(residuals) / RESIDUAL_PROBES ** 0.5
    solution = _add_corrections_(anchor, correction)
    scale = matrix_size * torch.linalg.matrix_norm(solution)
    residual = (error / scale.clamp_min(torch.finfo(dtype).tiny)).tolist()
    return SolveResult(solution, solver, conditions, residual, ranks)
