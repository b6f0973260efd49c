"""The running sums of one batch of RegMean systems, built one candidate at a time, then solved.

For a batch of B systems (equal d and width), with s_i each candidate's Gram scale, c_i its
coefficient and W_1 the first candidate's weights (the anchor):

    A = sum_i s_i G~_i                       (B, d, d)
    R = sum_{i>1} s_i G~_i (W_i - W_1)^T     (B, d, width)
    T = sum_{i>1} c_i / sum(c) (W_i - W_1)^T (B, d, width): the plain average's offset, the fallback target

and the merged weights are W_1^T + A^-1 R (``solve.solve_batch``). Every term is a sum over candidates,
so candidates can be added in any grouping: one process adds them all (``regmean merge``), or each
torchrun rank adds its own and the ranks sum ``partial_sums()`` before solving (RegMean++).
"""

from __future__ import annotations

import torch

from regmean_pipeline.cache.symmetric import unpack_upper
from regmean_pipeline.merge.solve import SolveResult, reduce_off_diagonal_, solve_batch


class SystemSums:
    """A, R and T of one solve batch, and its anchor; see the module docstring."""

    def __init__(self, count: int, dim: int, width: int, *, dtype: torch.dtype, device: torch.device | str,
                 reduce_non_diagonal_ratio: float, sum_dtype: torch.dtype | None = None) -> None:
        self.count, self.dim, self.width = count, dim, width
        self.dtype, self.device = dtype, torch.device(device)
        # Summing in float64 (products still in ``dtype``) makes A, R and T independent of the order and
        # grouping in which candidates are added, to their final rounding: what lets processes that each
        # sum their own candidates agree with one process that sums them all.
        self.sum_dtype = sum_dtype or dtype
        self.ratio = reduce_non_diagonal_ratio
        self.anchor: torch.Tensor | None = None
        self.matrix: torch.Tensor | None = None  # A
        self.rhs: torch.Tensor | None = None  # R
        self.target: torch.Tensor | None = None  # T
        self._grams: torch.Tensor | None = None  # one candidate's G~ (then the Cholesky factor)
        self.noise = torch.finfo(dtype).eps

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(self.count, *shape, dtype=self.sum_dtype, device=self.device)

    def set_anchor(self, weights: torch.Tensor) -> None:
        """The first candidate's (B, d, width) weights; the others enter as differences from them."""
        self.anchor = weights.to(self.device, self.dtype)
        self.rhs = self._zeros(self.dim, self.width)
        self.target = self._zeros(self.dim, self.width)

    def add(self, packed_grams: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor | None = None,
            share: float = 0.0) -> None:
        """Add one candidate: its packed Gram sums (B, d(d+1)/2) times ``scales`` (B,) to A and, with its
        ``weights`` (B, d, width; None for the anchor's own candidate), its terms of R and T."""
        # The Grams' own precision: the solver treats conditions beyond it as singular.
        self.noise = max(self.noise, torch.finfo(packed_grams.dtype).eps)
        first = self.matrix is None
        if first and self.sum_dtype == self.dtype:  # the first Grams land in the sum itself
            self.matrix = torch.empty(self.count, self.dim, self.dim, dtype=self.dtype, device=self.device)
            into = self.matrix
        else:
            if self._grams is None:
                self._grams = torch.empty(self.count, self.dim, self.dim, dtype=self.dtype, device=self.device)
            into = self._grams
        unpack_upper(packed_grams.to(self.device, non_blocking=True), self.dim, out=into)
        into.mul_(scales.to(self.device, self.dtype).view(-1, 1, 1))
        reduce_off_diagonal_(into, self.ratio)
        if first and into is not self.matrix:
            self.matrix = into.to(self.sum_dtype, copy=True)
        elif not first:
            self.matrix += into
        if weights is not None:
            if self.anchor is None:
                raise ValueError("set_anchor() before adding a candidate's weights")
            delta = weights.to(self.device, self.dtype, non_blocking=True).sub_(self.anchor)
            if self.sum_dtype == self.dtype:
                self.rhs.baddbmm_(into, delta)
            else:
                self.rhs += torch.bmm(into, delta)
            self.target.add_(delta, alpha=share)

    def partial_sums(self) -> list[torch.Tensor]:
        """A, R and T as tensors to sum across processes (zeros where this process added nothing)."""
        if self.matrix is None:
            self.matrix = self._zeros(self.dim, self.dim)
        if self.rhs is None:
            self.rhs, self.target = self._zeros(self.dim, self.width), self._zeros(self.dim, self.width)
        return [self.matrix, self.rhs, self.target]

    def solve(self, noise: float | None = None) -> SolveResult:
        """anchor + A^-1 R for every system (``solve.solve_batch``: Cholesky, float64 redo, ridge fallback)."""
        if self.matrix is None or self.anchor is None:
            raise ValueError("no candidate was added")
        matrix, rhs, target = (tensor.to(self.dtype) for tensor in (self.matrix, self.rhs, self.target))
        result = solve_batch(matrix, rhs, self.anchor, target, noise=max(self.noise, noise or 0.0),
                             workspace=self._grams)
        self.matrix = self.rhs = self.target = self.anchor = self._grams = None
        return result
