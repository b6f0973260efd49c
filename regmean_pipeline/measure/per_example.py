"""Each example's own gradient of every parameter, from one batched forward and backward.

Vectorising the whole model over examples (``torch.func.vmap`` of its forward) makes every example's full
gradient through every layer at once, and transformers models build their attention masks from the data in
ways ``vmap`` cannot trace. Here the model runs as usual, on the whole batch; hooks keep the input of every
module that owns parameters and, during the backward pass, the gradient of its output. A module's
parameters affect the loss only through its output, so one example's gradient of them is the vector-Jacobian
product of that module alone, at that example's input and output gradient: ``vmap`` over the examples of
``vjp`` of one layer, cheap. Embeddings take the sparse route: an example's gradient is the sum of its
tokens' output gradients in their rows. A parameter used by several modules or calls (tied weights) gets
the sum of its parts before it is squared.

This needs the examples of a batch to be independent (they are, in eval mode) and every module with
parameters to see the batch along its first dimension; ``BatchSharedInput`` is raised otherwise (a module
called on one input shared by the batch), and the caller falls back to ``vmap`` over the whole model.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn


class BatchSharedInput(Exception):
    """A module with parameters was called on an input the batch shares (e.g. position ids of shape (1, T))."""


class ModuleCalls:
    """Forward hooks on every module that owns parameters: each call's inputs and output; ``backward`` gives
    every output its gradient (replacing the last one's)."""

    def __init__(self, model: nn.Module, parameters: dict[str, nn.Parameter]):
        wanted = {id(p) for p in parameters.values()}
        self.modules = [m for m in model.modules()
                        if any(id(p) in wanted for p in m.parameters(recurse=False))]
        self.calls: dict[nn.Module, list[dict]] = defaultdict(list)
        self.recording = True  # off while per-example gradients rerun the modules
        self._handles: list = []

    def __enter__(self) -> ModuleCalls:
        for module in self.modules:
            self._handles.append(module.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, module, args, kwargs, output) -> None:
        if not (self.recording and torch.is_tensor(output) and output.requires_grad):
            return
        call = {"args": tuple(a.detach() if torch.is_tensor(a) else a for a in args), "kwargs": kwargs,
                "output": output, "grad": None}
        self.calls[module].append(call)

    def backward(self, objective: torch.Tensor, *, retain_graph: bool) -> None:
        """The objective's gradient at every recorded output; no parameter's gradient is formed (each is
        made per example from these)."""
        records = [call for calls in self.calls.values() for call in calls]
        grads = torch.autograd.grad(objective, [call["output"] for call in records], retain_graph=retain_graph,
                                    allow_unused=True)
        for call, grad in zip(records, grads):
            call["grad"] = None if grad is None else grad.detach()

    def clear(self) -> None:
        self.calls.clear()


def squared_gradients(calls: ModuleCalls, parameters: dict[str, nn.Parameter], weights: torch.Tensor,
                      memory: int, accumulate: Callable[[str, torch.Tensor], None]) -> None:
    """For every parameter, sum over examples b of weights[b] * (its gradient for example b)^2, from the
    calls' recorded inputs and output gradients (one backward pass), handed to ``accumulate(name, values)``:
    a tensor of the parameter's shape, or for an embedding (row ids, rows) to be added into those rows.

    A parameter one call uses is squared as soon as its per-example gradients are made; one that several
    calls use (tied weights, a module called twice) is summed over them first. Examples go in chunks
    whose per-example gradients fit ``memory`` bytes."""
    calls.recording = False
    try:
        _squared_gradients(calls, parameters, weights, memory, accumulate)
    finally:
        calls.recording = True


def _squared_gradients(calls: ModuleCalls, parameters: dict[str, nn.Parameter], weights: torch.Tensor,
                       memory: int, accumulate: Callable[[str, torch.Tensor], None]) -> None:
    size = len(weights)
    names = {id(p): name for name, p in parameters.items()}
    users: dict[str, int] = defaultdict(int)
    largest = 1
    for module, records in calls.calls.items():
        owned = [names[id(p)] for p in module.parameters(recurse=False) if id(p) in names]
        for name in owned:
            users[name] += sum(record["grad"] is not None for record in records)
        if not isinstance(module, nn.Embedding):
            largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))
    shared = sum(parameters[name].numel() for name, count in users.items() if count > 1)
    chunk = max(1, memory // (12 * (largest + shared)))
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        part_weights = weights[start:stop]
        pending: dict[str, torch.Tensor | list[_Rows]] = {}
        for module, records in calls.calls.items():
            for record in records:
                if record["grad"] is None:
                    continue
                for attr, part in _module_gradients(module, record, start, stop, size):
                    name = names.get(id(getattr(module, attr)))
                    if name is None:
                        continue
                    if users[name] == 1:
                        _square(name, part, part_weights, parameters, accumulate)
                    elif isinstance(part, _Rows) or isinstance(pending.get(name), list):
                        held = pending.get(name)
                        pending[name] = (held if isinstance(held, list) else [] if held is None else [held]) + [part]
                    else:
                        pending[name] = part if name not in pending else pending[name] + part
        for name, part in pending.items():
            _square(name, part, part_weights, parameters, accumulate)


def _square(name: str, part, weights: torch.Tensor, parameters: dict[str, nn.Parameter],
            accumulate: Callable[[str, torch.Tensor], None]) -> None:
    """Sum over the chunk's examples of weights * per-example gradient^2; rows (an embedding's) are summed
    per example and row first, a list of them with a dense part (a tied head) added into it."""
    if isinstance(part, list):
        tensors = [p for p in part if torch.is_tensor(p)]
        dense = sum(tensors[1:], tensors[0]) if tensors else None
        rows = [p for p in part if isinstance(p, _Rows)]
        if dense is None:
            _Rows.squared_sum(rows, weights, parameters[name], lambda v: accumulate(name, v))
            return
        for piece in rows:
            dense = piece.added_to(dense)
        part = dense
    if isinstance(part, _Rows):
        _Rows.squared_sum([part], weights, parameters[name], lambda v: accumulate(name, v))
        return
    squares = part.to(torch.promote_types(part.dtype, torch.float32)).pow_(2)
    accumulate(name, torch.tensordot(weights.to(squares.dtype), squares, dims=1))


class _Rows:
    """An embedding's per-example gradient as rows: for examples start..stop, (example, row id, gradient)."""

    def __init__(self, examples: torch.Tensor, ids: torch.Tensor, values: torch.Tensor):
        self.examples, self.ids, self.values = examples, ids, values

    def added_to(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.index_put((self.examples, self.ids), self.values.to(dense.dtype), accumulate=True)

    @staticmethod
    def squared_sum(parts: list[_Rows], weights: torch.Tensor, parameter: nn.Parameter,
                    accumulate: Callable[[tuple[torch.Tensor, torch.Tensor]], None]) -> None:
        """Rows of one parameter from several calls: summed per (example, row), squared and weighted;
        handed on as (row ids, values), each id once per example (the caller adds them into its rows)."""
        examples = torch.cat([p.examples for p in parts])
        ids = torch.cat([p.ids for p in parts])
        values = torch.cat([p.values for p in parts]).to(torch.float32 if parameter.dtype != torch.float64
                                                         else torch.float64)
        rows = parameter.shape[0]
        key = examples * rows + ids
        unique, inverse = torch.unique(key, return_inverse=True)
        sums = torch.zeros((len(unique), *values.shape[1:]), dtype=values.dtype, device=values.device)
        sums.index_add_(0, inverse, values)
        squares = sums ** 2 * weights.to(values.dtype)[unique // rows].reshape(-1, *[1] * (sums.dim() - 1))
        accumulate((unique % rows, squares))


def _module_gradients(module: nn.Module, record: dict, start: int, stop: int, size: int
                      ) -> Iterator[tuple[str, torch.Tensor | _Rows]]:
    """(attribute, per-example gradient) for each of the module's own parameters, examples start..stop."""
    grad = record["grad"]
    batched = [torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == size for a in record["args"]]
    if grad.shape[0] != size or not any(batched):
        raise BatchSharedInput(f"{type(module).__name__} (grad {tuple(grad.shape)}, batch {size}, args {[tuple(a.shape) if torch.is_tensor(a) else type(a).__name__ for a in record['args']]})")
    grad = grad[start:stop]
    args = tuple(a[start:stop] if is_batched else a for a, is_batched in zip(record["args"], batched))
    if isinstance(module, nn.Embedding):
        yield "weight", _embedding_rows(module, args[0], grad, start)
        return
    if isinstance(module, nn.Linear) and len(args) == 1 and not record["kwargs"]:
        yield from _linear_gradients(module, args[0], grad)
        return
    own = dict(module.named_parameters(recurse=False))
    kwargs = record["kwargs"]

    def one(example_args, example_grad):
        def forward(params):
            inputs = [a.unsqueeze(0) if b else a for a, b in zip(example_args, batched)]
            return torch.func.functional_call(module, params, tuple(inputs), kwargs)

        _, pullback = torch.func.vjp(forward, own)
        return pullback(example_grad.unsqueeze(0))[0]

    in_dims = (tuple(0 if b else None for b in batched), 0)
    gradients = torch.func.vmap(one, in_dims=in_dims)(args, grad)
    yield from gradients.items()


def _linear_gradients(module: nn.Linear, inputs: torch.Tensor, grad: torch.Tensor
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """A linear layer's per-example gradients in one batched product: W's is sum over positions of
    grad^T input, b's the sum of grad (what vmap of its vjp computes, without the per-example overhead)."""
    flat_in = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).to(grad.dtype)
    flat_grad = grad.reshape(grad.shape[0], -1, grad.shape[-1])
    yield "weight", torch.bmm(flat_grad.transpose(1, 2), flat_in)
    if module.bias is not None:
        yield "bias", flat_grad.sum(1)


def _embedding_rows(module: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor, start: int) -> _Rows:
    examples = torch.arange(ids.shape[0], device=ids.device).reshape(-1, *[1] * (ids.dim() - 1)).expand_as(ids)
    flat_ids, flat_examples = ids.reshape(-1), examples.reshape(-1)
    values = grad.reshape(-1, grad.shape[-1])
    if module.padding_idx is not None:  # the padding row gets no gradient (nn.Embedding's own rule)
        keep = flat_ids != module.padding_idx
        flat_ids, flat_examples, values = flat_ids[keep], flat_examples[keep], values[keep]
    return _Rows(flat_examples, flat_ids, values)


@contextlib.contextmanager
def gradients_enabled(parameters: dict[str, nn.Parameter]) -> Iterator[None]:
    """The parameters require gradients for the pass (a loaded model may have them off), as they were after."""
    before = {name: p.requires_grad for name, p in parameters.items()}
    try:
        for p in parameters.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for name, p in parameters.items():
            p.requires_grad_(before[name])
