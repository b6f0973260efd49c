"""The running sums of one batch of RegMean systems, built one candidate at a time, then solved.

For a batch of B systems (equal d and width), with s_i each candidate's Gram scale, c_i its
coefficient, W_1 the first candidate's weights (the anchor) and G~ = a G + (1 - a) diag(G) the
off-diagonal reduction (a = ``reduce_non_diagonal_ratio``):

    S = sum_i s_i G_i                          (B, d(d+1)/2): packed upper triangles, not reduced
    R = sum_{i>1} s_i G~_i (W_i - W_1)^T       (B, d, width)
    T = sum_{i>1} c_i / sum(c) (W_i - W_1)^T   (B, d, width): the plain average's offset, the fallback target

and the merged weights are W_1^T + A^-1 R with A = S~ = a S + (1 - a) diag(S) (``solve.solve_batch``).
The reduction is linear, so it is applied once, to the sum, when ``solve`` unpacks and mirrors S into
the one (d, d) matrix per system; only R needs each candidate's full G~_i, and there the reduction
rides on the product (G~_i D = a (G_i + (1/a - 1) diag(G_i)) D: the diagonal is rescaled, a is the
GEMM's alpha), so no pass over a (d, d) matrix is spent on it.

The anchor and the differences W_i - W_1 are held as their transposes, (B, width, d): the layout in
which nn.Linear stores W, so weights stacked by ``executor.stack_weights`` (the transposed view of
such storage) enter and the solutions leave without a transposing copy (K + 1 of them per batch; the
GEMMs take the transposed operand as it is). R is accumulated row-major, (B, d, width), the layout in
which the triangular solves run fastest (``solve._cholesky_solve``); T, which only the fallback reads,
as T^T. Weights in any other layout work too, through strided views.

Every term is a sum over candidates, so candidates can be added in any grouping: one process adds
them all (``regmean merge``), or each torchrun rank adds its own and the ranks sum ``partial_sums()``
(S packed, R, T^T, all contiguous) element-wise before solving (RegMean++). With
``sum_dtype=torch.float64`` the sums are kept in float64 (the products still run in ``dtype``), which
makes them independent of that grouping to their final rounding.
"""

from __future__ import annotations

import math

import torch

from regmean_pipeline.cache.symmetric import diagonal_positions, packed_length, unpack_upper
from regmean_pipeline.merge.solve import SolveResult, solve_batch


class Buffers:
    """Storage kept from one solve batch to the next: one flat tensor per named use, grown to the
    largest request. A fresh tensor of a batch's size costs a page fault per 4 KiB on first touch,
    which on a CPU takes several times as long as a pass over it once mapped (bench/RESULTS.md)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised (shape) tensor in the storage of ``name``; it stays valid until ``name`` is taken again."""
        key, size = (name, dtype, device), math.prod(shape)
        flat = self._flat.pop(key, None)
        if flat is None or flat.numel() < size:
            del flat  # release the smaller one before the larger one is made
            flat = torch.empty(size, dtype=dtype, device=device)
        self._flat[key] = flat
        return flat[:size].view(shape)


class SystemSums:
    """S (packed), R and T of one solve batch, and its anchor; see the module docstring.

    Memory: S and one candidate's scaled packed Grams (each half a (d, d) matrix per system), one
    (d, d) matrix per system for the candidate's unpacked Grams, which ``solve`` reuses for A, and
    the (d, width) tensors; ``solve`` writes the Cholesky factor over A and keeps S~ packed for the rare
    systems that need A again (``solve.solve_batch``'s ``rebuild``). With ``buffers``
    (one ``Buffers`` for all the batches of a merge, solved one after another) all of these are
    taken from its storage instead of made anew.
    """

    def __init__(self, count: int, dim: int, width: int, *, dtype: torch.dtype, device: torch.device | str,
                 reduce_non_diagonal_ratio: float, sum_dtype: torch.dtype | None = None,
                 buffers: Buffers | None = None) -> None:
        self.count, self.dim, self.width = count, dim, width
        self.dtype, self.device = dtype, torch.device(device)
        self.sum_dtype = sum_dtype or dtype
        self.ratio = reduce_non_diagonal_ratio
        self.buffers = buffers
        self.anchor: torch.Tensor | None = None  # W_1^T as (B, width, d): W_1's own layout
        self.packed_sum: torch.Tensor | None = None  # S
        self.rhs: torch.Tensor | None = None  # R, (B, d, width), row-major: as the triangular solves want it
        self.target: torch.Tensor | None = None  # T^T, (B, width, d)
        self._scaled: torch.Tensor | None = None  # one candidate's s_i G_i, packed
        self._full: torch.Tensor | None = None  # one candidate's s_i G~_i in full (then A)
        self._started = True  # whether R and T hold values (else unfilled storage, see set_anchor)
        self.noise = torch.finfo(dtype).eps

    def _empty(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape, dtype = (self.count, *shape), dtype or self.dtype
        if self.buffers is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self.buffers.take(name, shape, dtype, self.device)

    def _zeros(self, name: str, *shape: int) -> torch.Tensor:
        return self._empty(name, *shape, dtype=self.sum_dtype).zero_()

    def set_anchor(self, weights: torch.Tensor) -> None:
        """The first candidate's (B, d, width) weights; the others enter as differences from them. Consumed:
        ``solve`` adds the corrections to them in place when dtype and device allow."""
        self.anchor = weights.mT.to(self.device, self.dtype)
        if self.sum_dtype == self.dtype:  # filled by the first difference's terms (no zero fill); see _started
            self.rhs = self._empty("rhs", self.dim, self.width)
            self.target = self._empty("target", self.width, self.dim)
            self._started = False
        else:
            self.rhs = self._zeros("rhs", self.dim, self.width)
            self.target = self._zeros("target", self.width, self.dim)
            self._started = True

    def add(self, packed_grams: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor | None = None,
            share: float = 0.0) -> None:
        """Add one candidate: its packed Gram sums (B, d(d+1)/2) times ``scales`` (B,) to S and, with its
        ``weights`` (B, d, width; None for the anchor's own candidate), its terms of R and T. ``weights``
        is consumed: the difference from the anchor is formed in its memory when dtype and device allow."""
        # The Grams' own precision: the solver treats conditions beyond it as singular.
        self.noise = max(self.noise, torch.finfo(packed_grams.dtype).eps)
        packed = packed_grams.to(self.device, non_blocking=True)
        if self.sum_dtype == self.dtype and bool((scales == scales[0]).all()):
            # One scale for the whole batch (the usual case: every layer saw the same tokens): it rides on
            # the sum's axpy and the product's alpha, and the Grams are never scaled on their own.
            scale, grams = float(scales[0]), packed
            if self.packed_sum is None:
                self.packed_sum = torch.mul(packed, scale, out=self._empty("packed_sum", packed_length(self.dim)))
            else:
                self.packed_sum.add_(packed, alpha=scale)
        else:
            scale = 1.0
            column = scales.to(self.device, self.dtype).view(-1, 1)
            if self._scaled is None:
                self._scaled = self._empty("scaled", packed_length(self.dim))
            grams = torch.mul(packed, column, out=self._scaled)
            if self.packed_sum is None:
                self.packed_sum = self._empty("packed_sum", packed_length(self.dim), dtype=self.sum_dtype)
                self.packed_sum.copy_(grams)
            else:
                self.packed_sum += grams
        if weights is not None:
            if self.anchor is None:
                raise ValueError("set_anchor() before adding a candidate's weights")
            difference = weights.mT.to(self.device, self.dtype, non_blocking=True).sub_(self.anchor)
            if self._started:
                self.target.add_(difference, alpha=share)
            else:
                torch.mul(difference, share, out=self.target)
            self._add_product(grams, scale, difference.mT)
            self._started = True

    def _add_product(self, packed: torch.Tensor, scale: float, difference: torch.Tensor) -> None:
        """R += scale G~ D for one candidate's packed Grams G and its (B, d, width) difference D from the
        anchor (R = scale G~ D for the first: ``beta`` 0 reads nothing of R's unfilled storage)."""
        if self.ratio == 0.0:  # G~ = diag(G): a scaling of the rows, no product
            diagonal = packed[:, diagonal_positions(self.dim, str(self.device))].to(self.dtype).mul_(scale)
            if self._started:
                self.rhs.addcmul_(diagonal.unsqueeze(-1), difference)
            else:
                torch.mul(diagonal.unsqueeze(-1), difference, out=self.rhs)
            return
        if self._full is None:
            self._full = self._empty("full", self.dim, self.dim)
        full = unpack_upper(packed, self.dim, out=self._full)
        if self.ratio != 1.0:
            full.diagonal(dim1=-2, dim2=-1).div_(self.ratio)
        if self.sum_dtype == self.dtype:
            self.rhs.baddbmm_(full, difference, alpha=self.ratio * scale, beta=1.0 if self._started else 0.0)
        else:  # the product, a included, rounded in ``dtype``: float64 sums of those are exact
            self.rhs += torch.baddbmm(difference, full, difference, beta=0.0, alpha=self.ratio)  # beta 0: no input

    def _ensure_started(self) -> None:
        """R and T hold zeros if no difference has filled them yet (K = 1, or no candidate of this process)."""
        if not self._started:
            self.rhs.zero_()
            self.target.zero_()
            self._started = True

    def partial_sums(self) -> list[torch.Tensor]:
        """S (packed, (B, d(d+1)/2), before the off-diagonal reduction), R ((B, d, width)) and T^T
        ((B, width, d)): the live tensors, all contiguous, to sum element-wise across processes before
        ``solve`` (zeros where this process added nothing)."""
        if self.packed_sum is None:
            self.packed_sum = self._zeros("packed_sum", packed_length(self.dim))
        if self.rhs is None:
            self.rhs, self.target = self._zeros("rhs", self.dim, self.width), self._zeros("target", self.width, self.dim)
        else:
            self._ensure_started()
        return [self.packed_sum, self.rhs, self.target]

    @classmethod
    def blend(cls, full: SystemSums, diagonal: SystemSums, ratio: float) -> SystemSums:
        """The sums at ``reduce_non_diagonal_ratio`` = ``ratio``, from the same candidates added at 1 and at 0.

        R is linear in a (R(a) = a R(1) + (1 - a) R(0)) and S, T and the anchor do not depend on it, so a
        sweep over a adds every candidate twice and solves each a from these, without reading any
        candidate again. ``full`` and ``diagonal`` are left as they are (the result holds copies)."""
        blended = cls(full.count, full.dim, full.width, dtype=full.dtype, device=full.device,
                      reduce_non_diagonal_ratio=ratio, sum_dtype=full.sum_dtype)
        full._ensure_started()
        diagonal._ensure_started()
        blended.anchor = full.anchor.clone()
        blended.packed_sum = full.packed_sum.clone()
        blended.rhs = torch.add(full.rhs * ratio, diagonal.rhs, alpha=1.0 - ratio)
        blended.target = full.target.clone()
        blended.noise = max(full.noise, diagonal.noise)
        return blended

    def solve(self, noise: float | None = None) -> SolveResult:
        """anchor + A^-1 R for every system (``solve.solve_batch``: Cholesky, float64 redo, ridge fallback),
        as (B, d, width) in the anchor's own memory and layout."""
        if self.packed_sum is None or self.anchor is None:
            raise ValueError("no candidate was added")
        self._ensure_started()
        matrix = self._full if self._full is not None else self._empty("full", self.dim, self.dim)
        packed = self._reduced_sum()
        unpack_upper(packed, self.dim, out=matrix)
        rhs, target = self.rhs.to(self.dtype), self.target.to(self.dtype).mT
        self.packed_sum = self._scaled = self._full = self.rhs = self.target = None
        correction = None if self.buffers is None else self._empty("correction", self.dim, self.width)
        result = solve_batch(matrix, rhs, self.anchor.mT, target, noise=max(self.noise, noise or 0.0),
                             rebuild=lambda i: unpack_upper(packed[i], self.dim).to(self.dtype),
                             correction_out=correction)
        self.anchor = None
        return result

    def _reduced_sum(self) -> torch.Tensor:
        """S~ = a S + (1 - a) diag(S), in place on the packed S (in the sums' dtype, rounded once after)."""
        if self.ratio != 1.0:
            positions = diagonal_positions(self.dim, str(self.device))
            diagonal = self.packed_sum[:, positions]
            self.packed_sum.mul_(self.ratio)
            self.packed_sum[:, positions] = diagonal
        return self.packed_sum
