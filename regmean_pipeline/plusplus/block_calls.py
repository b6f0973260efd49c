"""Hidden states handed from block to block through the model's own forward.

The model computes everything its blocks receive besides the hidden states (attention masks, rotary
position embeddings, causal masks, position ids) in its own forward, before its loop over the stack. So
to learn what block l receives for a batch, the model runs with its stack's entries swapped: blocks
before l pass their input through untouched, block l records its arguments and stops the forward. The
recorded call then runs any real block (a candidate's, or the merged one) on any hidden states. For the
tail, the last block instead returns the merged trunk's output, and the model's own code carries it
through its final norm, pooling and head.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.plusplus.stack import BlockStack


class _Stop(Exception):
    """Raised by the recording block: nothing after it needs to run."""


@dataclass
class BlockCall:
    """The arguments the model passed to one block for one batch."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def on(self, hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        """The same call with other hidden states."""
        if self.args:
            return (hidden, *self.args[1:]), self.kwargs
        return (), {**self.kwargs, "hidden_states": hidden}


@dataclass(frozen=True)
class BlockOutput:
    """What a block returns: the hidden states alone, or a tuple whose first item they are."""

    tuple_length: int | None = None  # None: a tensor

    def wrap(self, hidden: torch.Tensor):
        return hidden if self.tuple_length is None else (hidden,) + (None,) * (self.tuple_length - 1)

    @staticmethod
    def hidden_of(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output[0]


class _Record(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.call: BlockCall | None = None

    def forward(self, *args, **kwargs):
        self.call = BlockCall(args, kwargs)
        raise _Stop


class _Pass(nn.Module):
    def __init__(self, output: BlockOutput) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output.wrap(args[0] if args else kwargs["hidden_states"])


class _Inject(nn.Module):
    def __init__(self, output: BlockOutput) -> None:
        super().__init__()
        self.output = output
        self.hidden: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return self.output.wrap(self.hidden)


class StackDriver:
    """Runs a model (built without weights in its stack) with its blocks swapped for recorders."""

    def __init__(self, model: nn.Module, stack: BlockStack, output: BlockOutput | None = None) -> None:
        self.model, self.stack = model, stack
        self.entries: nn.ModuleList = model.get_submodule(stack.path)
        self.blocks: list[nn.Module] = list(self.entries)  # the real block modules, kept aside
        self.output = output or BlockOutput()
        accepted = set(inspect.signature(model.forward).parameters)
        self._extra = {"use_cache": False} if "use_cache" in accepted else {}

    def _forward(self, batch: Mapping[str, torch.Tensor]) -> None:
        try:
            self.model(**batch, **self._extra)
        except _Stop:
            pass

    def record(self, batch: Mapping[str, torch.Tensor], index: int) -> BlockCall:
        """What block ``index`` receives for this batch (its hidden states those of blocks passing through)."""
        recorder = _Record()
        for position in range(index):
            self.entries[position] = _Pass(self.output)
        self.entries[index] = recorder
        self._forward(batch)
        if recorder.call is None:
            raise RegMeanError(f"{type(self.model).__name__}: the forward pass never reached block {index} of "
                               f"{self.stack.path}")
        return recorder.call

    @staticmethod
    def run(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = call.on(hidden)
        return BlockOutput.hidden_of(block(*args, **kwargs))

    def run_tail(self, batch: Mapping[str, torch.Tensor], final_hidden: torch.Tensor) -> None:
        """The model's forward from the last block's output on: final norm, pooling, heads."""
        inject = _Inject(self.output)
        inject.hidden = final_hidden
        for position in range(self.stack.length - 1):
            self.entries[position] = _Pass(self.output)
        self.entries[self.stack.length - 1] = inject
        self.model(**batch, **self._extra)

    def modules_before_stack(self, batch: Mapping[str, torch.Tensor]) -> set[str]:
        """Names of the modules holding tensors of their own that run before the first block."""
        ran: list[str] = []
        handles = []
        stack_head = self.stack.path + "."
        for name, module in self.model.named_modules():
            own = next(iter(module.parameters(recurse=False)), None) is not None \
                or next(iter(module.buffers(recurse=False)), None) is not None
            if own and not name.startswith(stack_head):
                handles.append(module.register_forward_pre_hook(lambda *_, name=name: ran.append(name)))
        try:
            self.record(batch, 0)
        finally:
            for handle in handles:
                handle.remove()
        return set(ran)


def probe_output(block: nn.Module, call: BlockCall) -> BlockOutput:
    """How this architecture's blocks return: a tensor, or a tuple that carries nothing but the hidden
    states to the next block (a block handing on more, as T5's position bias, cannot be driven this way)."""
    output = block(*call.args, **call.kwargs)
    if isinstance(output, torch.Tensor):
        return BlockOutput()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        extra = [i for i, item in enumerate(output[1:], 1) if item is not None]
        if extra:
            raise RegMeanError(f"{type(block).__name__}: its output carries more than hidden states to the next "
                               f"block (item {extra[0]}); RegMean++ cannot drive this architecture, use "
                               "--method regmean")
        return BlockOutput(len(output))
    raise RegMeanError(f"{type(block).__name__}: returns {type(output).__name__}, not hidden states; RegMean++ "
                       "cannot drive this architecture, use --method regmean")
