"""In-process RegMean, in the style FusionBench users know: ``RegMean(...).run(models, data)``.

It runs the same gram accumulation, planner and executor as the ``stats`` and ``merge`` stages;
only the caches stay in memory.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regmean_pipeline.cache.manifest import manifest_from_stats
from regmean_pipeline.cache.store import InMemoryStats
from regmean_pipeline.config import load_config, parse_config
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.model_folder import parse_size
from regmean_pipeline.io.weights import StateDictWeights, fingerprint
from regmean_pipeline.measure.data import DatasetSpec, make_loader
from regmean_pipeline.measure.gram import collect_grams
from regmean_pipeline.measure.models import (
    architecture_of,
    forward_inputs,
    parse_dtype,
    resolve_device,
    tied_parameter_names,
)
from regmean_pipeline.merge.executor import execute_merge
from regmean_pipeline.merge.methods.registry import config_keys
from regmean_pipeline.merge.methods.regmean_plusplus import METHOD as BLOCKWISE_METHOD
from regmean_pipeline.merge.plan import Candidate, MergeSettings, SolveSettings, plan_merge
from regmean_pipeline.plusplus.runner import BlockwiseCandidate, BlockwiseMerge, BlockwiseSettings

log = logging.getLogger(__name__)

BLOCKWISE = BLOCKWISE_METHOD.name


class RegMean:
    """Merge fine-tuned models of one architecture with RegMean, all in memory.

    Keys and defaults follow FusionBench's RegMean algorithms (``num_regmean_examples=256``,
    ``reduce_non_diagonal_ratio``, ``exclude_param_names_regex``, ``batch_size``, ``num_workers``);
    ``weight_transpose`` is accepted and ignored, since orientation is read from the module type.
    """

    def __init__(
        self,
        *,
        num_regmean_examples: int = 256,
        reduce_non_diagonal_ratio: float = 0.95,
        exclude_param_names_regex: Sequence[str] = (),
        weight_transpose: bool | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        include_padding: bool = False,
        gram_weighting: str = "equal",
        accumulate_dtype: str = "float32",
        solve_dtype: str = "float32",
        max_length: int | None = None,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
        method: str = "regmean",
        activation_memory: str | int = "4GiB",
    ) -> None:
        if method not in ("regmean", BLOCKWISE):
            raise RegMeanError(f"method: {method!r} is not one of regmean, {BLOCKWISE}")
        self.method = method
        self.num_examples = num_regmean_examples
        self.solve = SolveSettings(reduce_non_diagonal_ratio, gram_weighting, parse_dtype(solve_dtype, "solve_dtype"))
        self.settings = MergeSettings(list(exclude_param_names_regex), solve=self.solve,
                                      statistic="gram" if method == "regmean" else None, method=method)
        try:
            self.activation_memory = parse_size(activation_memory)
        except ValueError as exc:
            raise RegMeanError(f"activation_memory: {exc}") from None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.include_padding = include_padding
        self.accumulate_dtype = accumulate_dtype
        self.max_length, self.seed = max_length, seed
        self.device = resolve_device(device)
        self.progress = progress
        self.report: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: str | Path | Mapping[str, Any], **overrides: Any) -> RegMean:
        """Build from a FusionBench-style YAML file or dict (same keys as configs/)."""
        keys = config_keys()
        options = load_config(config, keys) if isinstance(config, (str, Path)) else parse_config(dict(config), "config",
                                                                                                  keys)
        if options.get("method", "regmean") not in ("regmean", BLOCKWISE):
            raise RegMeanError(f"config: method {options['method']!r}: the Python API merges with RegMean or "
                               f"{BLOCKWISE}; use `regmean merge` for the others")
        renamed = {"exclude": "exclude_param_names_regex", "num_examples": "num_regmean_examples"}
        accepted = set(inspect.signature(RegMean.__init__).parameters) - {"self"}
        kwargs = {renamed.get(key, key): value for key, value in options.items()
                  if renamed.get(key, key) in accepted}
        unused = sorted(key for key in options if renamed.get(key, key) not in accepted)
        if unused:
            log.info("config: %s are options of the command line, not used here", ", ".join(unused))
        return cls(**{**kwargs, **overrides})

    def run(
        self,
        models: Mapping[str, nn.Module] | Sequence[nn.Module],
        data: Mapping[str, Any] | Sequence[Any],
        *,
        preprocessors: Mapping[str, Any] | Any | None = None,
        coefficients: Mapping[str, float] | None = None,
        base: nn.Module | None = None,
    ) -> nn.Module:
        """Return a new merged model (a copy of the first, or of ``base``, with merged weights).

        ``data[name]`` is either an iterable of model-ready batches (dicts of tensors, e.g. a
        DataLoader) or raw examples (a ``datasets.Dataset`` or a list of strings) together with
        ``preprocessors[name]`` (or one shared tokenizer / image processor).
        """
        models = dict(models) if isinstance(models, Mapping) else {f"model_{i}": m for i, m in enumerate(models)}
        data = dict(data) if isinstance(data, Mapping) else dict(zip(models, data))
        if set(data) != set(models):
            raise RegMeanError(f"data is given for {sorted(data)} but the models are {sorted(models)}")
        coefficients = dict(coefficients or {})
        if self.method == BLOCKWISE:
            return self._run_blockwise(models, data, preprocessors, coefficients, base)
        candidates = []
        for name, model in models.items():
            batches = self._batches(name, model, data[name], preprocessors)
            candidates.append(self._candidate(name, model, batches, coefficients.get(name, 1.0)))
        plan = plan_merge(candidates, self.settings, base=self._weights(base) if base is not None else None)
        merged_state: dict[str, torch.Tensor] = {}
        result = execute_merge(plan, candidates, self.settings, merged_state.__setitem__, device=self.device,
                               base=self._weights(base) if base is not None else None, progress=self.progress)
        self.report = {"layers": result["layers"], "averaged": plan.averaged, "copied": plan.copied,
                       "timings": result["timings"]}
        return self._loaded(base if base is not None else next(iter(models.values())), merged_state)

    def _run_blockwise(self, models: dict[str, nn.Module], data: dict[str, Any], preprocessors: Any,
                       coefficients: Mapping[str, float], base: nn.Module | None) -> nn.Module:
        """RegMean++: block by block on the merged model's own hidden states (plusplus/)."""
        first = next(iter(models.values()))
        candidates = [BlockwiseCandidate(name, model.config, self._weights(model), coefficients.get(name, 1.0),
                                         list(self._batches(name, model, data[name], preprocessors)))
                      for name, model in models.items()]
        settings = BlockwiseSettings(self.settings, next(first.parameters()).dtype,
                                     parse_dtype(self.accumulate_dtype, "accumulate_dtype"), self.include_padding,
                                     self.activation_memory)
        merged_state: dict[str, torch.Tensor] = {}
        base_weights = self._weights(base) if base is not None else None
        runner = BlockwiseMerge(candidates, settings, device=self.device, base=base_weights, progress=self.progress)
        result = runner.run(merged_state.__setitem__)
        self.report = {"layers": result["layers"], "units": result["units"], "stack": result["stack"],
                       "activations": result["activations"], "timings": result["timings"]}
        return self._loaded(base if base is not None else first, merged_state)

    @staticmethod
    def _loaded(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        merged = copy.deepcopy(template)
        missing, unexpected = merged.load_state_dict(state, strict=False)
        untied = set(missing) - tied_parameter_names(merged)
        if untied or unexpected:  # a bug, not a user error
            raise RuntimeError(f"merged state does not fit the model: missing {sorted(untied)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]}")
        return merged

    @staticmethod
    def _weights(model: nn.Module) -> StateDictWeights:
        return StateDictWeights({k: v.detach().cpu() for k, v in model.state_dict().items()})

    def _candidate(self, name: str, model: nn.Module, batches: Iterable, coefficient: float) -> Candidate:
        original = next(model.parameters()).device
        model.to(self.device)
        try:
            stats = collect_grams(model, batches, device=self.device, include_padding=self.include_padding,
                                  accumulate_dtype=parse_dtype(self.accumulate_dtype, "accumulate_dtype"))
        finally:
            model.to(original)
        stats = stats.without_weights(tied_parameter_names(model))
        weights = self._weights(model)
        manifest = manifest_from_stats(
            stats, model={"reference": name, "architecture": architecture_of(model.config) if hasattr(model, "config")
                          else type(model).__name__, "fingerprint": fingerprint(weights)},
            dataset={"in_memory": True}, storage="memory", forward_dtype=str(next(model.parameters()).dtype),
            accumulate_dtype=self.accumulate_dtype, include_padding=self.include_padding)
        return Candidate(name, InMemoryStats(manifest, stats.sums), weights, coefficient, where=f"<memory:{name}>")

    def _batches(self, name: str, model: nn.Module, source: Any, preprocessors: Any) -> Iterator[dict]:
        """The first num_regmean_examples examples of ``source`` as model-ready batches."""
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], str):
            import datasets

            source = datasets.Dataset.from_dict({"text": list(source)})
        # A datasets.Dataset was made by an imported datasets; batches already tokenized need none.
        datasets = sys.modules.get("datasets")
        if datasets is not None and isinstance(source, datasets.Dataset):
            preprocessor = preprocessors.get(name) if isinstance(preprocessors, Mapping) else preprocessors
            if preprocessor is None:
                raise RegMeanError(f"data[{name!r}] is raw examples: pass preprocessors= (a tokenizer or image processor)")
            images = not hasattr(preprocessor, "pad_token")
            spec = DatasetSpec("<memory>", num_examples=self.num_examples, seed=self.seed, max_length=self.max_length,
                               image_column=next((c for c in ("image", "img") if c in source.column_names), None)
                               if images else None,
                               text_column=None if images else next((c for c in ("text", "sentence")
                                                                      if c in source.column_names), None))
            if (spec.image_column if images else spec.text_column) is None:
                raise RegMeanError(f"data[{name!r}]: no text/sentence (or image) column in {source.column_names}")
            examples = source.shuffle(seed=self.seed).select(range(min(self.num_examples, len(source))))
            source = make_loader(examples, preprocessor, spec, accepted=forward_inputs(model), config=model.config,
                                 batch_size=self.batch_size, num_workers=self.num_workers)
        return _first_examples(source, self.num_examples)


def _first_examples(batches: Iterable[Mapping[str, torch.Tensor]], limit: int) -> Iterator[dict]:
    taken = 0
    for batch in batches:
        if taken >= limit:
            return
        batch = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        size = len(next(iter(batch.values())))
        if taken + size > limit:
            batch = {k: v[: limit - taken] for k, v in batch.items()}
            size = limit - taken
        taken += size
        yield batch


class RegMeanPlusPlus(RegMean):
    """RegMean++ (Nguyen et al., 2025) in memory, with FusionBench's keys (``RegMeanAlgorithmPlusPlus``):
    each block's Grams are measured on the hidden states the merged embeddings and merged blocks before
    it produce. Same arguments as ``RegMean``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", BLOCKWISE)
        if kwargs["method"] != BLOCKWISE:
            raise RegMeanError(f"RegMeanPlusPlus: method must be {BLOCKWISE}, got {kwargs['method']!r}")
        super().__init__(**kwargs)
