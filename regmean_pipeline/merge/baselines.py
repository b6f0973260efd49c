"""The dataless baselines RegMean is compared with, on the merge's own plan, streaming and writer.

- average: every merged parameter is the (coefficient-weighted) mean of the candidates', anchored at
  the first (averaging.anchored_mean, the same function RegMean uses for non-linear parameters).
- task arithmetic (Ilharco et al., 2023): theta = theta_pre + lambda * sum_i c_i (theta_i - theta_pre),
  with FusionBench's default lambda = 0.3.

Neither needs Grams, so neither needs `regmean stats`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.weights import WeightSource
from regmean_pipeline.merge.plan import Candidate

DEFAULT_SCALING = 0.3  # FusionBench's task-arithmetic default


class PretrainedWeights:
    """The pretrained model of task arithmetic, addressed by the candidates' parameter names.

    A bare encoder checkpoint names its tensors without the task model's base-model prefix
    (``encoder.layer.0...`` for ``bert.encoder.layer.0...``), as transformers itself resolves when it
    loads a base model into a task model; both spellings are accepted.
    """

    def __init__(self, source: WeightSource, prefix: str = ""):
        self.source, self.prefix = source, f"{prefix}." if prefix else ""
        self._names = set(source.names())

    @classmethod
    def for_candidates(cls, source: WeightSource, names: list[str]) -> PretrainedWeights:
        """The prefix read off the names (``bert`` when ``bert.x`` is a candidate's and ``x`` the
        checkpoint's) rather than from the model class, whose import costs seconds; ``check`` then
        holds every merged name to it."""
        pretrained = cls(source)
        for name in names:
            head, _, rest = name.partition(".")
            if name not in pretrained._names and rest in pretrained._names:
                pretrained.prefix = f"{head}."
                break
        return pretrained

    def name_for(self, name: str) -> str | None:
        if name in self._names:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix):] in self._names:
            return name[len(self.prefix):]
        return None

    def check(self, names: list[str], first: Candidate) -> None:
        """Fail before any work when a merged parameter has no counterpart of the same shape."""
        for name in names:
            own = self.name_for(name)
            if own is None:
                raise RegMeanError(f"--pretrained {self.source.reference}: has no parameter {name} (nor "
                                   f"{name.removeprefix(self.prefix)}); exclude it or give the model the "
                                   "candidates were fine-tuned from")
            if self.source.shape(own) != first.weights.shape(name):
                raise RegMeanError(f"--pretrained {self.source.reference}: parameter {own} has shape "
                                   f"{list(self.source.shape(own))}, but {list(first.weights.shape(name))} in "
                                   f"{first.name}")

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self.name_for(name))


def task_arithmetic(candidates: list[Candidate], pretrained: PretrainedWeights,
                    scaling: float) -> Callable[[str], torch.Tensor]:
    """A per-parameter combiner for the executor: theta_pre + scaling * sum_i c_i (theta_i - theta_pre)."""

    def combine(name: str) -> torch.Tensor:
        first = candidates[0].weights.get(name)
        if not first.is_floating_point():
            return first  # integer buffers (position ids), as averaging does
        accumulate = torch.float64 if first.dtype == torch.float64 else torch.float32
        base = pretrained.get(name).to(accumulate)
        total = base.clone()
        for candidate in candidates:
            total.add_(candidate.weights.get(name).to(accumulate) - base, alpha=scaling * candidate.coefficient)
        return total.to(first.dtype)

    return combine
