"""YAML configs with FusionBench's RegMean key names; command-line flags override them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from regmean_pipeline.errors import RegMeanError

log = logging.getLogger(__name__)

# key -> (accepted types, our option name); FusionBench's names first, then this tool's own.
KEYS: dict[str, tuple[tuple[type, ...], str | None]] = {
    "exclude_param_names_regex": ((list,), "exclude"),
    "num_regmean_examples": ((int,), "num_examples"),
    "reduce_non_diagonal_ratio": ((float, int), "reduce_non_diagonal_ratio"),
    "weight_transpose": ((bool,), None),  # detected from the module type; accepted for compatibility
    "batch_size": ((int,), "batch_size"),
    "num_workers": ((int,), "num_workers"),
    "cache_dir": ((str,), "cache_dir"),
    "include_padding": ((bool,), "include_padding"),
    "max_length": ((int,), "max_length"),
    "seed": ((int,), "seed"),
    "dtype": ((str,), "dtype"),
    "accumulate_dtype": ((str,), "accumulate_dtype"),
    "solve_dtype": ((str,), "solve_dtype"),
    "gram_weighting": ((str,), "gram_weighting"),
    "format": ((str,), "format"),
    "device": ((str,), "device"),
    "tokens": ((str,), "tokens"),
    "attn_implementation": ((str,), "attn_implementation"),
}
IGNORED = {"_target_", "name", "_recursive_"}


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Option name -> value from a YAML file (safe_load: no tags, no code)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RegMeanError(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise RegMeanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_config(data or {}, str(path))


def parse_config(data: Any, where: str) -> dict[str, Any]:
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
    for key, value in data.items():
        if key in IGNORED:
            continue
        if key not in KEYS:
            raise RegMeanError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(KEYS))})")
        types, option = KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RegMeanError(f"{where}: key {key!r} must be {' or '.join(t.__name__ for t in types)}, "
                               f"got {value!r}")
        if key == "exclude_param_names_regex" and not all(isinstance(v, str) for v in value):
            raise RegMeanError(f"{where}: key {key!r} must be a list of strings")
        if option is not None:
            options[option] = value
    return options


def pick(flag: Any, config: dict[str, Any], option: str, default: Any) -> Any:
    """A flag given on the command line wins, then the config file, then the default."""
    if flag is not None:
        return flag
    return config.get(option, default)
