"""mergekit YAML configs as `regmean merge --config`: translated into the options this tool's own configs give.

A mapping with a ``merge_method`` key is a mergekit config, and it means mergekit's semantics, so that one
file gives the same tensors in both tools (DARE's random masks aside): linear, task_arithmetic, ties,
dare_linear and dare_ties with mergekit's defaults (per method: ``normalize``, ``rescale``; ``lambda`` 1,
``density`` 1, ``weight`` required), its per-tensor TIES trim, its weight normalisation, and its base model
(the task vectors' origin, and where the config and tokenizer come from). regmean, regmean++ and fisher
take this tool's keys under ``parameters``. Whatever cannot be honoured exactly (slices, modules, gradient
lists, filtered values, tokenizer unions, chat templates, dtypes other than the models' own, other
methods) is refused in one line naming the key, before anything is written.

The values mergekit resolves per tensor (gradients, filters) are refused, so each parameter here has one
value per model, as ``parameter_resolver.resolve_parameters`` would give for every tensor: a model's own
``parameters`` over the top-level ones over the method's default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regmean_pipeline.config import KeyTable, parse_config, read_yaml
from regmean_pipeline.errors import RegMeanError

REQUIRED = object()  # a mergekit parameter without a default (a model without it is refused)


@dataclass(frozen=True)
class MergekitMethod:
    """One of mergekit's merge methods as this tool runs it: ``ours`` (the registry's name), its
    parameters for the whole merge and per model with mergekit's defaults, and whether base_model is
    one of the averaged inputs (linear) rather than the task vectors' origin."""

    ours: str
    shared: dict[str, Any]
    per_model: dict[str, Any]
    base_is_input: bool = False


def _task_arithmetic_family(ours: str, *, normalize: bool, rescale: bool) -> MergekitMethod:
    """mergekit's GeneralizedTaskArithmeticMerge: its parameters and per-method defaults (merge_methods/registry.py)."""
    return MergekitMethod(ours, {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
                          {"weight": REQUIRED, "density": 1.0})


METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod("average", {"normalize": True}, {"weight": REQUIRED}, base_is_input=True),
    "task_arithmetic": _task_arithmetic_family("task-arithmetic", normalize=False, rescale=False),
    "ties": _task_arithmetic_family("ties", normalize=True, rescale=False),
    "dare_linear": _task_arithmetic_family("dare", normalize=False, rescale=True),
    "dare_ties": _task_arithmetic_family("dare-ties", normalize=False, rescale=True),
}
OWN_METHODS = ("regmean", "regmean++", "fisher")  # this tool's keys under `parameters`
TRUE_WORDS = ("true", "t", "yes", "y", "on", "1")  # pydantic's lax booleans, as mergekit reads them
FALSE_WORDS = ("false", "f", "no", "n", "off", "0")
DTYPES = ("bfloat16", "float16", "float32", "float64")
HONOURED_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "tokenizer")
REFUSED_KEYS = {
    "slices": "layer slices are not honoured; merge whole models with `models:`",
    "modules": "per-module definitions are not honoured; merge whole models with `models:`",
    "chat_template": "not honoured: the output keeps the tokenizer files of the model its tokenizer comes from",
}
# Options the mergekit keys themselves give; under a regmean config's `parameters` they would contradict them.
GIVEN_BY_MERGEKIT_KEYS = {"method": "merge_method", "models": "models", "coefficients": "weight",
                          "base": "base_model", "pretrained": "base_model"}


def load_merge_config(path: str | Path | None, keys: KeyTable) -> dict[str, Any]:
    """`regmean merge --config FILE`: the options of this tool's own config, or of a mergekit config
    translated here."""
    if path is None:
        return {}
    data = read_yaml(path, "--config")
    if is_mergekit_config(data):
        return translate(data, str(path), keys)
    return parse_config(data or {}, str(path), keys)


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, Mapping) and "merge_method" in data


@dataclass
class ModelEntry:
    """One of the config's `models:` (or its base_model): the reference as mergekit compares it (PATH or
    PATH+LORA), and its own parameters."""

    reference: str
    parameters: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def translate(data: Mapping[str, Any], where: str, keys: KeyTable | None = None) -> dict[str, Any]:
    """The options of a mergekit config (option name -> value, as ``parse_config`` gives them); ``keys``:
    the accepted keys of this tool's own configs (default: every stage's and method's), for regmean,
    regmean++ and fisher's `parameters`."""
    _check_top_level(data, where)
    method = data["merge_method"]
    if method not in METHODS and method not in OWN_METHODS:
        raise RegMeanError(f"{where}: key 'merge_method': {method!r} is not honoured (honoured: "
                           f"{', '.join([*METHODS, *OWN_METHODS])})")
    base = _reference(data["base_model"], f"{where}: key 'base_model'") if data.get("base_model") is not None \
        else None
    if base is not None and "+" in base:
        raise RegMeanError(f"{where}: key 'base_model': a LoRA adapter as the base (PATH+LORA) is not honoured; "
                           "give a full checkpoint (the adapter merged into its base)")
    entries = _models(data.get("models"), where)
    parameters = _mapping(data.get("parameters"), f"{where}: key 'parameters'")
    if method in METHODS:
        options = _mergekit_options(METHODS[method], method, entries, base, parameters, where)
    else:
        if keys is None:
            from regmean_pipeline.merge.methods.registry import config_keys

            keys = config_keys()
        options = _own_options(method, entries, base, parameters, where, keys)
    _check_tokenizer(data, base, where)
    _check_dtypes(data, [*options["models"].values(), *([base] if base else [])], where)
    return options


# --- the file's shape ------------------------------------------------------------------------------------

def _check_top_level(data: Mapping[str, Any], where: str) -> None:
    for key, value in data.items():
        if key in REFUSED_KEYS and value is not None:
            raise RegMeanError(f"{where}: key {key!r}: {REFUSED_KEYS[key]}")
        if key not in REFUSED_KEYS and key not in HONOURED_KEYS:
            raise RegMeanError(f"{where}: key {key!r}: not a mergekit key this tool reads (honoured: "
                               f"{', '.join(HONOURED_KEYS)})")
    if not isinstance(data["merge_method"], str):
        raise RegMeanError(f"{where}: key 'merge_method' must be a method name, got {data['merge_method']!r}")


def _mapping(value: Any, label: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise RegMeanError(f"{label} must be a mapping of names to values, got {value!r}")
    return dict(value)


def _reference(value: Any, label: str) -> str:
    """A mergekit ModelReference (``PATH``, ``PATH+LORA``, or its mapping form) as the string it compares by."""
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"model", "lora"})
        if extra:
            raise RegMeanError(f"{label}: key {extra[0]!r} is not honoured")
        model, lora = (_path(value.get(part), f"{label}: {part}") if value.get(part) is not None else None
                       for part in ("model", "lora"))
        if model is None:
            raise RegMeanError(f"{label}: names no model")
        return f"{model}+{lora}" if lora else model
    if not isinstance(value, str) or not value:
        raise RegMeanError(f"{label} must be a model path or hub id, got {value!r}")
    if value.count("+") > 1:
        raise RegMeanError(f"{label}: {value!r} has more than one '+' (PATH+LORA takes one)")
    for part in value.split("+"):
        _path(part, label)
    return value


def _path(value: Any, label: str) -> str:
    if isinstance(value, Mapping):
        if value.get("revision") is not None:
            raise RegMeanError(f"{label}: key 'revision' is not honoured; download that revision and give its folder")
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise RegMeanError(f"{label} must be a model path or hub id, got {value!r}")
    if "@" in value:
        raise RegMeanError(f"{label}: {value!r}: a revision (@REV) is not honoured; download that revision and give "
                           "its folder")
    return value


def _models(value: Any, where: str) -> list[ModelEntry]:
    if not isinstance(value, list) or not value:
        raise RegMeanError(f"{where}: key 'models' must list the models to merge (- model: PATH)")
    entries = []
    for index, item in enumerate(value):
        label = f"{where}: models[{index}]"
        if not isinstance(item, Mapping) or "model" not in item:
            raise RegMeanError(f"{label} must be a mapping with key 'model', got {item!r}")
        extra = sorted(set(item) - {"model", "parameters"})
        if extra:
            raise RegMeanError(f"{label}: key {extra[0]!r} is not honoured")
        reference = _reference(item["model"], f"{label}: key 'model'")
        if any(entry.reference == reference for entry in entries):
            raise RegMeanError(f"{label}: key 'model': {reference} is listed twice")
        entries.append(ModelEntry(reference, _mapping(item.get("parameters"), f"{label}: key 'parameters'"),
                                  f"{label} ({reference})"))
    return entries


def candidate_names(references: list[str]) -> list[str]:
    """Each model's candidate name: its folder's name (the adapter's for PATH+LORA, the repository's for a
    hub id), made unique with -2, -3, ... in the order given."""
    names: list[str] = []
    for reference in references:
        target = reference.split("+")[-1]
        stem = Path(target.rstrip("/")).name
        if stem in ("", ".", ".."):
            stem = Path(target).expanduser().resolve().name or "model"
        name, number = stem, 2
        while name in names:
            name, number = f"{stem}-{number}", number + 1
        names.append(name)
    return names


# --- parameter values ------------------------------------------------------------------------------------

def _scalar(value: Any, label: str) -> Any:
    """One value for every tensor: mergekit's gradients (lists) and filtered values are refused."""
    if isinstance(value, Mapping) or (isinstance(value, list) and value and all(isinstance(v, Mapping)
                                                                                 for v in value)):
        raise RegMeanError(f"{label}: a conditional value (value/filter) is not honoured; give one value for every "
                           "tensor")
    if isinstance(value, list):
        raise RegMeanError(f"{label}: a gradient (a list of values over the layers) is not honoured; give one value")
    return value


def _number(value: Any, label: str) -> float:
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise RegMeanError(f"{label} must be a number, got {value!r}")


def _flag(value: Any, label: str) -> bool:
    """A boolean as mergekit's (pydantic's) lax parsing reads one."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (int, str)) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise RegMeanError(f"{label} must be true or false, got {value!r}")


def _convert(name: str, value: Any, label: str) -> Any:
    value = _scalar(value, label)
    return _flag(value, label) if name in ("normalize", "rescale", "int8_mask") else _number(value, label)


# --- mergekit's methods ----------------------------------------------------------------------------------

def _mergekit_options(spec: MergekitMethod, method: str, entries: list[ModelEntry], base: str | None,
                      parameters: dict[str, Any], where: str) -> dict[str, Any]:
    known = {**spec.shared, **spec.per_model}
    for key in parameters:
        if key not in known:
            raise RegMeanError(f"{where}: parameters: key {key!r}: not a parameter of mergekit's {method} "
                               f"({', '.join(known)})")
    shared = {name: _convert(name, parameters[name], f"{where}: parameters: key {name!r}") if name in parameters
              else default for name, default in spec.shared.items()}
    if base is None and not spec.base_is_input:
        raise RegMeanError(f"{where}: key 'base_model': mergekit's {method} needs the model the others were "
                           "fine-tuned from")
    if spec.base_is_input and base is not None and all(entry.reference != base for entry in entries):
        entries = [*entries, ModelEntry(base, {}, f"{where}: key 'base_model' ({base})")]  # as mergekit adds it
    inputs = entries if spec.base_is_input else [entry for entry in entries if entry.reference != base]
    if not inputs:
        raise RegMeanError(f"{where}: key 'models': no model to merge besides base_model")
    for entry in entries:
        _check_model_keys(entry, spec, method)
    names = candidate_names([entry.reference for entry in inputs])
    values = {name: _per_model(entry, spec, parameters, where) for name, entry in zip(names, inputs)}
    options: dict[str, Any] = {"method": spec.ours, "models": {n: e.reference for n, e in zip(names, inputs)},
                               "coefficients": {name: value["weight"] for name, value in values.items()}}
    if base is not None:
        options["base"] = base  # mergekit's config, tokenizer and other files come from base_model
    if spec.ours == "average":
        if not shared["normalize"]:
            raise RegMeanError(f"{where}: parameters: key 'normalize': false (mergekit's plain weighted sum) has no "
                               "counterpart here; this tool's average divides by the weights' sum")
        return options
    options.update(pretrained=base, scaling=shared["lambda"])
    return _task_vector_options(options, spec.ours, shared, values, parameters, where)


def _check_model_keys(entry: ModelEntry, spec: MergekitMethod, method: str) -> None:
    for key in entry.parameters:
        if key in spec.shared:
            raise RegMeanError(f"{entry.where}: key {key!r}: mergekit reads it for the whole merge only; give it "
                               "under the top-level parameters")
        if key not in spec.per_model:
            raise RegMeanError(f"{entry.where}: key {key!r}: not a parameter of mergekit's {method} "
                               f"({', '.join(spec.per_model)} per model)")


def _per_model(entry: ModelEntry, spec: MergekitMethod, parameters: dict[str, Any], where: str) -> dict[str, float]:
    """A model's own value over the top-level one over mergekit's default; positive weights, densities in
    (0, 1] (mergekit's densities above 1 keep everything, as 1 does)."""
    values = {}
    for name, default in spec.per_model.items():
        if name in entry.parameters and entry.parameters[name] is not None:
            label, value = f"{entry.where}: key {name!r}", entry.parameters[name]
        elif name in parameters and parameters[name] is not None:
            label, value = f"{where}: parameters: key {name!r}", parameters[name]
        elif default is REQUIRED:
            raise RegMeanError(f"{entry.where}: key {name!r}: missing (mergekit requires it for every model; give it "
                               "per model or under the top-level parameters)")
        else:
            label, value = "", default
        values[name] = _convert(name, value, label)
        if values[name] <= 0:
            what = "weights" if name == "weight" else "densities"
            raise RegMeanError(f"{label}: {values[name]:g}: this tool takes positive {what} only")
    if "density" in values:
        values["density"] = min(values["density"], 1.0)
    return values


def _task_vector_options(options: dict[str, Any], ours: str, shared: dict[str, Any], values: dict[str, dict],
                         parameters: dict[str, Any], where: str) -> dict[str, Any]:
    """task-arithmetic, ties, dare, dare-ties with mergekit's semantics: ``normalize`` divides the merged task
    vector by the weights' sum (by the agreeing weights' sum after a sign election: merge_func mean), the
    TIES trim is per tensor, DARE's ``rescale`` restores each tensor's L1 norm."""
    normalize, coefficients = shared["normalize"], options["coefficients"]
    if ours in ("task-arithmetic", "dare") and normalize and abs(sum(coefficients.values())) >= 1e-8:
        total = sum(coefficients.values())
        options["coefficients"] = {name: weight / total for name, weight in coefficients.items()}
    if ours == "task-arithmetic":
        return options  # no sparsification: mergekit ignores density and rescale here
    densities = {name: value["density"] for name, value in values.items()}
    default = _top_level_density(parameters, where)
    if parameters.get("density") is None and len(set(densities.values())) == 1:
        default = next(iter(densities.values()))  # one density for all: --density, not per candidate
    options.update(density=default, candidate_densities={name: d for name, d in densities.items() if d != default})
    if ours == "ties":
        if shared["rescale"] and any(d < 1.0 for d in densities.values()):
            raise RegMeanError(f"{where}: parameters: key 'rescale': true (mergekit's L1 rescale after the magnitude "
                               "trim) is not honoured for ties; drop it")
        return {**options, "trim": "tensor", "merge_func": "mean" if normalize else "sum"}
    options["rescale"] = "l1" if shared["rescale"] else "none"
    if ours == "dare-ties":  # mergekit's dare_ties: the drop, then the sign election, no magnitude trim
        options.update(trim_density=1.0, trim="tensor", merge_func="mean" if normalize else "sum")
    return options


def _top_level_density(parameters: dict[str, Any], where: str) -> float:
    """The top-level density (mergekit's default 1 without one), as the per-model ones are checked."""
    if parameters.get("density") is None:
        return 1.0
    label = f"{where}: parameters: key 'density'"
    density = _convert("density", parameters["density"], label)
    if density <= 0:
        raise RegMeanError(f"{label}: {density:g}: this tool takes positive densities only")
    return min(density, 1.0)


# --- this tool's methods ---------------------------------------------------------------------------------

def _own_options(method: str, entries: list[ModelEntry], base: str | None, parameters: dict[str, Any], where: str,
                 keys: KeyTable) -> dict[str, Any]:
    """regmean, regmean++, fisher: the models listed, each one's `weight` its coefficient, and this tool's
    own keys under `parameters`. base_model gives the config and tokenizer; listed among the models it is
    not a candidate either, as for mergekit's task-vector methods."""
    entries = [entry for entry in entries if entry.reference != base]
    if not entries:
        raise RegMeanError(f"{where}: key 'models': no model to merge besides base_model")
    parameters = dict(parameters)
    default_weight = parameters.pop("weight", None)
    label = f"{where}: parameters"
    options = parse_config(parameters, label, keys)
    for option, key in GIVEN_BY_MERGEKIT_KEYS.items():
        if option in options:
            raise RegMeanError(f"{label}: key {option!r}: a mergekit config gives it with its key {key!r}")
    names = candidate_names([entry.reference for entry in entries])
    coefficients = {}
    for name, entry in zip(names, entries):
        extra = sorted(set(entry.parameters) - {"weight"})
        if extra:
            raise RegMeanError(f"{entry.where}: key {extra[0]!r}: only 'weight' is read per model for {method}; "
                               "this tool's keys go under the top-level parameters")
        weight = entry.parameters.get("weight", default_weight)
        if weight is not None:
            where_weight = f"{entry.where}: key 'weight'" if "weight" in entry.parameters else f"{label}: key 'weight'"
            coefficients[name] = _number(_scalar(weight, where_weight), where_weight)
    options.update(method=method, models={n: e.reference for n, e in zip(names, entries)}, coefficients=coefficients)
    if base is not None:
        options["base"] = base
    return options


# --- tokenizer and dtype ---------------------------------------------------------------------------------

def _check_tokenizer(data: Mapping[str, Any], base: str | None, where: str) -> None:
    """The output's tokenizer comes from --base, which base_model sets, as mergekit copies base_model's by
    default; `tokenizer_source: base` (or base_model itself) says the same. Unions, other models' tokenizers
    and added tokens would change the embeddings, which this tool does not do."""
    source, key = data.get("tokenizer_source"), "tokenizer_source"
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        key = "tokenizer"
        if not isinstance(tokenizer, Mapping) or set(k for k, v in tokenizer.items() if v is not None) != {"source"}:
            raise RegMeanError(f"{where}: key 'tokenizer': not honoured (a tokenizer union, added tokens); only "
                               "`tokenizer_source: base` is")
        source = tokenizer["source"]
    if source is None:
        return
    if base is None or (source != "base" and source != base):
        raise RegMeanError(f"{where}: key {key!r}: {source!r} is not honoured; only base (with base_model set), "
                           "whose tokenizer and config the output takes")


def _check_dtypes(data: Mapping[str, Any], references: list[str], where: str) -> None:
    """`dtype` and `out_dtype` only as the models are stored: this tool computes in float64 and writes the
    candidates' own dtype, so any other would give other tensors than mergekit's."""
    stored: dict[str, set[str]] | None = None
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is None:
            continue
        name = value.removeprefix("torch.") if isinstance(value, str) else value
        if name not in DTYPES:
            raise RegMeanError(f"{where}: key {key!r}: {value!r} is not one of {', '.join(DTYPES)}")
        stored = stored if stored is not None else {reference: _stored_dtypes(reference) for reference in references}
        for reference, dtypes in stored.items():
            if dtypes - {name}:
                raise RegMeanError(f"{where}: key {key!r}: {name}, but {reference} is stored as "
                                   f"{', '.join(sorted(dtypes))}; this tool computes in float64 and writes the "
                                   "models' own dtype (drop the key)")


def _stored_dtypes(reference: str) -> set[str]:
    """The floating-point dtypes of a model's tensors, from the files' headers."""
    from regmean_pipeline.io.weights import open_weights, resolve_adapter_reference

    folder, adapter_base = resolve_adapter_reference(reference)
    weights = open_weights(folder, base_model=adapter_base)
    return {str(weights.dtype(name)).removeprefix("torch.") for name in weights.names()
            if weights.dtype(name).is_floating_point}
