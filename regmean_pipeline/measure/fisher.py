"""The diagonal Fisher information of every parameter, for Fisher merging (Matena & Raffel, 2022).

Two estimators:

- ``per-example`` (the default): Matena & Raffel's. For a classifier, the expected Fisher
  F = sum_x sum_y p(y|x) (d log p(y|x) / d theta)^2, over the model's own label distribution, one example at a
  time: each example's gradient is its own (``torch.func``: ``vmap`` over ``grad``, in chunks that fit
  ``memory``). For a causal language model, the empirical Fisher of the data's own tokens:
  F = sum_x (d log p(x) / d theta)^2, log p(x) summed over the counted tokens (``--tokens response``: the
  assistant's). A one-output regression head: the Fisher of a unit-variance Gaussian, (d f / d theta)^2.
- ``batch``: FusionBench's. The gradient of sum_x sum_y sqrt(p(y|x)) log p(y|x) over a whole batch, squared:
  the examples' gradients are added before squaring, so they mix. Offered to compare with FusionBench.

Both are sums over examples (divided by the count when merging), so shards, ranks and checkpoints add
them like Grams.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.per_example import BatchSharedInput, ModuleCalls, gradients_enabled, squared_gradients

log = logging.getLogger(__name__)

ESTIMATORS = ("per-example", "batch")
DEFAULT_MEMORY = 1 << 30  # bytes of per-example gradients held at once


@dataclass
class FisherStats:
    """One candidate's Fisher sums (not means) by parameter name, and the examples behind them."""

    sums: dict[str, torch.Tensor]
    examples: int = 0
    estimator: str = "per-example"
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = {name: self.examples for name in self.sums}


def fisher_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The floating-point parameters, each once (a tied weight under its first name)."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.is_floating_point()}


class FisherAccumulator:
    """Squared gradients of every parameter, summed over the batches it is given."""

    def __init__(self, model: nn.Module, *, estimator: str = "per-example",
                 accumulate_dtype: torch.dtype = torch.float32, memory: int = DEFAULT_MEMORY):
        if estimator not in ESTIMATORS:
            raise RegMeanError(f"--fisher-estimator: {estimator!r} is not one of {', '.join(ESTIMATORS)}")
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise RegMeanError("--statistics fisher: encoder-decoder models are not supported; Fisher needs a "
                               "sequence classifier or a causal language model")
        self.model, self.estimator, self.accumulate_dtype, self.memory = model, estimator, accumulate_dtype, memory
        self.parameters = fisher_parameters(model)
        self.sums: dict[str, torch.Tensor] = {}
        self.examples = 0
        self._kind: str | None = None
        self._causal: bool | None = None
        self._whole_model_vmap = False  # per-module hooks unless a module sees a batch-shared input
        self._positions: bool | None = None  # whether explicit position ids reproduce the model's own

    def restore(self, stats: FisherStats, device: torch.device | str) -> None:
        unknown = sorted(set(stats.sums) - set(self.parameters))
        if unknown:
            raise RegMeanError(f"parameter {unknown[0]}: in the checkpoint's Fisher but not a parameter of this model")
        self.sums = {name: total.to(device, self.accumulate_dtype) for name, total in stats.sums.items()}
        self.examples = stats.examples

    def snapshot(self) -> FisherStats:
        return FisherStats(dict(self.sums), self.examples, self.estimator)

    def result(self) -> FisherStats:
        return self.snapshot()

    def add(self, batch: Mapping[str, torch.Tensor], counted_rows: torch.Tensor | None = None, *,
            observe: Callable[[], AbstractContextManager] | None = None) -> None:
        """Add one batch (model inputs on the model's device; ``counted_rows``: the tokens that count).
        ``observe``: a context entered around this batch's one forward pass over the whole batch (the Gram
        hooks, so that both statistics come from one forward)."""
        size = len(next(iter(batch.values())))
        if self.estimator == "batch":
            self._add_batch_gradient(batch, counted_rows, observe)
        else:
            self._add_per_example(batch, counted_rows, observe)
        self.examples += size
        self._check_finite()

    def _check_finite(self) -> None:
        # A sum of squares is finite exactly when each of them is: one reduction per parameter, one sync.
        if not self.sums:
            return
        totals = torch.stack([total.sum(dtype=torch.float64) for total in self.sums.values()])
        if bool(torch.isfinite(totals).all()):
            return
        for name, finite in zip(self.sums, torch.isfinite(totals).tolist()):
            if not finite:
                raise RegMeanError(f"parameter {name}: its Fisher sum overflowed or holds NaN; try --dtype float32 "
                                   "or --accumulate-dtype float64")

    def _forward(self, inputs: Mapping[str, torch.Tensor], observe: Callable[[], AbstractContextManager] | None):
        """The model on the whole batch, inside ``observe`` where given."""
        with observe() if observe is not None else contextlib.nullcontext():
            return self.model(**inputs)

    def _logits(self, output) -> torch.Tensor:
        """The forward's logits, checked: present and finite; the first ones tell the kind of model."""
        logits = getattr(output, "logits", None)
        if logits is None:
            raise RegMeanError(f"--statistics fisher: {type(self.model).__name__} returns no logits; Fisher needs a "
                               "sequence classifier or a causal language model (a model with its head)")
        if self._kind is None:
            self._kind = self._kind_of(logits)
        if not torch.isfinite(logits).all():
            raise RegMeanError(f"batch {self.examples // max(len(logits), 1) + 1}: NaN or Inf in the logits; the "
                               "Fisher needs finite outputs (try --dtype float32)")
        return logits

    def _kind_of(self, logits: torch.Tensor) -> str:
        architecture = type(self.model).__name__
        if logits.dim() == 2:
            return "regression" if logits.shape[-1] == 1 else "classifier"
        if logits.dim() == 3 and architecture.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        raise RegMeanError(f"--statistics fisher: {architecture} has no output distribution this tool knows (its "
                           f"logits have shape {list(logits.shape)}); Fisher needs a sequence classifier or a causal "
                           "language model")

    def _accumulate(self, name: str, squares: torch.Tensor) -> None:
        squares = squares.to(self.accumulate_dtype)
        total = self.sums.get(name)
        if total is None:
            self.sums[name] = squares.clone()
        else:
            total.add_(squares)

    # FusionBench's estimator: one gradient per batch, squared.
    def _add_batch_gradient(self, batch, counted_rows, observe) -> None:
        names = list(self.parameters)
        with gradients_enabled(self.parameters):
            logits = _widened(self._logits(self._forward(batch, observe)))
            objective = self._batch_objective(logits, batch, counted_rows)
            gradients = torch.autograd.grad(objective, [self.parameters[n] for n in names], allow_unused=True)
        for name, gradient in zip(names, gradients):
            if gradient is not None:
                self._accumulate(name, _widened(gradient) ** 2)

    def _batch_objective(self, logits: torch.Tensor, batch, counted_rows) -> torch.Tensor:
        if self._kind == "classifier":
            log_probs = torch.log_softmax(logits, dim=-1)
            return (log_probs.detach().exp().sqrt() * log_probs).sum()
        if self._kind == "regression":
            return logits.sum()
        return token_log_likelihood(logits, batch["input_ids"], _counted(batch, counted_rows)).sum()

    # Matena & Raffel's estimator: each example's own gradient, squared, then summed.
    def _add_per_example(self, batch, counted_rows, observe) -> None:
        """By per-module hooks on one batched pass (measure/per_example.py); by ``vmap`` over the whole model
        when some module sees an input the batch shares."""
        if not self._whole_model_vmap:
            try:
                self._add_by_hooks(batch, counted_rows, observe)
                return
            except BatchSharedInput as exc:  # raised after the forward: ``observe`` has seen this batch
                log.info("Fisher: %s is called on an input the batch shares; per-example gradients by vmap over "
                         "the whole model instead (slower)", exc)
                self._whole_model_vmap = True
                observe = None
        with torch.no_grad():
            logits = self._logits(self._forward(batch, observe))
        self._add_by_vmap(batch, logits, counted_rows)

    def _add_by_hooks(self, batch, counted_rows, observe) -> None:
        batch = self._with_positions(batch)
        staged: dict[str, torch.Tensor] = {}

        def stage(name: str, values) -> None:  # committed only once the whole batch is done
            if name not in staged:
                staged[name] = torch.zeros(self.parameters[name].shape, dtype=self.accumulate_dtype,
                                           device=self.parameters[name].device)
            if isinstance(values, tuple):  # an embedding's (row ids, rows)
                staged[name].index_add_(0, values[0], values[1].to(self.accumulate_dtype))
            else:
                staged[name] += values

        with gradients_enabled(self.parameters), ModuleCalls(self.model, self.parameters) as calls:
            logits = _widened(self._logits(self._forward(batch, observe)))
            objectives = self._objectives(logits, batch, counted_rows)
            for index, (objective, weights) in enumerate(objectives):
                calls.backward(objective, retain_graph=index < len(objectives) - 1)
                squared_gradients(calls, self.parameters, weights, self.memory, stage)
        for name, values in staged.items():
            self._accumulate(name, values)

    def _with_positions(self, batch) -> dict:
        """The batch with position ids for every example, where the model's own default (one row the batch
        shares, which per-module gradients cannot split) gives the same outputs: checked on the first batch."""
        if "position_ids" in batch or "input_ids" not in batch or \
                "position_ids" not in inspect.signature(self.model.forward).parameters:
            return batch
        ids = batch["input_ids"]
        explicit = {**batch, "position_ids": torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)}
        if self._positions is None:
            with torch.no_grad():
                theirs, ours = (getattr(self.model(**inputs), "logits", None) for inputs in (batch, explicit))
            self._positions = theirs is not None and bool(torch.equal(theirs, ours))
        return explicit if self._positions else batch

    def _objectives(self, logits, batch, counted_rows) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(objective, per-example weights): the examples' summed log-likelihoods, whose gradient at each
        module's output is each example's own, with the weight its square gets."""
        ones = torch.ones(len(logits), dtype=logits.dtype, device=logits.device)
        if self._kind == "classifier":
            log_probs = torch.log_softmax(logits, dim=-1)
            return [(log_probs[:, label].sum(), log_probs[:, label].detach().exp())
                    for label in range(log_probs.shape[-1])]
        if self._kind == "regression":
            return [(logits[:, 0].sum(), ones)]
        return [(token_log_likelihood(logits, batch["input_ids"], _counted(batch, counted_rows)).sum(), ones)]

    def _add_by_vmap(self, batch, logits, counted_rows) -> None:
        batch = dict(batch)
        if counted_rows is not None:
            batch[_COUNTED] = counted_rows
        mask = batch.pop("attention_mask", None)
        if mask is not None:
            batch[_MASK] = mask
            if self._causal is None:
                self._causal = self._mask_is_causal(batch, logits)
        probabilities = torch.softmax(_widened(logits), dim=-1) if self._kind == "classifier" else None
        outputs = range(logits.shape[-1]) if self._kind == "classifier" else [None]
        chunk = self._chunk()
        size = len(logits)
        for output in outputs:
            for start in range(0, size, chunk):
                part = {key: value[start:start + chunk] for key, value in batch.items()}
                gradients = torch.func.vmap(torch.func.grad(self._example_objective(output)),
                                            in_dims=(None, 0))(self._detached(), part)
                weights = probabilities[start:start + chunk, output] if probabilities is not None else None
                for name, gradient in gradients.items():
                    squares = _widened(gradient) ** 2
                    if weights is not None:
                        squares = squares * weights.reshape(-1, *[1] * (squares.dim() - 1))
                    self._accumulate(name, squares.sum(0))

    def _mask_dtype(self) -> torch.dtype:
        return next(iter(self.parameters.values())).dtype

    def _chunk(self) -> int:
        """Examples whose gradients fit ``memory`` together (each is one float per parameter, squared too)."""
        per_example = 3 * 4 * sum(p.numel() for p in self.parameters.values())
        return max(1, self.memory // per_example)

    def _detached(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in self.parameters.items()}

    def _example_objective(self, output: int | None) -> Callable:
        """One example's log-likelihood (of label ``output``; of its own tokens; a regression's output)."""
        kind, causal = self._kind, self._causal

        def objective(parameters, example):
            inputs = {key: value.unsqueeze(0) for key, value in example.items() if key not in (_MASK, _COUNTED)}
            if _MASK in example:
                inputs["attention_mask"] = additive_mask(example[_MASK], causal, self._mask_dtype()).unsqueeze(0)
            logits = _widened(torch.func.functional_call(self.model, parameters, args=(), kwargs=inputs).logits)
            if kind == "classifier":
                return torch.log_softmax(logits[0], dim=-1)[output]
            if kind == "regression":
                return logits[0, 0]
            counted = example.get(_COUNTED, example.get(_MASK))
            return token_log_likelihood(logits, inputs["input_ids"],
                                        None if counted is None else counted.unsqueeze(0))[0]

        return objective

    def _mask_is_causal(self, batch, logits: torch.Tensor) -> bool:
        """Whether the model's attention is causal, found by giving it each mask for the batch's first
        example: the one that reproduces its own logits is the one its forward builds."""
        first = {key: value[:1] for key, value in batch.items() if key != _COUNTED}
        errors = {}
        for causal in (False, True):
            inputs = {key: value for key, value in first.items() if key != _MASK}
            inputs["attention_mask"] = additive_mask(first[_MASK][0], causal, self._mask_dtype()).unsqueeze(0)
            with torch.no_grad():
                theirs = self.model(**inputs).logits
            errors[causal] = float((_widened(theirs) - _widened(logits[:1])).abs().max())
        best = min(errors, key=errors.get)
        scale = float(_widened(logits[:1]).abs().max()) + 1e-6
        if errors[best] > 1e-4 * scale:
            raise RegMeanError(f"--statistics fisher: {type(self.model).__name__} does not take a per-example "
                               "attention mask this tool can build; use --fisher-estimator batch")
        return best


_MASK, _COUNTED = "_fisher_mask", "_fisher_counted"


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """float32 at least: log-probabilities and squares of bfloat16 or float16 outputs lose too much."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def additive_mask(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """One example's (1, T, T) additive attention mask from its (T,) padding mask: a 4-D mask is used as
    given, so the model builds none from the data (which ``vmap`` cannot trace)."""
    length = mask.shape[-1]
    allowed = mask.bool()[None, None, :].expand(1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def token_log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """Per sequence: the sum of log p(token | the tokens before it) over the counted tokens after the first."""
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = input_ids[:, 1:]
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if counted is not None:
        picked = picked * counted[:, 1:].to(picked.dtype)
    return picked.sum(-1)


def _counted(batch: Mapping[str, torch.Tensor], counted_rows: torch.Tensor | None) -> torch.Tensor | None:
    return counted_rows if counted_rows is not None else batch.get("attention_mask")
