"""The fused solve sums (SystemSums) and the anchored mean, on synthetic systems: against a float64 closed
form, built in parts and summed, and bit for bit on copies of one model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regmean_pipeline.cache import symmetric as symmetric_module
from regmean_pipeline.cache.symmetric import MIRROR_BLOCK, mirror_upper_, pack_upper, unpack_upper
from regmean_pipeline.io.weights import StateDictWeights
from regmean_pipeline.merge import executor
from regmean_pipeline.merge.averaging import add_difference_, add_offset_, anchored_mean
from regmean_pipeline.merge.plan import Candidate
from regmean_pipeline.merge.systems import Buffers, SystemSums
from tests.reference import relative_error

BATCH, DIM, WIDTH = 3, 2 * MIRROR_BLOCK + 40, 24  # three mirror blocks, the last one partial


def systems(seed: int, count: int = 4, dim: int = DIM, uniform: bool = False):
    """Float64 Grams (well conditioned, of different scales), weights, Gram scales and coefficients.
    ``uniform``: one scale per candidate for all its systems (every layer saw the same tokens), which
    ``SystemSums`` folds into its axpy and GEMM instead of scaling the Grams."""
    generator = torch.Generator().manual_seed(seed)
    grams, weights = [], []
    for _ in range(count):
        x = torch.randn(BATCH, 3 * dim, dim, generator=generator, dtype=torch.float64)
        x *= torch.rand(dim, generator=generator, dtype=torch.float64) + 0.1  # features of unequal scale
        grams.append(x.mT @ x)
        weights.append(torch.randn(BATCH, dim, WIDTH, generator=generator, dtype=torch.float64))
    scales = [torch.rand(BATCH, generator=generator, dtype=torch.float64) + 0.5 for _ in range(count)]
    if uniform:
        scales = [s.new_full(s.shape, float(s[0])) for s in scales]
    coefficients = [1.0, 2.0, 0.5, 1.5][:count]
    return grams, weights, scales, coefficients


def reduced(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    return ratio * gram + (1 - ratio) * torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1))


def closed_form(grams, weights, scales, ratio) -> np.ndarray:
    """RegMean in float64 from the formula: (sum_i s_i G~_i)^-1 sum_i s_i G~_i W_i."""
    matrix = sum(reduced(s[:, None, None] * g, ratio) for s, g in zip(scales, grams))
    rhs = sum(reduced(s[:, None, None] * g, ratio) @ w for s, g, w in zip(scales, grams, weights))
    return np.linalg.solve(matrix.numpy(), rhs.numpy())  # numpy: independent of the code under test


def packed(gram: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([pack_upper(m) for m in gram.to(dtype)])


def stacked(weights: torch.Tensor, dtype=torch.float32, out_major: bool = True) -> torch.Tensor:
    """(B, d, width) weights as ``executor.stack_weights`` gives them (the transposed view of (B, width, d)
    storage), or contiguous."""
    return weights.mT.to(dtype).contiguous().mT if out_major else weights.to(dtype, copy=True)


def fill(sums: SystemSums, grams, weights, scales, coefficients, members, dtype=torch.float32,
         out_major: bool = True) -> None:
    """Add the candidates ``members`` (indices; 0 is the anchor's own) to ``sums``, as the executor does."""
    for i in members:
        extra = () if i == 0 else (stacked(weights[i], dtype, out_major), coefficients[i] / sum(coefficients))
        sums.add(packed(grams[i], dtype), scales[i], *extra)


def new_sums(ratio: float, dtype=torch.float32, sum_dtype=None) -> SystemSums:
    return SystemSums(BATCH, DIM, WIDTH, dtype=dtype, device="cpu", reduce_non_diagonal_ratio=ratio,
                      sum_dtype=sum_dtype)


@pytest.mark.parametrize("ratio", [0.95, 0.6, 1.0, 0.0])
@pytest.mark.parametrize("dtype, sum_dtype, tolerance", [(torch.float32, None, 2e-5),
                                                         (torch.float32, torch.float64, 2e-5),
                                                         (torch.float64, None, 1e-12)])
@pytest.mark.parametrize("out_major", [True, False])
@pytest.mark.parametrize("uniform", [False, True], ids=["scales-per-system", "one-scale"])
def test_fused_sums_solve_to_the_float64_closed_form(ratio, dtype, sum_dtype, tolerance, out_major, uniform):
    """Scales, the off-diagonal reduction (applied once to the packed sum, and through the GEMM's alpha
    per candidate) and the anchoring, against RegMean's formula in float64; weights in the executor's
    layout and in a plain contiguous one."""
    grams, weights, scales, coefficients = systems(seed=1, uniform=uniform)
    sums = new_sums(ratio, dtype, sum_dtype)
    sums.set_anchor(stacked(weights[0], dtype, out_major))
    fill(sums, grams, weights, scales, coefficients, range(4), dtype, out_major)
    result = sums.solve()
    assert result.solver == ["cholesky"] * BATCH
    assert relative_error(result.solution, closed_form(grams, weights, scales, ratio)) < tolerance
    # The fallback target T is the coefficient-weighted mean's offset from the anchor.
    assert max(result.residual) < 100 * torch.finfo(dtype).eps


@pytest.mark.parametrize("sum_dtype", [None, torch.float64])
def test_partial_sums_of_two_processes_add_up_to_one(sum_dtype):
    """Each 'process' adds its own candidates; their partial sums, added element-wise, solve as one."""
    grams, weights, scales, coefficients = systems(seed=2)
    whole = new_sums(0.95, sum_dtype=sum_dtype)
    whole.set_anchor(stacked(weights[0]))
    fill(whole, grams, weights, scales, coefficients, range(4))
    parts = [new_sums(0.95, sum_dtype=sum_dtype), new_sums(0.95, sum_dtype=sum_dtype)]
    for part, members in zip(parts, ([0, 2], [1, 3])):
        part.set_anchor(stacked(weights[0]))
        fill(part, grams, weights, scales, coefficients, members)
    totals = [a + b for a, b in zip(*(part.partial_sums() for part in parts))]
    for live, total in zip(parts[0].partial_sums(), totals):  # the summed state goes back in place
        live.copy_(total)
    assert [t.shape for t in totals] == [(BATCH, DIM * (DIM + 1) // 2), (BATCH, DIM, WIDTH), (BATCH, WIDTH, DIM)]
    assert all(t.is_contiguous() for t in parts[1].partial_sums())  # as torch.distributed needs them
    expected = whole.solve().solution
    solution = parts[0].solve().solution
    if sum_dtype is None:
        assert relative_error(solution, expected.double().numpy()) < 1e-6
    else:  # float64 sums: the grouping does not reach the solve's inputs
        assert torch.equal(solution, expected)
    empty = new_sums(0.95)  # a process with no candidate contributes zeros
    assert all(not t.any() for t in empty.partial_sums())


@pytest.mark.parametrize("ratio", [0.95, 0.0])
@pytest.mark.parametrize("uniform", [False, True], ids=["scales-per-system", "one-scale"])
def test_copies_of_one_model_come_back_bit_for_bit(ratio, uniform):
    grams, weights, scales, _ = systems(seed=3, uniform=uniform)
    anchor = weights[0].float()
    anchor[0, :5, 0] = -0.0  # signed zeros survive too
    sums = new_sums(ratio)
    sums.set_anchor(stacked(anchor))
    sums.add(packed(grams[0]), scales[0])
    for i in (1, 2, 3):
        sums.add(packed(grams[i]), scales[i], stacked(anchor), 0.25)
    solution = sums.solve().solution
    assert solution.contiguous().numpy().tobytes() == anchor.numpy().tobytes()


@pytest.mark.parametrize("gather_max_dim", [0, DIM], ids=["row-copies-and-mirror", "one-gather"])
def test_mirror_reads_only_the_upper_triangle_and_copies_exactly(monkeypatch, gather_max_dim):
    """Both ways of unpacking (below and above symmetric.GATHER_MAX_DIM) give the matrix byte for byte."""
    monkeypatch.setattr(symmetric_module, "GATHER_MAX_DIM", gather_max_dim)
    torch.manual_seed(0)
    x = torch.randn(2, DIM, DIM)
    symmetric = x + x.mT
    symmetric[0, 3, 7] = symmetric[0, 7, 3] = -0.0
    buffer = torch.full_like(symmetric, float("nan"))
    unpack_upper(torch.stack([pack_upper(m) for m in symmetric]), DIM, out=buffer)
    assert buffer.numpy().tobytes() == symmetric.numpy().tobytes()
    garbage = symmetric.clone()
    garbage[:, torch.ones(DIM, DIM, dtype=torch.bool).tril_(-1)] = float("inf")
    assert mirror_upper_(garbage).numpy().tobytes() == symmetric.numpy().tobytes()


def test_anchored_mean_is_exact_on_copies_and_rounds_once():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        anchor = torch.randn(50, 7).to(dtype)
        anchor[0, 0] = -0.0
        copies = anchored_mean(anchor, [(anchor.clone(), 2.0), (anchor.clone(), 0.5)], 3.5)
        assert copies.dtype == dtype and copies.view(torch.uint8).equal(anchor.view(torch.uint8))
    tensors = [torch.randn(1000) * 10 for _ in range(3)]
    coefficients = [1.0, 2.0, 3.0]
    mean = anchored_mean(tensors[0], list(zip(tensors[1:], coefficients[1:])), 6.0)
    exact = sum(c * t.double() for c, t in zip(coefficients, tensors)) / 6
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    assert ((mean.double() - exact).abs() <= 0.5 * ulp + 1e-30).all()  # correctly rounded from float64


def test_anchored_mean_in_parts_adds_up():
    """The offset is a plain sum: two processes' offsets, summed, then the anchor added once."""
    torch.manual_seed(1)
    tensors = [torch.randn(40, 3, dtype=torch.float64) for _ in range(4)]
    originals = [t.clone() for t in tensors]
    anchor = tensors[0]
    parts = [torch.zeros_like(anchor), torch.zeros_like(anchor)]
    for part, members in zip(parts, ([1], [2, 3])):
        for i in members:
            add_difference_(part, tensors[i], anchor, 1.0)
    total = add_offset_(anchor.clone(), (parts[0] + parts[1]) / 4)
    assert torch.allclose(total, sum(tensors) / 4, rtol=1e-14, atol=0)
    assert all(torch.equal(t, o) for t, o in zip(tensors, originals))  # the inputs are left alone


def test_averaged_parameters_in_row_chunks_equal_one_piece(monkeypatch):
    torch.manual_seed(2)
    states = [{"embed": torch.randn(37, 11), "scalar": torch.tensor(2.0 + i), "ids": torch.arange(5)}
              for i in range(3)]
    candidates = [Candidate(f"c{i}", None, StateDictWeights(s), 1.0 + i) for i, s in enumerate(states)]
    whole = {name: executor.average_parameter(name, candidates, 6.0) for name in states[0]}
    monkeypatch.setattr(executor, "AVERAGE_CHUNK_ELEMENTS", 30)  # three rows at a time
    for name in states[0]:
        assert torch.equal(executor.average_parameter(name, candidates, 6.0), whole[name]), name
    assert torch.equal(whole["ids"], states[0]["ids"])
    assert whole["scalar"].item() == pytest.approx((2.0 + 2 * 3.0 + 3 * 4.0) / 6)


def test_batches_sharing_buffers_solve_as_fresh_ones():
    """One Buffers for a merge's consecutive batches (larger, then smaller and of another width): each batch
    gives the very result it gives with storage of its own, and the storage is reused, not grown."""
    buffers = Buffers()
    for seed, ratio in ((4, 0.95), (5, 0.0), (6, 1.0)):
        grams, weights, scales, coefficients = systems(seed=seed, count=3)
        results = []
        for shared in (None, buffers):
            sums = SystemSums(BATCH, DIM, WIDTH - seed, dtype=torch.float32, device="cpu",
                              reduce_non_diagonal_ratio=ratio, buffers=shared)
            sums.set_anchor(stacked(weights[0][..., :WIDTH - seed]))
            fill(sums, grams, [w[..., :WIDTH - seed] for w in weights], scales, coefficients, range(3))
            results.append(sums.solve().solution)
        assert torch.equal(*results)
    sizes = {key: flat.numel() for key, flat in buffers._flat.items()}
    assert sizes[("full", torch.float32, torch.device("cpu"))] == BATCH * DIM * DIM


@pytest.mark.parametrize("ratio", [0.95, 0.0])
def test_anchor_alone_comes_back_from_reused_storage(ratio):
    """R and T are filled by the first difference's terms, not zeroed first: a batch with no other
    candidate (K = 1) still solves to its anchor exactly, though its storage held an earlier batch's sums."""
    buffers = Buffers()
    grams, weights, scales, coefficients = systems(seed=7, uniform=True)
    earlier = SystemSums(BATCH, DIM, WIDTH, dtype=torch.float32, device="cpu", reduce_non_diagonal_ratio=ratio,
                         buffers=buffers)
    earlier.set_anchor(stacked(weights[0]))
    fill(earlier, grams, weights, scales, coefficients, range(4))
    earlier.solve()
    alone = SystemSums(BATCH, DIM, WIDTH, dtype=torch.float32, device="cpu", reduce_non_diagonal_ratio=ratio,
                       buffers=buffers)
    anchor = weights[1].float()
    alone.set_anchor(stacked(anchor))
    alone.add(packed(grams[1]), scales[1])
    result = alone.solve()
    assert result.solution.contiguous().numpy().tobytes() == anchor.numpy().tobytes()
    assert max(result.residual) == 0.0
