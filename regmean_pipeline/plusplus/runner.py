"""RegMean++ (Nguyen et al., arXiv 2508.03121): merge a model block by block, each block's Grams measured
on the hidden states that the merged embeddings and merged blocks before it produce.

1. The prefix (every parameter that runs before the first block) is averaged.
2. For each block l: candidate i's own block l runs on the hidden states of candidate i's examples as the
   merged prefix and merged blocks < l produce them, with hooks accumulating its linear layers' Grams
   (pads masked as ``regmean stats`` masks them); block l is merged as ``regmean merge`` merges a layer;
   then every candidate's hidden states advance through the merged block l.
3. The tail (final norm, pooler, heads) is one more unit, measured on the merged trunk's output.

Only one block's weights are in memory at a time, read lazily from each candidate's checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.weights import WeightSource
from regmean_pipeline.measure.gram import ROW_MASK_KEY, GramAccumulator, GramStats, batch_size_of, model_inputs
from regmean_pipeline.measure.linear import LinearLayer, find_linear_layers
from regmean_pipeline.measure.models import check_finite_parameters, tied_parameter_names
from regmean_pipeline.merge.plan import MergeSettings, SolveSettings, exclusion
from regmean_pipeline.plusplus.activations import ActivationStore
from regmean_pipeline.plusplus.block_calls import StackDriver, probe_output
from regmean_pipeline.plusplus.collective import Collective
from regmean_pipeline.plusplus.merge_unit import UnitCandidate, merge_unit
from regmean_pipeline.plusplus.skeleton import empty_model, load_tensors, relative, release
from regmean_pipeline.plusplus.stack import Unit, Units, find_block_stack, split_units

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Sink = Callable[[str, torch.Tensor], None]


@dataclass
class BlockwiseCandidate:
    name: str
    config: Any  # the candidate's transformers config (its own head's size included)
    weights: WeightSource
    coefficient: float = 1.0
    batches: list[Batch] | None = None  # its examples as model inputs; None on processes that do not hold it


@dataclass
class BlockwiseSettings:
    merge: MergeSettings = field(default_factory=lambda: MergeSettings(solve=SolveSettings()))
    forward_dtype: torch.dtype = torch.float32
    accumulate_dtype: torch.dtype = torch.float32
    include_padding: bool = False
    activation_memory: int = 4 << 30  # bytes of hidden states kept in memory; the rest is spilled
    spill_dir: Path | None = None
    trust_remote_code: bool = False


@dataclass
class UnitDone:
    """What the caller may keep of a merged unit (a checkpoint): its label, tensors and report entries."""

    label: str
    tensors: dict[str, torch.Tensor]
    layers: dict[str, dict]


def _prefixed(stats: GramStats, prefix: str) -> GramStats:
    """A block's Grams under the model's names (``attention.self.query`` -> ``bert.encoder.layer.3.…``)."""
    return GramStats(
        layers={prefix + name: dataclasses.replace(layer, name=prefix + name, weight=prefix + layer.weight)
                for name, layer in stats.layers.items()},
        layer_grams={prefix + name: prefix + key for name, key in stats.layer_grams.items()},
        sums={prefix + key: total for key, total in stats.sums.items()},
        tokens={prefix + key: count for key, count in stats.tokens.items()},
        examples=stats.examples,
    )


NO_GRAMS = GramStats({}, {}, {}, {})


class BlockwiseMerge:
    """One RegMean++ run; ``run`` merges every unit in order and hands each merged tensor to ``sink``."""

    def __init__(self, candidates: list[BlockwiseCandidate], settings: BlockwiseSettings, *,
                 device: torch.device, base: WeightSource | None = None, collective: Collective | None = None,
                 progress: bool = True) -> None:
        self.candidates, self.settings, self.device = candidates, settings, torch.device(device)
        self.collective = collective or Collective()
        self.local = [i for i, c in enumerate(candidates) if c.batches is not None]
        if not self.local:
            raise RegMeanError("this process holds no candidate's examples")
        self.units_in = [UnitCandidate(c.name, c.weights, c.coefficient) for c in candidates]
        self.excluded = exclusion(settings.merge.exclude)
        self.copy_source = base or candidates[0].weights
        self.progress = progress
        self.model = empty_model(candidates[0].config, dtype=settings.forward_dtype,
                                 trust_remote_code=settings.trust_remote_code)
        self.stack = find_block_stack(self.model)
        self.driver = StackDriver(self.model, self.stack)
        self.store = ActivationStore(self.device, settings.activation_memory, settings.spill_dir)
        self.layers: dict[str, dict] = {}
        self.timings: list[dict] = []
        self.batches = 0  # solve batches
        self.prefix_modules: set[str] = set()  # modules that run before the first block (plan_units)
        self.merged_prefix: Mapping[str, torch.Tensor] = {}

    # -- helpers -------------------------------------------------------------------------------------
    def _batches(self, index: int):
        """(number, model inputs, rows that count or None) of each batch of a candidate, on the device."""
        for number, batch in enumerate(self.candidates[index].batches):
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            yield number, model_inputs(batch), batch.get(ROW_MASK_KEY)

    def _counting(self, accumulator: GramAccumulator, batch: Batch, counted_rows: torch.Tensor | None):
        """One batch's rows for the Grams: the response tokens under --tokens response, else the real ones."""
        return accumulator.batch(batch.get("attention_mask"), batch_size_of(batch), counted_rows=counted_rows)

    def _load(self, module: nn.Module, source: WeightSource, names: list[str], prefix: str = "") -> None:
        tensors = {name: source.get(name) for name in names}
        try:
            load_tensors(module, relative(tensors, prefix) if prefix else tensors, device=self.device,
                         dtype=self.settings.forward_dtype)
        except KeyError as exc:
            raise RegMeanError(f"{source.reference}: parameter {prefix}{exc.args[0]} is not one of "
                               f"{type(module).__name__}'s") from None

    def _accumulator(self, module: nn.Module, layers: list[LinearLayer]) -> GramAccumulator:
        return GramAccumulator(module, include_padding=self.settings.include_padding,
                               accumulate_dtype=self.settings.accumulate_dtype, layers=layers)

    def _merge(self, label: str, names: list[str], grams: dict[int, GramStats]) -> dict[str, torch.Tensor]:
        merged, entries, batches = merge_unit(names, self.units_in, grams, self.settings.merge, excluded=self.excluded,
                                              copy_source=self.copy_source, device=self.device,
                                              collective=self.collective, label=label)
        self.layers.update(entries)
        self.batches += batches
        return merged

    # -- the steps -----------------------------------------------------------------------------------
    def plan_units(self) -> Units:
        """Which stored parameters are prefix, blocks and tail: the model around the stack runs once, with
        the first held candidate's weights, to see what runs before the first block."""
        first = self.candidates[self.local[0]]
        names = first.weights.names()
        self._load(self.model, first.weights, [n for n in names if self.stack.block_of(n) is None])
        _, batch, _ = next(self._batches(self.local[0]))
        prefix_modules = self.driver.modules_before_stack(batch)
        self.collective.check_same("\n".join(sorted(prefix_modules)), "the modules before the first block")
        block = self.driver.blocks[0]
        self._load(block, first.weights, [n for n in names if self.stack.block_of(n) == 0],
                   self.stack.block_prefix(0))
        self.driver.output = probe_output(block, self.driver.record(batch, 0))
        release(block)
        release(self.model)
        self.prefix_modules = prefix_modules
        return split_units(self.candidates[0].weights.names(), self.stack, prefix_modules)

    def measure_block(self, index: int, names: list[str]) -> dict[int, GramStats]:
        """Each held candidate's own block ``index`` on its hidden states: that block's Grams."""
        block, prefix = self.driver.blocks[index], self.stack.block_prefix(index)
        grams = {}
        for i in self.local:
            candidate = self.candidates[i]
            self._load(block, candidate.weights, names, prefix)
            check_finite_parameters(block, f"candidate {candidate.name}: block {index}")
            with self._accumulator(block, find_linear_layers(block)) as accumulator:
                for number, batch, counted_rows in self._batches(i):
                    call = self.driver.record(batch, index)
                    with self._counting(accumulator, batch, counted_rows):
                        self.driver.run(block, call, self.store.get((i, number)))
                grams[i] = _prefixed(accumulator.result(), prefix)
        return grams

    def advance(self, index: int, merged: Mapping[str, torch.Tensor]) -> None:
        """Every held candidate's hidden states through the merged block ``index``."""
        block, prefix = self.driver.blocks[index], self.stack.block_prefix(index)
        load_tensors(block, relative(merged, prefix), device=self.device, dtype=self.settings.forward_dtype)
        for i in self.local:
            for number, batch, _ in self._batches(i):
                call = self.driver.record(batch, index)
                self.store.put((i, number), self.driver.run(block, call, self.store.get((i, number))))
        release(block)

    def measure_tail(self, units: Units) -> dict[int, GramStats]:
        """Each held candidate's own tail (its head included) on the merged trunk's output."""
        grams = {}
        tail = set(units.tail)
        for i in self.local:
            candidate = self.candidates[i]
            model = empty_model(candidate.config, dtype=self.settings.forward_dtype,
                                trust_remote_code=self.settings.trust_remote_code)
            driver = StackDriver(model, self.stack, self.driver.output)
            load_tensors(model, self.merged_prefix, device=self.device, dtype=self.settings.forward_dtype)
            self._load(model, candidate.weights, [n for n in candidate.weights.names() if n in tail])
            tied = tied_parameter_names(model)
            layers = [layer for layer in find_linear_layers(model) if self.stack.block_of(layer.name) is None
                      and layer.name not in self.prefix_modules and layer.weight not in tied]
            with self._accumulator(model, layers) as accumulator:
                for number, batch, counted_rows in self._batches(i):
                    with self._counting(accumulator, batch, counted_rows):
                        driver.run_tail(batch, self.store.get((i, number)))
                grams[i] = accumulator.result().without_weights(tied)
            release(model)
        return grams

    def _enter_stack(self, merged_prefix: Mapping[str, torch.Tensor]) -> None:
        """The merged prefix in place, and every candidate's hidden states as it hands them to block 0."""
        self.merged_prefix = merged_prefix
        load_tensors(self.model, merged_prefix, device=self.device, dtype=self.settings.forward_dtype)
        for i in self.local:
            for number, batch, _ in self._batches(i):
                self.store.put((i, number), self.driver.record(batch, 0).hidden)

    def _unit(self, unit: Unit, units: Units, earlier: dict[str, torch.Tensor] | None
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One unit merged (or taken from an earlier run), and the seconds each of its steps took."""
        seconds: dict[str, float] = {}

        def timed(step: str, work: Callable[[], Any]) -> Any:
            started = time.perf_counter()
            result = work()
            seconds[step] = time.perf_counter() - started
            return result

        names = list(unit.names)
        merged = earlier
        if merged is None:
            if unit.kind == "prefix":
                grams = dict.fromkeys(self.local, NO_GRAMS)  # averaged: nothing to measure
            elif unit.kind == "block":
                grams = timed("grams_s", lambda: self.measure_block(unit.index, names))
            else:
                grams = timed("grams_s", lambda: self.measure_tail(units))
            merged = timed("solve_s", lambda: self._merge(unit.label, names, grams))
            del grams
        if unit.kind == "prefix":
            timed("advance_s", lambda: self._enter_stack(merged))
        elif unit.kind == "block":
            timed("advance_s", lambda: self.advance(unit.index, merged))
        return merged, seconds

    def run(self, sink: Sink, *, resumed: Callable[[str], dict[str, torch.Tensor] | None] = lambda label: None,
            unit_done: Callable[[UnitDone], None] = lambda done: None) -> dict:
        """Merge every unit in order. ``resumed(label)`` returns a unit merged by an earlier run (then only
        the hidden states are recomputed through it); ``unit_done`` sees each unit once merged."""
        started = time.perf_counter()
        with torch.inference_mode():
            units = self.plan_units()
            try:
                for unit in tqdm(units.ordered(), desc="regmean++", unit="unit", disable=not self.progress):
                    unit_started = time.perf_counter()
                    earlier = resumed(unit.label)
                    merged, seconds = self._unit(unit, units, earlier)
                    for name, tensor in merged.items():
                        sink(name, tensor)
                    self.timings.append({"unit": unit.label, "parameters": len(unit.names),
                                         "resumed": earlier is not None, **seconds,
                                         "seconds": time.perf_counter() - unit_started})
                    weights = set(unit.names)
                    unit_done(UnitDone(unit.label, merged,
                                       {n: e for n, e in self.layers.items() if e["weight"] in weights}))
            finally:
                self.store.close()
        return {"layers": self.layers, "units": self.timings, "batches": self.batches,
                "stack": {"path": self.stack.path, "blocks": self.stack.length, "block_class": self.stack.block_class},
                "prefix": units.prefix, "tail": units.tail, "activations": self.store.usage.as_dict(),
                "timings": {"total": time.perf_counter() - started}}
