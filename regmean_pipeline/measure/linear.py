"""Which modules RegMean merges, and how their weights are oriented."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style layers store the weight as (in, out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class LinearLayer:
    """A linear module: the RegMean system is solved for its weight, given its input Gram."""

    name: str
    weight: str
    in_features: int
    out_features: int
    transposed: bool  # weight stored as (in, out), as transformers' Conv1D does

    @property
    def weight_shape(self) -> tuple[int, int]:
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


def find_linear_layers(model: nn.Module) -> list[LinearLayer]:
    """Every nn.Linear and Conv1D of the model, in module order; orientation from the module type."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            layers.append(
                LinearLayer(name, f"{name}.weight", module.in_features, module.out_features, False)
            )
        elif Conv1D and isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            layers.append(LinearLayer(name, f"{name}.weight", in_features, out_features, True))
    return layers


def weight_in_out(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as W^T, shape (in, out): the right-hand side orientation of the RegMean system."""
    return weight if transposed else weight.transpose(-1, -2)


def weight_from_in_out(solution: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Back from W^T (in, out) to the module's stored orientation."""
    return (solution if transposed else solution.transpose(-1, -2)).contiguous()
