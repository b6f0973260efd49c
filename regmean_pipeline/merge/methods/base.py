"""What a merge method declares, in one place: its name, its card text, what it needs, its parameters
(a dataclass whose fields are the CLI flags and config keys) and how it combines the candidates' tensors.

A parameter is a dataclass field made with ``param``; its metadata carries the help text, the allowed
values and, where the flag is not the field's name, the flag. ``resolve_params`` turns what a user gave
(flags, config keys, API keyword arguments) into the method's dataclass, refusing what belongs to
another method by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from regmean_pipeline.errors import RegMeanError

# A combiner gives the merged value of one parameter by name; None from a method's ``combiner`` means
# the coefficient-weighted mean (the executor's default for every parameter no solve produces).
TensorCombiner = Callable[[str], torch.Tensor]

PARAMETERS_PANEL = "Method parameters"
DATA_PANEL = "Data while merging (methods that measure as they merge)"


def param(default: Any, help: str, *, choices: tuple[str, ...] | None = None, low: float | None = None,
          high: float | None = None, low_open: bool = False, flag: str | None = None, record: bool = True,
          panel: str = PARAMETERS_PANEL) -> Any:
    """A method parameter: ``low``/``high`` bound numbers (``low_open``: the bound itself is refused),
    ``choices`` strings; ``flag`` overrides the flag derived from the name (``--name-with-hyphens``);
    ``record=False`` for resources that do not change the merged bytes (left out of the model card)."""
    metadata = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open, "flag": flag,
                "record": record, "panel": panel}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Needs:
    """What a method reads besides the candidates' weights."""

    statistic: str | None = None  # from every candidate's cache: "gram", "fisher"; None: no cache
    pretrained: bool = False  # --pretrained: the model the candidates were fine-tuned from
    data: bool = False  # each candidate's examples while merging (--dataset NAME=PATH), instead of caches


@dataclass
class MethodInputs:
    """What a method's combiner works from: the plan's candidates and the parameters it combines."""

    candidates: list  # list[merge.plan.Candidate]
    names: list[str]  # the parameters the combiner is asked for, in order
    pretrained: Any = None  # merge.pretrained.PretrainedWeights when the method needs one
    batch_bytes: int = 1 << 30  # the merge's --batch-memory: a bound on what a combiner holds at once
    progress: bool = True
    report: dict = field(default_factory=dict)  # what the combiner adds to merge_report.json


@dataclass(frozen=True)
class MergeMethod:
    name: str  # --method NAME, the config's `method`, the report's and card's method
    title: str  # the model card's "merged with ..." text, with the method's reference
    help: str  # one line, for --method's help
    params: type  # a dataclass of ``param`` fields (an empty one for none)
    needs: Needs = Needs()
    # The per-parameter combiner for everything the plan does not solve; None: the weighted mean.
    combiner: Callable[[MethodInputs, Any], TensorCombiner | None] = lambda inputs, params: None
    # RegMean's closed-form solve of the linear layers from Grams (its settings from the parameters); None:
    # nothing is solved and the combiner (or the mean) gives every parameter.
    solve: Callable[[Any], Any] | None = None
    check: Callable[[Any], None] = lambda params: None  # relations between parameters, after their ranges
    # The parameters under which K copies of one model merge back to that model, bit for bit (the
    # contract every method is tested on, tests/test_methods.py).
    identity: Callable[[int], dict[str, Any]] = lambda copies: {}

    def defaults(self) -> Any:
        return self.params()

    def fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.params)}


@dataclass(frozen=True)
class MergeDataParams:
    """Each candidate's examples, for the methods that measure while they merge: `regmean stats`' data
    options, applied to every candidate."""

    datasets: dict[str, str] = param({}, "NAME=PATH: candidate NAME's examples (repeatable; one per --model).",
                                     flag="--dataset", panel=DATA_PANEL)
    split: str = param("train", "Dataset split.", panel=DATA_PANEL)
    text_column: str | None = param(None, "Column with the text (default: text/sentence if present).",
                                    panel=DATA_PANEL)
    text_pair_column: str | None = param(None, "Second text column, for sentence-pair tasks.", panel=DATA_PANEL)
    image_column: str | None = param(None, "Column with images (vision towers).", panel=DATA_PANEL)
    num_examples: int = param(256, "Examples per candidate, after a seeded shuffle.", low=1, panel=DATA_PANEL)
    seed: int = param(0, "Seed: of the examples' shuffle; of dare's drop masks.", panel=DATA_PANEL)
    max_length: int | None = param(None, "Truncate texts to this many tokens (default: the model's limit).", low=1,
                                   panel=DATA_PANEL)
    batch_size: int = param(32, "Batch size of the forward passes.", low=1, panel=DATA_PANEL)
    num_workers: int = param(0, "DataLoader workers.", low=0, record=False, panel=DATA_PANEL)
    include_padding: bool = param(False, "Count padded positions.", flag="--include-padding/--exclude-padding",
                                  panel=DATA_PANEL)
    dtype: str = param("float32", "Forward-pass dtype of the blocks and hidden states.",
                       choices=("float32", "bfloat16", "float16", "float64"), panel=DATA_PANEL)
    accumulate_dtype: str = param("float32", "Gram accumulation dtype.", choices=("float32", "float64"),
                                  panel=DATA_PANEL)
    messages_column: str | None = param(None, "Chat data: column of {role, content} message lists, rendered with "
                                        "the tokenizer's chat template.", panel=DATA_PANEL)
    prompt_columns: list[str] = param([], "Alpaca-style chat data: column(s) joined into the user's message "
                                      "(repeatable).", flag="--prompt-column", panel=DATA_PANEL)
    response_column: str | None = param(None, "Alpaca-style chat data: the assistant's response column.",
                                        panel=DATA_PANEL)
    system_column: str | None = param(None, "Alpaca-style chat data: an optional system message column.",
                                      panel=DATA_PANEL)
    tokens: str = param("all", "Rows that count: all (every real token) or response (the assistant's tokens only).",
                        choices=("all", "response"), panel=DATA_PANEL)
    base_model: str | None = param(None, "LoRA adapter candidates' base model (default: base_model_name_or_path of "
                                   "each adapter_config.json).", panel=DATA_PANEL)
    attn_implementation: str | None = param(None, "Attention kernel: eager, sdpa, flash_attention_2 (GPU).",
                                            panel=DATA_PANEL)
    trust_remote_code: bool = param(False, "Allow the model folders' own Python code to run.",
                                    flag="--trust-remote-code", record=False, panel=DATA_PANEL)


def flag_of(parameter: dataclasses.Field) -> str:
    return parameter.metadata.get("flag") or "--" + parameter.name.replace("_", "-")


def _annotation(parameter: dataclasses.Field):
    annotation = parameter.type
    if isinstance(annotation, str):
        annotation = eval(annotation, {"dict": dict, "list": list, "str": str, "float": float, "int": int,  # noqa: S307
                                       "bool": bool, "None": None})
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def value_kind(parameter: dataclasses.Field) -> type:
    """The parameter's value type: float, int, str, bool, list (of str) or dict (candidate name -> value)."""
    annotation = _annotation(parameter)
    return typing.get_origin(annotation) or annotation


def item_kind(parameter: dataclasses.Field) -> type:
    """The type of a list's items or a mapping's values."""
    return typing.get_args(_annotation(parameter))[-1]


def convert(parameter: dataclasses.Field, value: Any, where: str) -> Any:
    """One given value as the parameter's type, within its range; RegMeanError naming ``where`` otherwise."""
    kind = value_kind(parameter)
    if value is None:
        return None
    if kind is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise RegMeanError(f"{where}: must map candidate names to values, got {value!r}")
        item = item_kind(parameter)
        return {name: _scalar(item, parameter.metadata, entry, f"{where} {name}") for name, entry in value.items()}
    if kind is list:
        if not isinstance(value, (list, tuple)):
            raise RegMeanError(f"{where}: must be a list, got {value!r}")
        return [str(v) for v in value]
    return _scalar(kind, parameter.metadata, value, where)


def _scalar(kind: type, meta: Mapping[str, Any], value: Any, where: str) -> Any:
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RegMeanError(f"{where}: {value!r} is not a number") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RegMeanError(f"{where}: must be {kind.__name__}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise RegMeanError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    low, high = meta.get("low"), meta.get("high")
    if kind in (int, float) and ((low is not None and (value < low or (meta.get("low_open") and value == low)))
                                 or (high is not None and value > high)):
        interval = f"{'(' if meta.get('low_open') else '['}{'-inf' if low is None else f'{low:g}'}, " \
                   f"{'inf' if high is None else f'{high:g}'}]"
        raise RegMeanError(f"{where}: must lie in {interval}, got {value}")
    return value


@dataclass(frozen=True)
class ParameterInfo:
    """A parameter name across the registry: the methods that have it, its first field, and whether every
    one of them reads data while merging (its refusal then says so)."""

    owners: list[str]
    field: dataclasses.Field
    data_only: bool


def resolve_params(method: MergeMethod, given: Mapping[str, Any], index: Mapping[str, ParameterInfo], *,
                   style: str = "flag", ignore_foreign: bool = False) -> Any:
    """The method's parameter dataclass from the given values (defaults for the rest).

    ``index`` maps every parameter name of every method to the methods that have it and its field, so
    that a value meant for another method is refused naming them (or skipped with ``ignore_foreign``: a
    config file shared between stages). ``style`` names values in messages: "flag" or "key" (config)."""
    fields = method.fields()
    chosen = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in fields:
            if ignore_foreign and name in index:
                continue
            if name not in index:
                raise RegMeanError(f"{'--' + name.replace('_', '-') if style == 'flag' else f'key {name!r}'}: "
                                   "no merge method has this parameter")
            info = index[name]
            label = flag_of(info.field) if style == "flag" else f"key {name!r}"
            owners = ", ".join(info.owners)
            if info.data_only:
                raise RegMeanError(f"{label}: only --method {owners} reads data while merging (not {method.name}); "
                                   "`regmean stats` takes the data options for the other methods")
            raise RegMeanError(f"{label}: only --method {owners} use{'s' if len(info.owners) == 1 else ''} it "
                               f"(not {method.name})")
        where = flag_of(fields[name]) if style == "flag" else f"key {name!r}"
        chosen[name] = convert(fields[name], value, where)
    params = method.params(**chosen)
    method.check(params)
    return params


def recorded(params: Any) -> dict[str, Any]:
    """The parameters that decide the merged bytes, by name (the report's settings, the card's config)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.metadata.get("record", True)}
