"""Packed storage of symmetric matrices: only the upper triangle (row-major) travels to disk."""

from __future__ import annotations

import functools

import torch


def packed_length(dim: int) -> int:
    return dim * (dim + 1) // 2


def dim_from_packed_length(length: int) -> int:
    dim = int(((8 * length + 1) ** 0.5 - 1) // 2)
    while packed_length(dim) < length:
        dim += 1
    if packed_length(dim) != length:
        raise ValueError(f"{length} is not the length of a packed triangle")
    return dim


@functools.lru_cache(maxsize=8)
def _upper_mask(dim: int, device: str) -> torch.Tensor:
    # A boolean mask is d^2 bytes, a quarter of the float32 matrix; index tensors would be 4x the matrix.
    return torch.ones(dim, dim, dtype=torch.bool, device=device).triu_()


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Upper triangle of a (d, d) matrix, row by row, as a 1-D tensor of d(d+1)/2 values."""
    dim = matrix.shape[-1]
    return matrix[_upper_mask(dim, str(matrix.device))]


def unpack_upper(packed: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The full symmetric (d, d) matrix from its packed upper triangle."""
    dim = dim if dim is not None else dim_from_packed_length(packed.numel())
    full = packed.new_zeros(dim, dim)
    full[_upper_mask(dim, str(packed.device))] = packed
    full += full.triu(1).transpose(0, 1)
    return full
