"""Every merge method by name. A new method is one module in this folder and one line below."""

from __future__ import annotations

import dataclasses

from regmean_pipeline.config import KEYS, KeyTable
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.merge.methods import average, dare, fisher, regmean, regmean_plusplus, task_arithmetic, ties
from regmean_pipeline.merge.methods.base import MergeMethod, ParameterInfo, value_kind

METHODS: dict[str, MergeMethod] = {method.name: method for method in (
    regmean.METHOD,
    regmean_plusplus.METHOD,
    fisher.METHOD,
    average.METHOD,
    task_arithmetic.METHOD,
    ties.METHOD,
    dare.DARE,
    dare.DARE_TIES,
)}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise RegMeanError(f"--method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def parameter_index() -> dict[str, ParameterInfo]:
    """Every method parameter by name: the methods that have it (registry order), its first field, and
    whether all of them read data while merging."""
    found: dict[str, list[tuple[MergeMethod, dataclasses.Field]]] = {}
    for method in METHODS.values():
        for name, field in method.fields().items():
            found.setdefault(name, []).append((method, field))
    return {name: ParameterInfo([m.name for m, _ in uses], uses[0][1], all(m.needs.data for m, _ in uses))
            for name, uses in found.items()}


def config_keys() -> KeyTable:
    """The config keys of the stages and of every method's parameters (a parameter's key is its name)."""
    types = {float: (float, int), int: (int,), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}
    keys = dict(KEYS)
    options = {option for _, option in KEYS.values()}  # a stage option (FusionBench's key) keeps its key
    for name, info in parameter_index().items():
        if name not in options:
            keys.setdefault(name, (types[value_kind(info.field)], name))
    return keys
