"""Which candidates one `regmean stats` call measures: repeated --model/--dataset, or a YAML file.

    --model sst2=runs/sst2 --dataset sst2=data/sst2/train.jsonl --model cr=runs/cr --dataset cr=...
    --candidates candidates.yaml       # candidates: [{name: sst2, model: runs/sst2, dataset: ...}, ...]

A value is NAME=PATH when the text before its first '=' is a candidate name (letters, digits, '_',
'.', '-'; no '/'); otherwise it is a bare PATH, which names its candidate after its folder: a model
folder (or hub id) by its last part, a data file (.jsonl, .csv, ...) by the folder holding it, so
``--model runs/sst2 --dataset data/sst2/train.jsonl`` both name candidate ``sst2``. One bare
--model with one bare --dataset is the single-candidate form (the cache is OUT itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.data import FILE_BUILDERS

CANDIDATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
FILE_FIELDS = ("name", "model", "dataset")


@dataclass(frozen=True)
class StatsCandidate:
    name: str  # its cache is written to OUT/NAME
    model: str
    dataset: str


def _named(value: str) -> tuple[str, str] | None:
    name, sep, path = value.partition("=")
    return (name, path) if sep and path and CANDIDATE_NAME.fullmatch(name) else None


def model_name(path: str) -> str:
    """A model folder or hub id names its candidate by its last part."""
    return PurePosixPath(path.rstrip("/")).name


def dataset_name(path: str) -> str:
    """A data file names its candidate by the folder holding it, a data folder or hub id by its last part."""
    pure = PurePosixPath(path.rstrip("/"))
    return pure.parent.name if pure.suffix.lower() in FILE_BUILDERS else pure.name


def _by_name(values: list[str], flag: str, name_of) -> dict[str, str]:
    paths: dict[str, str] = {}
    for value in values:
        name, path = _named(value) or (name_of(value), value)
        if not CANDIDATE_NAME.fullmatch(name):
            raise RegMeanError(f"{flag} {value}: cannot name a candidate {name!r} after its folder; write NAME=PATH")
        if name in paths:
            raise RegMeanError(f"{flag} {value}: a second candidate named {name!r}; name them apart with NAME=PATH")
        paths[name] = path
    return paths


def candidates_from_flags(models: list[str], datasets: list[str]) -> list[StatsCandidate] | None:
    """The candidates of --model/--dataset paired by name; None for one bare pair (OUT itself)."""
    if not models or not datasets:
        raise RegMeanError(f"{'--model' if not models else '--dataset'}: missing (or list the candidates in "
                           "--candidates FILE)")
    if len(models) == len(datasets) == 1 and _named(models[0]) is None and _named(datasets[0]) is None:
        return None
    model_paths = _by_name(models, "--model", model_name)
    dataset_paths = _by_name(datasets, "--dataset", dataset_name)
    for name in dataset_paths.keys() - model_paths.keys():
        raise RegMeanError(f"--dataset {name}={dataset_paths[name]}: no --model is named {name!r} (models: "
                           f"{', '.join(model_paths)})")
    for name in model_paths.keys() - dataset_paths.keys():
        raise RegMeanError(f"--model {name}={model_paths[name]}: no --dataset is named {name!r} (datasets: "
                           f"{', '.join(dataset_paths)})")
    return [StatsCandidate(name, path, dataset_paths[name]) for name, path in model_paths.items()]


def read_candidates_file(path: Path) -> list[StatsCandidate]:
    """The candidates a YAML file lists (``candidates:`` entries of name, model, dataset; name optional),
    parsed strictly. Paths are taken as written, relative to the current folder as on the command line."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise RegMeanError(f"--candidates {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise RegMeanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or list(data) != ["candidates"]:
        raise RegMeanError(f"{path}: must be a mapping with the one key 'candidates' (a list of entries with "
                           "name, model and dataset)")
    entries = data["candidates"]
    if not isinstance(entries, list) or not entries:
        raise RegMeanError(f"{path}: 'candidates' must be a non-empty list of entries with name, model and dataset")
    candidates: dict[str, StatsCandidate] = {}
    for index, entry in enumerate(entries):
        at = f"{path}: candidates[{index}]"
        if not isinstance(entry, dict):
            raise RegMeanError(f"{at}: must be a mapping with name, model and dataset, got {entry!r}")
        for field in entry:
            if field not in FILE_FIELDS:
                raise RegMeanError(f"{at}: unknown field {field!r} (known: {', '.join(FILE_FIELDS)})")
        for field in ("model", "dataset"):
            if field not in entry:
                raise RegMeanError(f"{at}.{field}: missing")
        for field, value in entry.items():
            if not isinstance(value, str) or not value:
                raise RegMeanError(f"{at}.{field}: must be a non-empty string, got {value!r}")
        name = entry.get("name", model_name(entry["model"]))
        if not CANDIDATE_NAME.fullmatch(name):
            raise RegMeanError(f"{at}.name: {name!r} is not a candidate name (letters, digits, '_', '.', '-'; "
                               "not starting with '.' or '-')")
        if name in candidates:
            raise RegMeanError(f"{at}.name: {name!r} names an earlier entry too")
        candidates[name] = StatsCandidate(name, entry["model"], entry["dataset"])
    return list(candidates.values())
