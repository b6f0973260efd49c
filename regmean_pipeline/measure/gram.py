"""Gram accumulation: sum(x^T x) of the input of every linear layer, once per distinct input tensor."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from regmean_pipeline.cache.symmetric import accumulate_upper_, mirror_upper_
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.linear import LinearLayer, find_linear_layers

log = logging.getLogger(__name__)

# A batch key that is not a model input: the (batch, sequence) positions whose rows count, used instead
# of the attention mask (``--tokens response``: the assistant's tokens only).
ROW_MASK_KEY = "_regmean_counted_rows"


@dataclass
class GramStats:
    """One candidate's statistics: Gram sums (not means) and the rows that went into each."""

    layers: dict[str, LinearLayer]  # module name -> layer, in module order
    layer_grams: dict[str, str]  # module name -> gram key (layers fed one tensor share a key)
    sums: dict[str, torch.Tensor]  # gram key -> (d, d) sum of x x^T
    tokens: dict[str, int]  # gram key -> rows accumulated
    examples: int = 0
    extra: dict = field(default_factory=dict)

    def without_weights(self, weights: set[str]) -> GramStats:
        """Drop the layers whose weight is one of ``weights`` (tied to an embedding, so not a free
        parameter) and any Gram no remaining layer uses."""
        names = {name for name, layer in self.layers.items() if layer.weight in weights}
        layer_grams = {n: key for n, key in self.layer_grams.items() if n not in names}
        # A dropped owner's Gram stays under its key while another layer still reads it.
        keys = set(layer_grams.values())
        return GramStats(
            layers={n: layer for n, layer in self.layers.items() if n not in names},
            layer_grams=layer_grams,
            sums={key: total for key, total in self.sums.items() if key in keys},
            tokens={key: count for key, count in self.tokens.items() if key in keys},
            examples=self.examples,
            extra=self.extra,
        )


class GramAccumulator:
    """Forward pre-hooks on every linear layer that accumulate input Grams in place.

    Each batch adds to the upper triangle only (``accumulate_upper_``); ``result`` mirrors it once.

    Layers fed the very same tensor object (q/k/v, gate/up) share one Gram. Sharing is found by
    object identity while this pass holds a reference to every input it saw, so an id() cannot be
    recycled by the allocator mid-pass; it is fixed on the first batch and checked on every later one.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include_padding: bool = False,
        accumulate_dtype: torch.dtype = torch.float32,
        layers: Iterable[LinearLayer] | None = None,
    ) -> None:
        self.model = model
        self.include_padding = include_padding
        self.accumulate_dtype = accumulate_dtype
        self.layers = {layer.name: layer for layer in (find_linear_layers(model) if layers is None else layers)}
        self.examples = 0
        self._key_of: dict[str, str] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._pass_inputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._mask: torch.Tensor | None = None
        self._decoder_mask: torch.Tensor | None = None
        self._encoder_output: torch.Tensor | None = None
        self._masks_by_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._handles: list = []
        self._batches = 0
        self._active = False  # the hooks record only inside ``batch`` (not in other forwards, e.g. the Fisher's)

    def __enter__(self) -> GramAccumulator:
        modules = dict(self.model.named_modules())
        for name in self.layers:
            hook = functools.partial(self._on_input, name)
            self._handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        self._track_encoder_decoder()
        return self

    def _track_encoder_decoder(self) -> None:
        """Once an encoder-decoder's encoder has run, the rows are the decoder's (its stack and the LM head
        after it), except the encoder's output itself, which cross-attention reads."""
        config = getattr(self.model, "config", None)
        if not getattr(config, "is_encoder_decoder", False) or not hasattr(self.model, "get_encoder"):
            return

        def remember_output(module, args, output) -> None:
            self._encoder_output = output[0] if isinstance(output, (tuple, Mapping)) else output  # ModelOutput too

        self._handles.append(self.model.get_encoder().register_forward_hook(remember_output))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pass_inputs.clear()

    @contextlib.contextmanager
    def batch(self, attention_mask: torch.Tensor | None, num_examples: int, *,
              counted_rows: torch.Tensor | None = None, decoder_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Wrap one forward pass; ``attention_mask`` marks the rows that count (None: all), unless
        ``counted_rows`` is given, which always applies; ``decoder_mask``: an encoder-decoder's decoder rows."""
        if counted_rows is not None and self.include_padding:
            raise RegMeanError("--include-padding: counts every position, which contradicts counting only some "
                               "tokens (--tokens response); leave one of them out")
        self._mask = counted_rows.bool() if counted_rows is not None else \
            None if self.include_padding or attention_mask is None else attention_mask.bool()
        self._decoder_mask = None if self.include_padding or decoder_mask is None else decoder_mask.bool()
        self._masks_by_device.clear()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._pass_inputs.clear()
            self._mask = self._decoder_mask = self._encoder_output = None
            self._masks_by_device.clear()
        self._batches += 1
        self.examples += num_examples
        self._check_finite()

    def _on_input(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        seen = self._pass_inputs.get(id(x))
        if seen is not None and seen[0] is x:
            key = self._key_of.setdefault(name, self._key_of[seen[1]])
            if key != self._key_of[seen[1]]:
                raise RegMeanError(
                    f"layer {name}: its input is shared with {seen[1]} in batch {self._batches + 1} "
                    "but was not in the first batch; the model's data flow changes between batches"
                )
            return
        key = self._key_of.setdefault(name, name)
        if key != name:
            raise RegMeanError(
                f"layer {name}: its input was shared with {key} in the first batch but not in batch "
                f"{self._batches + 1}; the model's data flow changes between batches"
            )
        self._pass_inputs[id(x)] = (x, name)
        self._accumulate(key, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, d) view of the input, padded positions left out when a mask applies."""
        decoder_rows = self._encoder_output is not None and x is not self._encoder_output
        mask = self._decoder_mask if decoder_rows else self._mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            if mask.device != x.device:
                mask = self._masks_by_device.setdefault((id(mask), x.device), mask.to(x.device))
            return x[mask].reshape(-1, x.shape[-1])
        return x.reshape(-1, x.shape[-1])

    @torch.inference_mode()  # also inside a forward that records gradients (the Fisher's)
    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        rows = self._rows(x).detach().to(self.accumulate_dtype)  # x itself: _rows tells inputs apart by identity
        total = self._sums.get(key)
        if total is None:
            dim = rows.shape[-1]
            total = self._sums[key] = torch.zeros(dim, dim, dtype=self.accumulate_dtype, device=rows.device)
            self._tokens[key] = 0
        elif total.device != rows.device:  # restored from a checkpoint onto another device
            total = self._sums[key] = total.to(rows.device)
        self._product(total, rows)
        self._tokens[key] += rows.shape[0]

    def _product(self, total: torch.Tensor, rows: torch.Tensor) -> None:
        """The Gram product itself (a seam the benchmark times)."""
        accumulate_upper_(total, rows)

    def _check_finite(self) -> None:
        if not self._sums:
            return
        # The diagonal holds sum(x_j^2): any NaN or Inf in an input lands there. One sync per batch.
        sums = [total.diagonal().sum() for total in self._sums.values()]
        diagonal_sums = torch.stack([s.to(sums[0].device) for s in sums])
        if bool(torch.isfinite(diagonal_sums).all()):
            return
        for key, finite in zip(self._sums, torch.isfinite(diagonal_sums).tolist()):
            if not finite:
                raise RegMeanError(
                    f"layer {key}: NaN or Inf in its input (batch {self._batches}); the weights hold "
                    "non-finite values or the forward pass overflowed (try --dtype float32 or bfloat16)"
                )

    def restore(self, stats: GramStats, device: torch.device | str) -> None:
        """Continue from saved sums (a checkpoint): the shared-input layout and counts come with them."""
        unknown = sorted(set(stats.layer_grams) - set(self.layers))
        if unknown:
            raise RegMeanError(f"layer {unknown[0]}: in the checkpoint but not a linear layer of this model")
        self._key_of = dict(stats.layer_grams)
        self._sums = {key: total.to(device, self.accumulate_dtype) for key, total in stats.sums.items()}
        self._tokens = dict(stats.tokens)
        self.examples = stats.examples

    def snapshot(self) -> GramStats:
        """The sums so far, as live tensors (not copies): valid until the next batch runs. Only their
        upper triangles are filled (what caches and checkpoints store); ``result`` mirrors them."""
        seen = [name for name in self.layers if name in self._key_of]
        return GramStats(
            layers={name: self.layers[name] for name in seen},
            layer_grams={name: self._key_of[name] for name in seen},
            sums=dict(self._sums),
            tokens=dict(self._tokens),
            examples=self.examples,
        )

    def result(self) -> GramStats:
        unseen = [name for name in self.layers if name not in self._key_of]
        if unseen:
            log.info("%d linear layers never ran in the forward pass and get no Gram: %s",
                     len(unseen), ", ".join(unseen[:5]) + (" ..." if len(unseen) > 5 else ""))
        with torch.inference_mode():  # the sums were made under it (collect_grams): in-place needs it too
            for total in self._sums.values():
                mirror_upper_(total)
        return self.snapshot()


def batch_size_of(batch: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the keys that only the hooks read."""
    return {key: value for key, value in batch.items() if key != ROW_MASK_KEY}


def collect_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str,
    include_padding: bool = False,
    accumulate_dtype: torch.dtype = torch.float32,
    progress=None,
    layers: Iterable[LinearLayer] | None = None,
    start: GramStats | None = None,
    after_batch: Callable[[GramAccumulator], None] | None = None,
    accumulator: type[GramAccumulator] = GramAccumulator,
    fisher=None,
    grams: bool = True,
) -> GramStats:
    """Run the model over the batches with the hooks on; the one loop shared by stats and the API.

    ``layers`` limits the hooks to some layers (one pass of a multi-pass run); default: all.
    ``start``: sums to continue from (a resumed run); ``after_batch``: called once each batch is
    accumulated and checked (checkpoints). ``fisher``: a FisherAccumulator (measure/fisher.py) given the
    same batches; ``grams=False``: the Fisher alone, no Gram forward.
    """
    model.eval()
    with accumulator(model, include_padding=include_padding, accumulate_dtype=accumulate_dtype,
                     layers=layers if grams else []) as acc:
        if start is not None:
            acc.restore(start, device)
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            counted_rows = batch.pop(ROW_MASK_KEY, None)
            size = batch_size_of(batch)

            def measured(batch=batch, size=size, counted_rows=counted_rows):  # the Gram hooks on, for one forward
                return acc.batch(batch.get("attention_mask"), size, counted_rows=counted_rows,
                                 decoder_mask=batch.get("decoder_attention_mask"))

            if fisher is None:
                with torch.inference_mode(), measured():
                    model(**batch)
            elif grams:  # the Grams read the Fisher's own forward: one forward per batch, not two
                fisher.add(batch, counted_rows, observe=measured)
            else:
                with measured():  # counts the batch
                    pass
                fisher.add(batch, counted_rows)
            if progress is not None:
                progress.update(size)
            if after_batch is not None:
                after_batch(acc)
        with torch.inference_mode():
            return acc.result()
