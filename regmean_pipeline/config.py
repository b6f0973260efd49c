"""YAML configs with FusionBench's RegMean key names (and this tool's own for what FusionBench cannot say);
command-line flags override them. ``config_of`` turns options back into such a config (a model card's).

The keys here are the stages' own; each merge method's parameters add theirs (merge/methods/registry.py
``config_keys``), which callers pass in as ``keys``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from regmean_pipeline.errors import RegMeanError

log = logging.getLogger(__name__)

# key -> (accepted types, our option name); FusionBench's names first, then this tool's own.
KeyTable = dict[str, tuple[tuple[type, ...], str | None]]
KEYS: KeyTable = {
    "exclude_param_names_regex": ((list,), "exclude"),
    "num_regmean_examples": ((int,), "num_examples"),
    "weight_transpose": ((bool,), None),  # detected from the module type; accepted for compatibility
    "batch_size": ((int,), "batch_size"),
    "num_workers": ((int,), "num_workers"),
    "cache_dir": ((str,), "cache_dir"),
    "include_padding": ((bool,), "include_padding"),
    "max_length": ((int,), "max_length"),
    "seed": ((int,), "seed"),
    "dtype": ((str,), "dtype"),
    "accumulate_dtype": ((str,), "accumulate_dtype"),
    "format": ((str,), "format"),
    "device": ((str,), "device"),
    "tokens": ((str,), "tokens"),
    "attn_implementation": ((str,), "attn_implementation"),
    # `regmean merge` only: which candidates, and how to combine them
    "method": ((str,), "method"),
    "caches": ((list,), "caches"),
    "models": ((dict,), "models"),
    "coefficients": ((dict,), "coefficients"),
    "base": ((str,), "base"),
    "pretrained": ((str,), "pretrained"),
    "per_candidate": ((bool,), "per_candidate"),
    "max_shard_size": ((str, int), "max_shard_size"),
    "batch_memory": ((str, int), "batch_memory"),
    # `regmean merge --method regmean++` only: each candidate's examples (stats' data options)
    "datasets": ((dict,), "datasets"),
    "split": ((str,), "split"),
    "text_column": ((str,), "text_column"),
    "text_pair_column": ((str,), "text_pair_column"),
    "image_column": ((str,), "image_column"),
    "messages_column": ((str,), "messages_column"),
    "prompt_columns": ((list,), "prompt_columns"),
    "response_column": ((str,), "response_column"),
    "system_column": ((str,), "system_column"),
    "base_model": ((str,), "base_model"),
}
# the items of list keys, and the values of mapping keys (whose keys are candidate names)
ITEM_TYPES: dict[str, tuple[type, ...]] = {
    "exclude_param_names_regex": (str,), "caches": (str,), "models": (str,), "coefficients": (float, int),
    "datasets": (str,), "prompt_columns": (str,),
}
IGNORED = {"_target_", "name", "_recursive_"}


def load_config(path: str | Path | None, keys: KeyTable | None = None) -> dict[str, Any]:
    """Option name -> value from a YAML file (safe_load: no tags, no code); ``keys``: the accepted keys
    (default: the stages' own, ``KEYS``)."""
    if path is None:
        return {}
    return parse_config(read_yaml(path, "--config") or {}, str(path), keys)


def read_yaml(path: str | Path, flag: str) -> Any:
    """A YAML file's data (safe_load: no tags, no code); a missing or broken file is one line naming it."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RegMeanError(f"{flag} {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise RegMeanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def parse_config(data: Any, where: str, keys: KeyTable | None = None) -> dict[str, Any]:
    keys = KEYS if keys is None else keys
    if not isinstance(data, dict):
        raise RegMeanError(f"{where}: must be a mapping of keys to values")
    data = dict(data)
    loader = data.pop("dataloader_kwargs", None) or {}
    if not isinstance(loader, dict):
        raise RegMeanError(f"{where}: key 'dataloader_kwargs' must be a mapping")
    for key, value in loader.items():
        if key not in ("batch_size", "num_workers"):
            log.info("%s: dataloader_kwargs.%s is not used", where, key)
            continue
        data.setdefault(key, value)
    options: dict[str, Any] = {}
    target = data.get("_target_")
    if isinstance(target, str) and target.endswith("PlusPlus"):  # FusionBench's RegMeanAlgorithm...PlusPlus
        options["method"] = "regmean++"
    for key, value in data.items():
        if key in IGNORED:
            continue
        if key not in keys:
            raise RegMeanError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(keys))})")
        types, option = keys[key]
        if not _is(value, types):
            raise RegMeanError(f"{where}: key {key!r} must be {_names(types)}, got {value!r}")
        if key in ITEM_TYPES:
            _check_items(key, value, ITEM_TYPES[key], where)
        if option is not None:
            options[option] = value
    return options


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, but a YAML true/false is no number."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join({"dict": "a mapping", "list": "a list"}.get(t.__name__, t.__name__) for t in types)


def _check_items(key: str, value: list | dict, types: tuple[type, ...], where: str) -> None:
    if isinstance(value, list):
        bad = next((item for item in value if not _is(item, types)), None)
        if bad is not None:
            raise RegMeanError(f"{where}: key {key!r} must be a list of {_names(types)}, got the item {bad!r}")
        return
    for name, item in value.items():
        if not isinstance(name, str):
            raise RegMeanError(f"{where}: key {key!r}: candidate names must be strings, got {name!r} (quote it)")
        if not _is(item, types):
            raise RegMeanError(f"{where}: key {key!r} must map candidate names to {_names(types)}, "
                               f"got {name}: {item!r}")


def option_keys(keys: KeyTable | None = None) -> dict[str, str]:
    """Option name -> its config key."""
    return {option: key for key, (_, option) in (KEYS if keys is None else keys).items() if option is not None}


def config_of(options: dict[str, Any], keys: KeyTable | None = None) -> dict[str, Any]:
    """The config that ``parse_config`` reads back as these options: key names for option names, None
    and empty collections left out. Every option must have a key."""
    names = option_keys(keys)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"options without a config key: {unknown}")
    return {names[option]: value for option, value in options.items()
            if value is not None and value not in ([], {})}


def pick(flag: Any, config: dict[str, Any], option: str, default: Any) -> Any:
    """A flag given on the command line wins, then the config file, then the default."""
    if flag is not None:
        return flag
    return config.get(option, default)
