"""A sweep's grid: the merges it tries, each a method and settings of its parameters.

A grid file is a YAML list of entries; each entry names a method and gives a list of values (or one value)
per parameter, and stands for every combination of them::

    - method: regmean
      reduce_non_diagonal_ratio: [0.1, 0.5, 0.95]
      gram_weighting: [equal, trace]
    - method: ties
      scaling: [0.3, 1.0]

Every value is checked by the method's own parameter dataclass before any merge runs.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regmean_pipeline.config import read_yaml
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.merge.methods.base import resolve_params
from regmean_pipeline.merge.methods.registry import METHODS, get_method, parameter_index

# The grid a sweep runs when it is given none: every method the candidates and options allow, over the
# values of its parameters that decide most (docs/sweep.md).
DEFAULT_GRID: list[dict[str, Any]] = [
    {"method": "regmean", "reduce_non_diagonal_ratio": [0.1, 0.5, 0.95], "gram_weighting": ["equal", "trace"]},
    {"method": "regmean++"},
    {"method": "fisher"},
    {"method": "average"},
    {"method": "task-arithmetic", "scaling": [0.3, 0.5, 1.0]},
    {"method": "ties", "scaling": [0.3, 0.5, 1.0]},
    {"method": "dare", "scaling": [0.3, 0.5, 1.0]},
]


@dataclass(frozen=True)
class Point:
    method: str
    settings: tuple[tuple[str, Any], ...]  # the parameters the grid sets, in its order; the rest default

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.settings)

    def label(self) -> str:
        return " ".join([self.method, *(f"{name}={value}" for name, value in self.settings)])

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "settings": self.params}


def points_of(entries: Any, where: str) -> list[Point]:
    """The grid's points, each checked against its method's parameters (one line per problem)."""
    if not isinstance(entries, list) or not entries:
        raise RegMeanError(f"{where}: the grid is empty; give a list of entries, each with a method and lists of "
                           "parameter values")
    index = parameter_index()
    points: list[Point] = []
    for number, entry in enumerate(entries, start=1):
        at = f"{where}: entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
            raise RegMeanError(f"{at}: must be a mapping with a 'method' (one of {', '.join(METHODS)})")
        try:
            method = get_method(entry["method"])
        except RegMeanError as exc:
            raise RegMeanError(f"{at}: {exc}") from None
        names = [name for name in entry if name != "method"]
        choices = [entry[name] if isinstance(entry[name], list) else [entry[name]] for name in names]
        if any(not values for values in choices):
            raise RegMeanError(f"{at}: an empty list of values")
        for combination in itertools.product(*choices):
            settings = dict(zip(names, combination))
            try:
                resolve_params(method, settings, index, style="key")
            except RegMeanError as exc:
                raise RegMeanError(f"{at} ({method.name}): {exc}") from None
            point = Point(method.name, tuple(settings.items()))
            if point not in points:
                points.append(point)
    return points


def read_grid(path: str | Path) -> list[Point]:
    return points_of(read_yaml(path, "--grid"), str(path))


def default_points(*, statistics: set[str], pretrained: bool, data: bool) -> list[Point]:
    """The default grid's points that these candidates allow: the statistics every cache holds, whether
    --pretrained and data (--dataset) are given."""
    allowed = []
    for entry in DEFAULT_GRID:
        needs = METHODS[entry["method"]].needs
        if (needs.statistic and needs.statistic not in statistics) or (needs.pretrained and not pretrained) \
                or (needs.data and not data):
            continue
        allowed.append(entry)
    return points_of(allowed, "the default grid")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
