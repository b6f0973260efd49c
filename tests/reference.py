"""An independent float64 RegMean, written from the paper's formula for the tests to compare against.

It shares no code with regmean_pipeline: inputs are captured with plain forward hooks, one example at
a time (so no padding exists at all), and every system is solved with numpy in float64.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def capture_grams(model: nn.Module, examples: list[dict[str, torch.Tensor]], *, per_example: bool = True,
                  counted: list[list[bool]] | None = None) -> dict:
    """Float64 X^T X and row counts of every linear layer's input over the examples (unpadded).

    ``counted[i]``, when given, keeps only those positions of example i (a decoder-only model, one
    sequence per example): the response tokens of chat data. An encoder-decoder's examples carry
    ``labels``, so its decoder layers see the targets and its cross-attention the encoder's output.
    """
    model64 = copy.deepcopy(model).double().eval()
    grams: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    handles = []
    keep: list[np.ndarray | None] = [None]

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
            if keep[0] is not None:
                x = x[keep[0]]
            grams[name] = grams.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    for name, module in linear_modules(model64).items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        for index, example in enumerate(examples):
            keep[0] = np.asarray(counted[index], dtype=bool) if counted is not None else None
            inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in example.items()}
            model64(**inputs)
    for handle in handles:
        handle.remove()
    return {"grams": grams, "rows": rows}


def regmean_reference(models: list[nn.Module], captured: list[dict], ratio: float,
                      exclude: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Merged state dict in float64: RegMean for linear weights, mean for everything else."""
    import re

    states = [{k: v.detach().double().numpy() for k, v in m.state_dict().items()} for m in models]
    modules = linear_modules(models[0])
    return {name: _solve_or_mean(name, states, captured, modules, ratio,
                                 lambda n: any(re.match(p, n) for p in exclude)) for name in states[0]}


def relative_error(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> float:
    actual = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else actual
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def _solve_or_mean(name, states, captured, modules, ratio, excluded):
    """One parameter of a unit: RegMean for a linear weight whose input was captured, else the mean."""
    if excluded(name):
        return states[0][name]
    module_name = name[: -len(".weight")] if name.endswith(".weight") else None
    if module_name in modules and all(module_name in cap["grams"] for cap in captured):
        transposed = isinstance(modules[module_name], Conv1D)
        total_gram, total_rhs = 0, 0
        for state, cap in zip(states, captured):
            g = cap["grams"][module_name] / cap["rows"][module_name]
            g = ratio * g + (1 - ratio) * np.diag(np.diag(g))
            w_t = state[name] if transposed else state[name].T
            total_gram = total_gram + g
            total_rhs = total_rhs + g @ w_t
        solution = np.linalg.solve(total_gram, total_rhs)
        return solution if transposed else solution.T
    return np.mean([s[name] for s in states], axis=0)


def regmean_plusplus_reference(models: list[nn.Module], examples: list[list[dict]], ratio: float, *, stack: str,
                               prefix: tuple[str, ...], exclude: tuple[str, ...] = (),
                               storage: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """Float64 RegMean++ (Nguyen et al.), from its definition: the prefix (parameters named by ``prefix``)
    is averaged; then for each block of ``stack``, and last for the tail, each candidate's Grams of that
    unit are captured in a copy of the candidate whose prefix and earlier blocks hold the merged weights
    so far (as they are saved: rounded to ``storage``), one example at a time; the unit is then solved
    like ``regmean_reference`` solves a layer."""
    import re

    def excluded(name):
        return any(re.match(p, name) for p in exclude)

    states = [{k: v.detach().double().numpy() for k, v in m.state_dict().items()} for m in models]
    blocks = len(models[0].get_submodule(stack))
    modules = linear_modules(models[0])

    def unit_of(name: str) -> int:
        if name.startswith(stack + "."):
            return int(name[len(stack) + 1:].split(".")[0])
        return -1 if name.startswith(prefix) else blocks

    merged: dict[str, np.ndarray] = {}
    for unit in range(-1, blocks + 1):
        names = [name for name in states[0] if unit_of(name) == unit]
        captured = []
        if unit >= 0:
            for model, cand_examples in zip(models, examples):
                hybrid = copy.deepcopy(model).double()
                so_far = {k: torch.from_numpy(v).to(storage).double() for k, v in merged.items()}
                hybrid.load_state_dict(so_far, strict=False)
                captured.append(capture_grams(hybrid, cand_examples))
        for name in names:
            merged[name] = _solve_or_mean(name, states, captured, modules, ratio, excluded)
    return merged
