"""What `regmean merge` is given: the candidates, the method and its parameters, and the run's resources;
checked against what the chosen method needs before anything is opened."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.merge.methods.base import MergeMethod, resolve_params
from regmean_pipeline.merge.methods.registry import METHODS, get_method, parameter_index


@dataclass
class MergeOptions:
    out: str
    method: str = "regmean"
    params: dict[str, Any] = field(default_factory=dict)  # the method's parameters as given (flags, config)
    cache_dir: str | None = None
    caches: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    coefficients: dict[str, float] = field(default_factory=dict)
    base: str | None = None
    pretrained: str | None = None  # the model the candidates were fine-tuned from (task-vector methods)
    exclude: list[str] = field(default_factory=list)
    device: str = "auto"
    max_shard_size: str = "5GB"
    batch_memory: str = "1GiB"
    allow_pickle: bool = False
    overwrite: bool = False
    progress: bool = True
    per_candidate: bool = False
    # Given by a config file shared with other stages: values of other methods' parameters are skipped there.
    config_params: dict[str, Any] = field(default_factory=dict)
    chosen_by: str | None = None  # how this merge was chosen (`regmean sweep`), for its model card


def resolve_method(options: MergeOptions) -> tuple[MergeMethod, Any]:
    """The method and its parameters (flags over the config's), after every check that needs no file:
    parameters of another method refused by name, what the method needs given, what it does not refused."""
    method = get_method(options.method)
    index = parameter_index()
    resolve_params(method, options.config_params, index, style="key", ignore_foreign=True)  # the file's values
    own = {name: value for name, value in options.config_params.items() if name in method.fields()}
    params = resolve_params(method, {**own, **options.params}, index)
    needs = method.needs
    if needs.pretrained and not options.pretrained:
        raise RegMeanError(f"--method {method.name}: needs --pretrained PATH, the model the candidates were "
                           "fine-tuned from")
    if options.pretrained and not needs.pretrained:
        raise RegMeanError(f"--pretrained: only --method {', '.join(_needing('pretrained'))} use it "
                           f"(not {method.name})")
    if needs.data and (options.cache_dir or options.caches):
        raise RegMeanError(f"--cache-dir/--cache: --method {method.name} measures while it merges and reads no "
                           "caches; give each candidate as --model NAME=PATH --dataset NAME=PATH")
    return method, params


def _needing(need: str) -> list[str]:
    return [name for name, method in METHODS.items() if getattr(method.needs, need)]
