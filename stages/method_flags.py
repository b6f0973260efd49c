"""The command-line flags of every merge method's parameters, made from the registry: one flag per
parameter name (methods that share a name share the flag), with its help, choices and each method's
default. A command decorated with ``with_method_flags`` receives the values given as ``method_params``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.merge.methods.base import flag_of, value_kind
from regmean_pipeline.merge.methods.registry import METHODS, parameter_index


def _help(name: str, owners: list[str], field: dataclasses.Field) -> str:
    """The field's help, the methods that take it, and each one's default where they differ."""
    defaults: dict[str, list[str]] = {}
    helps: dict[str, list[str]] = {}
    for owner in owners:
        own = METHODS[owner].fields()[name]
        default = own.default if own.default is not dataclasses.MISSING else own.default_factory()
        defaults.setdefault(_shown(default), []).append(owner)
        helps.setdefault(own.metadata.get("help", ""), []).append(owner)
    text = " ".join(helps) if len(helps) == 1 else " ".join(f"{', '.join(users)}: {text}"
                                                             for text, users in helps.items())
    text += f" (--method {', '.join(owners)})"
    choices = field.metadata.get("choices")
    if choices:
        text += f" One of: {', '.join(choices)}."
    if len(defaults) == 1:
        shown = next(iter(defaults))
        return text + (f" \\[default: {shown}]" if shown else "")
    return text + " \\[default: " + "; ".join(f"{shown} ({', '.join(users)})" for shown, users in defaults.items()) + "]"


def _shown(default: Any) -> str:
    if default is None or default in ({}, []):
        return ""
    return str(default).lower() if isinstance(default, bool) else str(default)


def _option(name: str, owners: list[str], field: dataclasses.Field) -> inspect.Parameter:
    kind = value_kind(field)
    python_type = {dict: list[str], list: list[str]}.get(kind, kind)
    flags = flag_of(field)
    option = typer.Option(flags, help=_help(name, owners, field), rich_help_panel=field.metadata.get("panel"),
                          show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[python_type], option])


def _pairs(name: str, values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise RegMeanError(f"{flag} {value!r}: expected NAME=VALUE")
        pairs[key] = item
    return pairs


def with_method_flags(command: Callable) -> Callable:
    """Add one option per method parameter before the command's ``config`` option; the values given
    reach the command as ``method_params`` (name -> value; NAME=VALUE flags as a mapping)."""
    index = parameter_index()
    signature = inspect.signature(command, eval_str=True)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
           if p.name != "method_params"]
    clash = sorted(name for name in index if name in signature.parameters)
    if clash:
        raise TypeError(f"{command.__name__}: options named like method parameters: {clash}")
    added = [_option(name, info.owners, info.field) for name, info in index.items()]
    at = next((i for i, p in enumerate(own) if p.name == "config"), len(own))

    @functools.wraps(command)
    def wrapper(**given: Any):
        params = {}
        for name, info in index.items():
            value = given.pop(name, None)
            if value is None or (value_kind(info.field) in (list, dict) and not value):
                continue
            params[name] = _pairs(name, value, flag_of(info.field)) if value_kind(info.field) is dict else value
        return command(**given, method_params=params)

    parameters = own[:at] + added + own[at:]
    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    del wrapper.__wrapped__  # typer reads the signature above, not the command's own
    return wrapper


def method_help() -> str:
    """--method's help: every registered method with its one line."""
    lines = "; ".join(f"{name}: {method.help}" for name, method in METHODS.items())
    return f"The merge method. {lines} \\[default: regmean]."
