"""The coefficient-weighted mean of the candidates' parameters, anchored at the first candidate:

    mean = W_1 + (sum_{i>1} c_i (W_i - W_1)) / sum(c)

Equal to sum_i c_i W_i / sum(c) in exact arithmetic; in floating point the sum carries only the
differences between the candidates, so K copies of one model (or K = 1) come back bit for bit, as the
solved layers do (merge/systems.py anchors its solves the same way).

The offset sum_{i>1} c_i (W_i - W_1) is accumulated in float64: differences of float32 (or narrower)
weights are exact there, and so are their sums for the few candidates of a merge, so the offset comes
out the same however the candidates are grouped. It is a plain sum over candidates, so processes that
each hold some candidates (torchrun ranks, RegMean++) sum their offsets before it is divided, once,
and added to the anchor (``anchored_mean(..., sum_offsets=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def add_difference_(offset: torch.Tensor, weights: torch.Tensor, anchor: torch.Tensor, coefficient: float, *,
                    consume: bool = False) -> torch.Tensor:
    """``offset += coefficient * (weights - anchor)`` in place; returns the difference ``weights - anchor``
    (in ``offset``'s dtype and device). With ``consume`` the difference is formed in ``weights``' own
    memory when dtype and device allow (the caller gives it up); otherwise ``weights`` is left alone."""
    difference = weights.to(offset.device, offset.dtype, non_blocking=consume, copy=not consume).sub_(anchor)
    offset.add_(difference, alpha=coefficient)
    return difference


def add_offset_(anchor: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``anchor += offset`` in place, exact where the offset is zero.

    A zero offset is added as -0.0, the one value whose addition leaves every float unchanged, -0.0
    included (+0.0 would turn a -0.0 weight into +0.0). ``offset`` is overwritten.
    """
    return anchor.add_(offset.masked_fill_(offset == 0, -0.0))


def anchored_mean(anchor: torch.Tensor, others: Iterable[tuple[torch.Tensor, float]], coefficient_sum: float, *,
                  sum_offsets: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """``anchor + sum c_i (W_i - anchor) / coefficient_sum`` over ``others`` = (W_i, c_i), read one at a
    time; ``coefficient_sum`` includes the anchor's own coefficient. Integer tensors (position ids) are
    the anchor's.

    Accumulated in float64 (complex128 for complex tensors) and rounded once, to the anchor's dtype. The
    anchor itself is not modified. ``sum_offsets``, when given, sums the offset in place across processes
    (each passing its own ``others``) before it is divided.
    """
    if not (anchor.is_floating_point() or anchor.is_complex()):
        return anchor
    accumulate = torch.promote_types(anchor.dtype, torch.float64)
    base = anchor.to(accumulate, copy=True)
    offset = torch.zeros_like(base)
    for weights, coefficient in others:
        add_difference_(offset, weights, base, coefficient)
    if sum_offsets is not None:
        sum_offsets(offset)
    return add_offset_(base, offset.div_(coefficient_sum)).to(anchor.dtype)
