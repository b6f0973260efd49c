"""Run a merge plan: stream Grams and weights one batch at a time, solve on the device, emit tensors.

Reading (disk, checksums, stacking into one batch tensor) runs in a background thread ahead of the
device work: at most LOADS_AHEAD + 1 candidates' shares of a batch are loaded at once (the one being
added and those queued), so memory is bounded by the plan's batch budget, not by the number of layers
or candidates.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from regmean_pipeline.cache.symmetric import diagonal_positions, packed_length
from regmean_pipeline.io.weights import WeightSource
from regmean_pipeline.measure.linear import weight_from_in_out, weight_in_out
from regmean_pipeline.merge.averaging import anchored_mean
from regmean_pipeline.merge.plan import (
    LOADS_AHEAD,
    Candidate,
    MergePlan,
    MergeSettings,
    SolveBatch,
    SolveSettings,
    StatsSource,
)
from regmean_pipeline.merge.solve import SolveResult
from regmean_pipeline.merge.systems import Buffers, SystemSums

log = logging.getLogger(__name__)

Sink = Callable[[str, torch.Tensor], None]
T = TypeVar("T")
R = TypeVar("R")


def prefetch(items: Iterable[T], load: Callable[[T], R], ahead: int = 1) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) with loads running in one background thread, at most ``ahead`` items
    beyond the one the caller holds: a load starts only once the caller has moved past an item."""
    slots: queue.Queue = queue.Queue()
    free = threading.Semaphore(ahead + 1)
    stop = threading.Event()

    def producer() -> None:
        try:
            for item in items:
                free.acquire()
                if stop.is_set():
                    return
                slots.put((item, load(item), None))
        except BaseException as exc:  # re-raised in the consumer
            slots.put((None, None, exc))
            return
        slots.put(None)

    thread = threading.Thread(target=producer, name="regmean-prefetch", daemon=True)
    thread.start()
    try:
        while (entry := slots.get()) is not None:
            item, loaded, error = entry
            if error is not None:
                raise error
            del entry
            yield item, loaded
            del item, loaded
            free.release()
    finally:
        stop.set()
        free.release()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class LoadBuffers:
    """Storage the loader reads batches into, given back by the solve once it has consumed them.

    A fresh batch tensor costs a page fault per 4 KiB on first touch; on the bench's 2-core VM that
    took longer than the read that fills it (the Llama-shaped merge's weights: 0.72 s read into new
    tensors, 0.28 s into reused ones). Flat byte buffers serve any shape and dtype that fits; one too
    small for a request is dropped for a larger one, so no more buffers exist than loads are held at once
    (``prefetch`` bounds those). Thread-safe: the loader takes, the solve gives back.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """An uninitialised tensor and the flat buffer to give back once it is no longer read."""
        size = math.prod(shape) * dtype.itemsize
        flat = None
        with self._lock:  # (by position: tensors compare element-wise, so list.remove cannot find them)
            order = sorted(range(len(self._free)), key=lambda i: self._free[i].numel())
            fitting = [i for i in order if self._free[i].numel() >= size]
            if fitting:
                flat = self._free.pop(fitting[0])
            elif self._free:
                del self._free[order[-1]]  # released: replaced by a larger one
        if flat is None:
            flat = torch.empty(size, dtype=torch.uint8)
        return flat[:size].view(dtype).view(shape), flat

    def give_back(self, flat: torch.Tensor) -> None:
        with self._lock:
            self._free.append(flat)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool, buffers: LoadBuffers | None,
           leases: list[torch.Tensor]) -> torch.Tensor:
    if buffers is None:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    tensor, flat = buffers.take(shape, dtype)
    leases.append(flat)
    return tensor


def stack_packed_grams(batch: SolveBatch, stats: StatsSource, pin: bool = False, buffers: LoadBuffers | None = None,
                       leases: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One candidate's packed Gram sums of a batch, stacked: (B, d(d+1)/2), each read straight into its row
    (of storage taken from ``buffers``, when given, whose flat buffer is appended to ``leases``)."""
    dtype = getattr(torch, stats.manifest.accumulate_dtype)
    stacked = _empty((len(batch.groups), packed_length(batch.dim)), dtype, pin, buffers, leases)
    for i, group in enumerate(batch.groups):
        stats.read("gram", group.key, out=stacked[i].numpy())
    return stacked


def stack_weights(batch: SolveBatch, weights: WeightSource, pin: bool = False, buffers: LoadBuffers | None = None,
                  leases: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One candidate's weights of a batch, stacked: (B, d, width), each as W^T (in, out) and the weights
    of layers sharing a Gram side by side (the right-hand sides of the systems).

    The result is the transposed view of (B, width, d) storage, in which each (out, in) weight is one
    contiguous block: read straight into it from the file, without a transposing copy (several times
    slower on a CPU), and the solved weights come back in the same layout, so nothing is transposed on
    the way out either (``SystemSums`` works in it). Weights stored transposed (GPT-2's Conv1D) or in
    other dtypes than the first are copied in."""
    first = batch.groups[0].layers[0][1]
    dtype = weights.dtype(first.weight)
    stacked = _empty((len(batch.groups), batch.width, batch.dim), dtype, pin, buffers, leases)
    for i, group in enumerate(batch.groups):
        offset = 0
        for _, layer in group.layers:
            block = stacked[i, offset:offset + layer.out_features]  # (out, in): contiguous
            if not layer.transposed and weights.dtype(layer.weight) == dtype:
                weights.get(layer.weight, out=block)
            else:
                block.copy_(weight_in_out(weights.get(layer.weight), layer.transposed).mT)
            offset += layer.out_features
    return stacked.mT


def _load(batch: SolveBatch, candidate: Candidate, pin: bool, buffers: LoadBuffers | None,
          anchor: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The batch's packed Grams and weights of one candidate, and the buffers to give back after the solve
    has added them. The anchor's weights are not taken from ``buffers``: they become the solution, which
    the writer holds until it is written."""
    leases: list[torch.Tensor] = []
    packed = stack_packed_grams(batch, candidate.stats, pin, buffers, leases)
    weights = stack_weights(batch, candidate.weights, pin, None if anchor else buffers, leases)
    return packed, weights, leases


def emit_solved(batch: SolveBatch, solution: torch.Tensor, dtype_of: Callable[[str], torch.dtype],
                sink: Sink) -> None:
    """Each layer's merged weight, cut from the batch's (B, d, width) solution, in its stored orientation
    and dtype (``dtype_of(weight name)``)."""
    for i, group in enumerate(batch.groups):
        offset = 0
        for _, layer in group.layers:
            columns = solution[i, :, offset:offset + layer.out_features]
            offset += layer.out_features
            sink(layer.weight, weight_from_in_out(columns, layer.transposed).to("cpu", dtype_of(layer.weight)))


def solve_report(batch: SolveBatch, result: SolveResult) -> dict[str, dict]:
    """The report's entry of every layer of the batch: its Gram, solver, condition and residual."""
    entries = {}
    for i, group in enumerate(batch.groups):
        for name, layer in group.layers:
            entries[name] = {"weight": layer.weight, "gram": group.key, "solver": result.solver[i],
                             "condition_estimate": result.condition[i], "residual": result.residual[i]}
            if result.rank[i] is not None:
                entries[name]["rank"] = result.rank[i]
    return entries


def execute_merge(plan: MergePlan, candidates: list[Candidate], settings: MergeSettings, sink: Sink, *,
                  device: torch.device, base: WeightSource | None = None, progress: bool = True,
                  combine: Callable[[str], torch.Tensor] | None = None) -> dict:
    """Solve every batch, average the rest, copy excluded tensors; returns the report's layers and timings.

    ``combine(name)``, when given, replaces averaging for the parameters not solved (the method's combiner).
    """
    started = time.perf_counter()
    solve = settings.solve
    first = candidates[0]
    coefficient_sum = sum(c.coefficient for c in candidates)
    report_layers: dict[str, dict] = {}
    timings = {"wait_for_reads": 0.0, "solve": 0.0}
    systems = tqdm(total=plan.num_systems, desc="merge: solve", unit="system", disable=not progress, leave=False)
    work = [(batch, candidate) for batch in plan.batches for candidate in candidates]
    pin = torch.device(device).type == "cuda"
    # Reused load storage on CPU only: on a GPU the pinned batches are copied asynchronously.
    load_buffers = None if pin else LoadBuffers()
    wait_started = time.perf_counter()
    sums = None
    buffers = Buffers()  # the batches are solved one after another: each reuses the storage of the last
    loads = prefetch(work, lambda item: _load(*item, pin, load_buffers, item[1] is first), ahead=LOADS_AHEAD)
    for (batch, candidate), (packed, weights, leases) in loads:
        timings["wait_for_reads"] += time.perf_counter() - wait_started
        solve_started = time.perf_counter()
        scales = gram_scales(batch, packed, candidate, candidates, solve)
        if candidate is first:
            sums = SystemSums(len(batch.groups), batch.dim, batch.width, dtype=solve.solve_dtype, device=device,
                              reduce_non_diagonal_ratio=solve.reduce_non_diagonal_ratio, buffers=buffers)
            sums.set_anchor(weights)
            sums.add(packed, scales)
        else:
            sums.add(packed, scales, weights, candidate.coefficient / coefficient_sum)
        del packed, weights
        for flat in leases:  # added: SystemSums keeps no view of a candidate's loaded tensors
            load_buffers.give_back(flat)
        if candidate is candidates[-1]:
            result = sums.solve()
            emit_solved(batch, result.solution, first.weights.dtype, sink)
            report_layers.update(solve_report(batch, result))
            systems.update(len(batch.groups))
            sums = result = None
        timings["solve"] += time.perf_counter() - solve_started
        wait_started = time.perf_counter()
    systems.close()

    average_started = time.perf_counter()
    for name in tqdm(plan.averaged, desc="merge: average", unit="tensor", disable=not progress, leave=False):
        sink(name, combine(name) if combine else average_parameter(name, candidates, coefficient_sum))
    copy_source = base or first.weights
    for name in plan.copied:
        sink(name, copy_source.get(name))
    timings["average_and_copy"] = time.perf_counter() - average_started
    timings["total"] = time.perf_counter() - started
    return {"layers": report_layers, "timings": timings}


def gram_scales(batch: SolveBatch, packed: torch.Tensor, candidate: Candidate, candidates: list[Candidate],
                solve: SolveSettings) -> torch.Tensor:
    """The candidate's factor on each of the batch's Gram sums (its packed (B, d(d+1)/2) values give the
    traces that trace weighting divides by)."""
    traces = packed[:, diagonal_positions(batch.dim, "cpu")].sum(-1, dtype=torch.float64).tolist() \
        if solve.gram_weighting == "trace" else [None] * len(batch.groups)
    manifest = candidate.stats.manifest
    return torch.tensor([solve.gram_scale(candidate.coefficient, manifest.grams[group.key].tokens,
                                          sum(c.stats.manifest.grams[group.key].tokens for c in candidates), trace)
                         for group, trace in zip(batch.groups, traces)], dtype=torch.float64)


# Rows of an averaged tensor are read and averaged in chunks of about this many elements: a large
# embedding needs no float64 copy of itself (and no second candidate's copy) in memory at once, and a
# chunk's float64 temporaries (2 MiB each) stay in cache, where the averaging passes run about 2.5x as
# fast as on 4 Mi-element chunks (MiniLM's 67 averaged tensors, K = 5: 0.10 s instead of 0.25-0.37 s).
AVERAGE_CHUNK_ELEMENTS = 1 << 18


def average_parameter(name: str, candidates: list[Candidate], coefficient_sum: float) -> torch.Tensor:
    """The coefficient-weighted mean anchored at the first candidate (``averaging.anchored_mean``), in
    row chunks of every candidate; integer buffers (position ids) are taken from the first candidate."""
    source = candidates[0].weights
    shape = tuple(source.shape(name))

    def mean_of(read: Callable[[WeightSource], torch.Tensor]) -> torch.Tensor:
        others = ((read(c.weights), c.coefficient) for c in candidates[1:])
        return anchored_mean(read(source), others, coefficient_sum)

    row_elements = math.prod(shape[1:])
    dtype = source.dtype(name)
    if not (dtype.is_floating_point or dtype.is_complex) or not shape or \
            shape[0] * row_elements <= AVERAGE_CHUNK_ELEMENTS:
        return mean_of(lambda weights: weights.get(name))
    mean = torch.empty(shape, dtype=dtype)
    step = max(1, AVERAGE_CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        mean[start:stop] = mean_of(lambda weights: weights.rows(name, start, stop))
    return mean
