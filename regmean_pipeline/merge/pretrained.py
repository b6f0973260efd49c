"""The pretrained model the candidates were fine-tuned from (``--pretrained``), addressed by the
candidates' parameter names: the starting point of every task-vector method."""

from __future__ import annotations

import torch

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.weights import WeightSource
from regmean_pipeline.merge.plan import Candidate


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

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.rows(self.name_for(name), start, stop)
