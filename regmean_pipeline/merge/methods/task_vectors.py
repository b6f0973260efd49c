"""Task-vector merges (TIES, DARE, DARE-TIES), streamed tensor by tensor and row chunk by row chunk.

Each candidate's task vector is its weights minus ``--pretrained``'s. A ``Recipe`` says what happens to
them: DARE's random drop (each entry kept with probability ``drop``, the rest rescaled), TIES' magnitude
trim (the largest ``trim`` fraction kept, per tensor as mergekit does or over the whole model as
FusionBench does), the sign election, and how the agreeing values are combined; the result is
pretrained + ``scaling`` * merged.

Nothing holds a whole model: the global trim's threshold is an exact selection over every task-vector
magnitude, found by two streaming counting passes over the float32 bit patterns (non-negative floats sort
as their bits do); a tensor larger than the memory budget is read in row chunks. Drop masks come from a
counter-based generator (numpy's Philox) keyed by (seed, candidate, parameter) and indexed by the element,
so they do not depend on chunking, device or process.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.merge.methods.base import MethodInputs, param

log = logging.getLogger(__name__)

RESCALES = ("inverse", "l1", "none")  # DARE: divide by the keep probability, match the L1 norm, or neither
MERGE_FUNCS = ("sum", "mean", "max")  # TIES: the agreeing values summed, averaged (disjoint mean), or the largest
TRIMS = ("global", "tensor")


@dataclass(frozen=True)
class Recipe:
    scaling: float
    drop: float | None = None  # DARE: the probability an entry is kept; None: no drop
    rescale: str = "inverse"
    trim: float | None = None  # TIES: the fraction of magnitudes kept; None: no trim
    trim_scope: str = "tensor"
    elect: bool = False  # TIES' sign election and disjoint merge; else the weighted sum
    merge_func: str = "sum"
    seed: int = 0
    densities: tuple[tuple[str, float], ...] = ()  # per-candidate overrides of drop (DARE) or trim (TIES)

    def density_of(self, candidate: str, default: float | None) -> float | None:
        return dict(self.densities).get(candidate, default) if default is not None else None


def check_density(value: float, where: str) -> None:
    if not 0.0 < value <= 1.0:
        raise RegMeanError(f"{where}: must lie in (0, 1], got {value}")


# --- drop masks: numpy's counter-based Philox, the same on every device and for every chunking ----------

def stream_key(seed: int, candidate: str, parameter: str) -> tuple[int, int]:
    """The Philox key of one candidate's drop mask of one parameter."""
    digest = hashlib.sha256(f"{seed}\0{candidate}\0{parameter}".encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def keep_mask(key: tuple[int, int], start: int, count: int, density: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Whether each of elements start .. start+count of the stream ``key`` is kept (probability ``density``):
    element i is kept when the i-th double of Philox(key) is below ``density``. Philox is counter-based (4
    doubles per counter step), so any stretch is drawn directly, wherever a chunk starts."""
    generator = np.random.Philox(key=np.array(key, dtype=np.uint64))
    generator.advance(start // 4)
    skip = start % 4
    uniform = np.random.Generator(generator).random(skip + count)[skip:]
    return torch.from_numpy(uniform < density).to(device)


# --- exact selection by two counting passes -------------------------------------------------------------

def _magnitude(delta: torch.Tensor) -> torch.Tensor:
    """What the trims compare: |delta| as float32, the precision FusionBench and mergekit select in."""
    return delta.to(torch.float32).abs()


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


class Selection:
    """The exact k-th largest of non-negative float32 values that arrive in chunks, for several streams at
    once, in two passes over the chunks and 2 x 65536 counters per stream: the first counts the values by
    their upper 16 bits (non-negative floats sort as their bits do), the second, within the bin the k-th
    falls in, by their lower 16."""

    def __init__(self, ranks: dict[int, int]):
        self.ranks = ranks  # stream -> the rank wanted, 1 = the largest
        self.high = {stream: torch.zeros(1 << 16, dtype=torch.int64) for stream in ranks}
        self.low = {stream: torch.zeros(1 << 16, dtype=torch.int64) for stream in ranks}
        self.top: dict[int, int] = {}

    def count_high(self, stream: int, chunk: torch.Tensor) -> None:
        self.high[stream] += torch.bincount(_bits(chunk).flatten() >> 16, minlength=1 << 16).cpu()

    def settle_high(self) -> None:
        for stream, rank in self.ranks.items():
            above = torch.flip(torch.cumsum(torch.flip(self.high[stream], [0]), 0), [0])  # counts at or above
            self.top[stream] = int(torch.nonzero(above >= rank).max())
            self.ranks[stream] = rank - (int(above[self.top[stream] + 1]) if self.top[stream] + 1 < len(above) else 0)

    def count_low(self, stream: int, chunk: torch.Tensor) -> None:
        bits = _bits(chunk).flatten()
        self.low[stream] += torch.bincount(bits[(bits >> 16) == self.top[stream]] & 0xFFFF, minlength=1 << 16).cpu()

    def value(self, stream: int) -> float:
        above = torch.flip(torch.cumsum(torch.flip(self.low[stream], [0]), 0), [0])
        bottom = int(torch.nonzero(above >= self.ranks[stream]).max())
        return float(torch.tensor([(self.top[stream] << 16) | bottom], dtype=torch.int32).view(torch.float32))


def kth_largest(chunks: Callable[[], Iterator[torch.Tensor]], rank: int) -> float:
    """The ``rank``-th largest (1 = the largest) of the non-negative float32 values ``chunks()`` yields,
    exactly: directly when they come in one chunk, else by a ``Selection`` over two passes."""
    stream = chunks()
    first, second = next(stream, None), next(stream, None)
    if second is None:
        flat = first.to(torch.float32).flatten()
        return float(torch.kthvalue(flat, flat.numel() - rank + 1).values)
    selection = Selection({0: rank})
    for chunk in chunks():
        selection.count_high(0, chunk)
    selection.settle_high()
    for chunk in chunks():
        selection.count_low(0, chunk)
    return selection.value(0)


# --- the combiner ---------------------------------------------------------------------------------------

class TaskVectorMerge:
    """The per-parameter combiner of a recipe over the plan's candidates (``MethodInputs``)."""

    def __init__(self, inputs: MethodInputs, recipe: Recipe):
        self.inputs, self.recipe = inputs, recipe
        self.candidates = inputs.candidates
        self.coefficients = [c.coefficient for c in self.candidates]
        # A chunk's float64 task vectors and the temporaries of trimming and combining them take about 120
        # bytes per element and candidate at their peak (measured): chunks are sized to --batch-memory by that.
        self.chunk_elements = max(1 << 12, inputs.batch_bytes // (120 * max(1, len(self.candidates))))
        self.thresholds: list[float | None] = [None] * len(self.candidates)
        for candidate in self.candidates:
            for density in (recipe.density_of(candidate.name, recipe.drop),
                            recipe.density_of(candidate.name, recipe.trim)):
                if density is not None:
                    check_density(density, f"candidate {candidate.name}: density")
        if recipe.trim is not None and recipe.trim_scope == "global":
            self._global_thresholds()

    def __call__(self, name: str) -> torch.Tensor:
        first = self.candidates[0].weights
        dtype, shape = first.dtype(name), tuple(first.shape(name))
        if not dtype.is_floating_point:
            return first.get(name)  # integer buffers (position ids), as averaging does
        # A tensor that fits the budget is read once and kept; a larger one is read again per pass, by rows.
        held = list(self._chunks(name)) if math.prod(shape) <= self.chunk_elements else None
        pieces = (lambda only=None: iter(held)) if held is not None else \
            (lambda only=None: self._chunks(name, only))
        scales = self._l1_scales(name, pieces)
        ties = self._tensor_thresholds(name, pieces, scales) if self.recipe.trim is not None and \
            self.recipe.trim_scope == "tensor" else None
        merged = torch.empty(shape, dtype=dtype)
        flat = merged.view(-1)
        taken = [0] * len(self.candidates)
        for start, stop, base, deltas in pieces():
            kept = [self._trimmed(index, self._dropped(index, name, start, delta, scales), ties, taken)
                    for index, delta in deltas.items()]
            total = self._combine(torch.stack(kept))
            flat[start:stop] = (base + self.recipe.scaling * total).to(dtype)
        return merged

    def _chunks(self, name: str, only: int | None = None
                ) -> Iterator[tuple[int, int, torch.Tensor, dict[int, torch.Tensor]]]:
        """The tensor's task vectors (all candidates', or candidate ``only``'s) in flat chunks of whole rows,
        with the pretrained chunk: (start, stop, pretrained, {candidate index: task vector})."""
        first = self.candidates[0].weights
        shape = tuple(first.shape(name))
        rows = shape[0] if shape else 1
        row_elements = math.prod(shape[1:]) if shape else 1
        step = max(1, self.chunk_elements // max(1, row_elements))
        indices = range(len(self.candidates)) if only is None else [only]
        for row in range(0, rows, step):
            stop = min(rows, row + step)
            whole = not shape or (row, stop) == (0, rows)

            def read(source) -> torch.Tensor:
                return (source.get(name) if whole else source.rows(name, row, stop)).reshape(-1)

            base = read(self.inputs.pretrained).to(torch.float64)
            deltas = {}
            for index in indices:  # exact in float64 for weights of float32 and narrower
                delta = read(self.candidates[index].weights).to(torch.float64) - base
                if not torch.isfinite(delta).all():
                    raise RegMeanError(f"candidate {self.candidates[index].name}: parameter {name} holds NaN or Inf "
                                       "(or --pretrained does)")
                deltas[index] = delta
            yield row * row_elements, stop * row_elements, base, deltas

    def _dropped(self, index: int, name: str, start: int, delta: torch.Tensor, scales) -> torch.Tensor:
        recipe = self.recipe
        density = recipe.density_of(self.candidates[index].name, recipe.drop)
        if density is None or density >= 1.0:
            return delta
        key = stream_key(recipe.seed, self.candidates[index].name, name)
        delta = delta * keep_mask(key, start, delta.numel(), density, delta.device)
        if recipe.rescale == "inverse":
            return delta / density
        if recipe.rescale == "l1":
            return delta * scales[index]
        return delta

    def _trimmed(self, index: int, delta: torch.Tensor, ties, taken: list[int]) -> torch.Tensor:
        if self.recipe.trim is None:
            return delta
        if self.recipe.trim_scope == "global":
            threshold = self.thresholds[index]
            return delta if threshold is None else delta * (_magnitude(delta) >= threshold)
        threshold, tied = ties[index]
        if threshold is None:
            return delta
        magnitude = _magnitude(delta)
        at = magnitude == threshold
        # exactly k kept, as mergekit's top-k: of the values equal to the k-th largest, the first ones
        keep = (magnitude > threshold) | (at & (torch.cumsum(at, 0) + taken[index] <= tied))
        taken[index] += int(at.sum())
        return delta * keep

    def _combine(self, deltas: torch.Tensor) -> torch.Tensor:
        """(K, n) processed task vectors -> the merged task vector, in float64."""
        weights = torch.tensor(self.coefficients, dtype=torch.float64).reshape(-1, 1)
        weighted = deltas * weights
        if not self.recipe.elect:
            return weighted.sum(0)
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(torch.float64)  # mergekit: a zero sum elects +
        agree = torch.sign(weighted) == elected
        selected = weighted * agree
        if self.recipe.merge_func == "sum":
            return selected.sum(0)
        if self.recipe.merge_func == "max":
            return selected.abs().max(0).values * elected
        divisor = (weights * agree).sum(0)
        return selected.sum(0) / torch.where(divisor == 0, 1.0, divisor)

    # TIES' trims: one threshold per candidate, over the model (FusionBench) or per tensor (mergekit)
    def _global_thresholds(self) -> None:
        """FusionBench's trim: per candidate, |delta| >= the k-th smallest magnitude over every merged
        parameter, k = d - int(d * density) (so int(d * density) + 1 kept, with ties). Every candidate's
        threshold comes from the same two passes over the model (a ``Selection`` per candidate)."""
        names = [n for n in self.inputs.names if self.candidates[0].weights.dtype(n).is_floating_point]
        total = sum(math.prod(self.candidates[0].weights.shape(n)) for n in names)
        ranks = {index: min(total, int(total * density) + 1) for index, candidate in enumerate(self.candidates)
                 if (density := self.recipe.density_of(candidate.name, self.recipe.trim)) < 1.0 and total}
        if not ranks:
            return
        selection = Selection(dict(ranks))
        for count in (selection.count_high, selection.count_low):
            for name in tqdm(names, desc="merge: trim threshold", unit="tensor", disable=not self.inputs.progress,
                             leave=False):
                scales = self._l1_scales(name, lambda only=None, name=name: self._chunks(name, only))
                for start, _, _, deltas in self._chunks(name):
                    for index in ranks:
                        count(index, _magnitude(self._dropped(index, name, start, deltas[index], scales)))
            if count == selection.count_high:
                selection.settle_high()
        for index in ranks:
            self.thresholds[index] = selection.value(index)
        self.inputs.report["trim_thresholds"] = {c.name: t for c, t in zip(self.candidates, self.thresholds)}

    def _tensor_thresholds(self, name: str, pieces, scales) -> list[tuple[float | None, int]]:
        """mergekit's trim: per candidate, exactly k = max(1, int(density * numel)) largest magnitudes kept;
        returns the k-th largest and how many of the values equal to it are kept."""
        numel = math.prod(self.candidates[0].weights.shape(name))
        found = []
        for index, candidate in enumerate(self.candidates):
            density = self.recipe.density_of(candidate.name, self.recipe.trim)
            if density >= 1.0:
                found.append((None, 0))
                continue
            rank = max(1, int(density * numel))

            def magnitudes(index=index):
                for start, _, _, deltas in pieces(index):
                    yield _magnitude(self._dropped(index, name, start, deltas[index], scales))

            threshold = kth_largest(magnitudes, rank)
            above = sum(int((chunk > threshold).sum()) for chunk in magnitudes())
            found.append((threshold, rank - above))
        return found

    def _l1_scales(self, name: str, pieces) -> list[float] | None:
        """mergekit's rescale: each dropped task vector scaled back to its tensor's L1 norm (not when a norm
        is below 1e-7); None unless the recipe drops with that rescale."""
        if self.recipe.drop is None or self.recipe.rescale != "l1":
            return None
        before = [0.0] * len(self.candidates)
        after = [0.0] * len(self.candidates)
        for start, _, _, deltas in pieces():
            for index, delta in deltas.items():
                density = self.recipe.density_of(self.candidates[index].name, self.recipe.drop)
                key = stream_key(self.recipe.seed, self.candidates[index].name, name)
                kept = delta * keep_mask(key, start, delta.numel(), density, delta.device) if density < 1.0 else delta
                before[index] += float(delta.abs().sum(dtype=torch.float64))
                after[index] += float(kept.abs().sum(dtype=torch.float64))
        return [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in zip(before, after)]


def trim_param():
    return param("global", "Where magnitudes compete for the trim: global (over the whole model, FusionBench) or "
                 "tensor (within each tensor, mergekit).", choices=TRIMS)


def merge_func_param():
    return param("sum", "How the values that agree with the elected sign combine: sum (FusionBench's default), "
                 "mean (the paper's disjoint mean, mergekit's), max.", choices=MERGE_FUNCS)


def scaling_param(default: float):
    return param(default, "lambda: the factor on the merged task vector added to --pretrained.")


def candidate_densities_param():
    return param({}, "NAME=VALUE: candidate NAME's own density (repeatable), instead of --density.",
                 flag="--candidate-density", low=0.0, low_open=True, high=1.0)
