"""Gram accumulation in several passes over the data when all accumulators do not fit in memory.

Layers fed one tensor share one Gram, and that sharing is only visible during a forward pass, so
a first, cheap pass over one batch records it without accumulating anything. The Grams are then
packed, in module order, into groups that fit the budget; each group gets its own pass over the
data with hooks on its layers only. Layers sharing an input always land in one group, so each
pass finds the same sharing, and the same sums, as a single pass would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.gram import GramAccumulator, GramStats, batch_size_of, collect_grams, model_inputs
from regmean_pipeline.measure.linear import LinearLayer, find_linear_layers

log = logging.getLogger(__name__)


class SharingDetector(GramAccumulator):
    """Runs the hooks' sharing detection and nothing else: no accumulators, no checks on values.

    Works on meta tensors too, which is how ``regmean plan`` finds the Grams of a model it never loads.
    """

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        self._tokens.setdefault(key, 0)

    def _check_finite(self) -> None:
        pass


def detect_gram_keys(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Layer name -> Gram key, from one forward pass over ``batch``."""
    model.eval()
    with SharingDetector(model) as detector, torch.inference_mode():
        with detector.batch(None, batch_size_of(batch)):
            model(**batch)
        return detector.result().layer_grams


def gram_bytes(dim: int, dtype: torch.dtype) -> int:
    """Memory of one (dim, dim) accumulator."""
    return dim * dim * dtype.itemsize


def gram_groups(layers: Iterable[LinearLayer], keys: Mapping[str, str]) -> dict[str, list[LinearLayer]]:
    """Gram key -> the layers reading it, in module order; a layer the detection pass never reached
    stands alone (it may still run on other batches)."""
    groups: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        groups.setdefault(keys.get(layer.name, layer.name), []).append(layer)
    return groups


def plan_passes(groups: Mapping[str, list[LinearLayer]], budget: int, dtype: torch.dtype) -> list[list[LinearLayer]]:
    """Pack whole Gram groups, in module order, into passes whose accumulators fit ``budget`` bytes."""
    passes: list[list[LinearLayer]] = []
    used = budget + 1
    for key, members in groups.items():
        size = gram_bytes(members[0].in_features, dtype)
        if size > budget:
            raise RegMeanError(f"--max-gram-memory {format_bytes(budget)}: the Gram of layer {key} alone needs "
                               f"{format_bytes(size)}; raise the budget")
        if used + size > budget:
            passes.append([])
            used = 0
        passes[-1].extend(members)
        used += size
    return passes


def collect_grams_in_passes(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str,
    budget: int,
    include_padding: bool = False,
    accumulate_dtype: torch.dtype = torch.float32,
    progress=None,
    fisher=None,
) -> GramStats:
    """``collect_grams`` with at most ``budget`` bytes of accumulators alive at a time.

    ``batches`` must be re-iterable (a DataLoader) and yield the same batches every time. The Fisher, when
    asked for (one float per parameter, outside the Gram budget), is measured in the first pass.
    """
    layers = find_linear_layers(model)
    upper_bound = sum(gram_bytes(layer.in_features, accumulate_dtype) for layer in layers)
    if upper_bound <= budget:
        return collect_grams(model, batches, device=device, include_padding=include_padding,
                             accumulate_dtype=accumulate_dtype, progress=progress, fisher=fisher)
    first = next(iter(batches), None)
    if first is None:
        raise RegMeanError("no batches to accumulate")
    keys = detect_gram_keys(model, {k: v.to(device) for k, v in model_inputs(first).items()})
    groups = gram_groups(layers, keys)
    passes = plan_passes(groups, budget, accumulate_dtype)
    needed = sum(gram_bytes(members[0].in_features, accumulate_dtype) for members in groups.values())
    log.info("Gram accumulators need %s, over --max-gram-memory %s: %d passes over the data",
             format_bytes(needed), format_bytes(budget), len(passes))
    if progress is not None and progress.total is not None:
        progress.reset(total=progress.total * len(passes))
    results = []
    for number, group in enumerate(passes, 1):
        log.info("pass %d of %d: %d layers", number, len(passes), len(group))
        results.append(collect_grams(model, batches, device=device, include_padding=include_padding,
                                     accumulate_dtype=accumulate_dtype, progress=progress, layers=group,
                                     fisher=fisher if number == 1 else None))
    return join_passes(results, [layer.name for layer in layers])


def join_passes(results: list[GramStats], order: list[str]) -> GramStats:
    """One GramStats from passes over disjoint layer groups, layers back in module order."""
    examples = {result.examples for result in results}
    if len(examples) != 1:
        raise RuntimeError(f"the passes saw different numbers of examples: {sorted(examples)}")
    layers, layer_grams, sums, tokens = {}, {}, {}, {}
    for result in results:
        layers.update(result.layers)
        layer_grams.update(result.layer_grams)
        sums.update(result.sums)
        tokens.update(result.tokens)
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(layers, key=rank.__getitem__)
    return GramStats(layers={n: layers[n] for n in names}, layer_grams={n: layer_grams[n] for n in names},
                     sums=sums, tokens=tokens, examples=examples.pop())


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
