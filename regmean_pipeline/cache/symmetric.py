"""Symmetric matrices at half the cost: Gram products computed on the upper triangle only, and
packed storage of that triangle (row-major) on disk."""

from __future__ import annotations

import functools

import torch

# The product runs by block rows: block i multiplies its columns by every column from its own
# start on, so only blocks on or above the diagonal are computed. With 4 block rows that is 62.5%
# of the full product's flops; more, smaller blocks save less than they lose to smaller GEMMs.
GRAM_BLOCK_ROWS = 4
MIN_GRAM_BLOCK = 256


def packed_length(dim: int) -> int:
    return dim * (dim + 1) // 2


def dim_from_packed_length(length: int) -> int:
    dim = int(((8 * length + 1) ** 0.5 - 1) // 2)
    while packed_length(dim) < length:
        dim += 1
    if packed_length(dim) != length:
        raise ValueError(f"{length} is not the length of a packed triangle")
    return dim


@functools.lru_cache(maxsize=64)
def upper_blocks(dim: int) -> tuple[tuple[int, int], ...]:
    """(start, stop) of the block rows the symmetric product is split into (one block below
    2 * MIN_GRAM_BLOCK: there, smaller GEMMs lose more speed than the triangle saves)."""
    if dim < 2 * MIN_GRAM_BLOCK:
        return ((0, dim),)
    block = max(MIN_GRAM_BLOCK, -(-dim // GRAM_BLOCK_ROWS))
    block = -(-block // 64) * 64  # multiples of 64 keep the GEMM tiles aligned
    return tuple((start, min(start + block, dim)) for start in range(0, dim, block))


def upper_product_flops(rows: int, dim: int) -> int:
    """Multiply-adds x 2 that ``accumulate_upper_`` spends on ``rows`` rows of width ``dim``."""
    return sum(2 * rows * (stop - start) * (dim - start) for start, stop in upper_blocks(dim))


def accumulate_upper_(total: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """total += rows^T rows on and above the block diagonal, in place (one addmm_ per block row).

    Blocks below the diagonal are left as they are; ``mirror_upper_`` fills them once at the end.
    No new (d, d) tensor is made: each addmm_ writes straight into a view of ``total``.
    """
    for start, stop in upper_blocks(rows.shape[-1]):
        total[start:stop, start:].addmm_(rows[:, start:stop].transpose(0, 1), rows[:, start:])
    return total


# Side of the square blocks the mirror copies at a time. A block row of the upper triangle (MIRROR_BLOCK
# rows of d values: 1.4 MiB at d = 2816) is copied, transposed, into the block column below the diagonal
# while it is still in cache; the transposed reads then cost no more than a plain copy. Measured on a
# 2-core AVX-512 EPYC (bench/RESULTS.md): 64 and 256 were slower, the (d, d) temporary of
# ``triu(1) + transpose`` about ten times slower.
MIRROR_BLOCK = 128


def mirror_upper_(matrix: torch.Tensor) -> torch.Tensor:
    """Make contiguous (..., d, d) matrices symmetric from their upper triangles, in place.

    Nothing below the diagonal is read, so it may hold anything (an unfilled buffer), and every value
    is copied, never added to (a -0.0 stays -0.0). Block row by block row: the diagonal block through
    one small temporary, the rest as one transposed copy.
    """
    dim = matrix.shape[-1]
    squares = matrix.view(-1, dim, dim)
    for start in range(0, dim, MIRROR_BLOCK):
        stop = min(start + MIRROR_BLOCK, dim)
        diagonal_block = squares[:, start:stop, start:stop]
        below = _strict_lower_mask(stop - start, str(matrix.device))
        diagonal_block.copy_(torch.where(below, diagonal_block.mT, diagonal_block))
        if stop < dim:
            squares[:, stop:, start:stop].copy_(squares[:, start:stop, stop:].mT)
    return matrix


@functools.lru_cache(maxsize=16)
def _strict_lower_mask(size: int, device: str) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril_(-1)


@functools.lru_cache(maxsize=8)
def _upper_mask(dim: int, device: str) -> torch.Tensor:
    # A boolean mask is d^2 bytes, a quarter of the float32 matrix; index tensors would be 4x the matrix.
    return torch.ones(dim, dim, dtype=torch.bool, device=device).triu_()


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Upper triangle of a (d, d) matrix, row by row, as a 1-D tensor of d(d+1)/2 values."""
    dim = matrix.shape[-1]
    return torch.masked_select(matrix, _upper_mask(dim, str(matrix.device)))


def unpack_upper(packed: torch.Tensor, dim: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The full symmetric (..., d, d) matrices from packed upper triangles (..., d(d+1)/2), written
    into ``out`` when given (no other (d, d) tensor is made; ``out`` may hold anything before).

    Up to ``GATHER_MAX_DIM``, one gather from the packed values. Beyond it, row i of the triangle is one
    contiguous run of the packed values: the d runs are copied in one ``_foreach_copy_`` (masked_scatter_
    tests the mask element by element, on one thread), then mirrored.
    """
    dim = dim if dim is not None else dim_from_packed_length(packed.shape[-1])
    full = packed.new_empty(*packed.shape[:-1], dim, dim) if out is None else out
    packed = packed.to(full.device, full.dtype)
    if dim <= GATHER_MAX_DIM and full.is_contiguous():
        flat_packed, flat_full = packed.reshape(-1, packed.shape[-1]), full.view(-1, dim * dim)
        torch.index_select(flat_packed, 1, _symmetric_positions(dim, str(full.device)), out=flat_full)
        return full
    rows = packed.split(_row_lengths(dim), dim=-1)
    torch._foreach_copy_([full[..., i, i:] for i in range(dim)], rows)
    return mirror_upper_(full)


# Up to this d one gather (an int32 index as large as a float32 matrix) builds the whole matrix in
# one pass, 2 to 5 times faster than the row copies and mirror below on the 2-core EPYC of
# bench/RESULTS.md; beyond it, the mirror's cache-friendly blocks win (the gather's reads of the lower
# triangle stride through the packed values).
GATHER_MAX_DIM = 1536


@functools.lru_cache(maxsize=8)
def _symmetric_positions(dim: int, device: str) -> torch.Tensor:
    """For every entry (i, j) of a (d, d) matrix, row-major: where (min, max) sits in the packed triangle."""
    index = torch.arange(dim, device=device, dtype=torch.int32)  # d(d+1)/2 < 2^31 up to GATHER_MAX_DIM
    starts = index * dim - index * (index - 1) // 2  # where row i's run (i, i..d-1) begins
    upper = starts.view(-1, 1) + (index.view(1, -1) - index.view(-1, 1))  # (i, j) for j >= i
    return torch.where(index.view(1, -1) >= index.view(-1, 1), upper, upper.mT).reshape(-1)


@functools.lru_cache(maxsize=16)
def _row_lengths(dim: int) -> tuple[int, ...]:
    return tuple(range(dim, 0, -1))


@functools.lru_cache(maxsize=16)
def diagonal_positions(dim: int, device: str) -> torch.Tensor:
    """Where the diagonal of a (d, d) matrix sits in its packed upper triangle (row-major)."""
    rows = torch.arange(dim, device=device)
    return rows * dim - rows * (rows - 1) // 2
