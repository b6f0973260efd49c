"""manifest.json of a Gram cache: what was measured, on which weights, and where each Gram lives.

The manifest is parsed strictly: a cache travels between machines and users, so every field is
checked for type and range before anything trusts it (sizes, names, versions).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from regmean_pipeline.cache.statistics import GRAM, STATISTICS, FisherEntry, GramEntry
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.storage import Folder

FORMAT = "regmean-stats"
# Version 1: Grams only (no `statistics` field). Version 2: the caches that hold other statistics too,
# which a tool that knows only Grams must refuse rather than read as a cache of no Grams.
VERSION = 2
GRAMS_ONLY_VERSION = 1
MANIFEST_NAME = "manifest.json"
STORAGE_FORMATS = ("zarr", "safetensors")
GRAM_DTYPES = ("float32", "float64")
LAYOUT = "packed-upper"
MAX_DIM = 1 << 18  # far above any hidden size in use; bounds what a manifest can make us allocate
MAX_ELEMENTS = 1 << 36  # elements of one parameter (a Fisher array): far above any embedding in use
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of the largest models is well under 1 MiB
CHECKPOINT_FIELD = "checkpoint"  # in ``extra``: a checkpoint of an unfinished stats run, never a cache
_SAFE_NAME = re.compile(r"(?!__)(?!\.\.?\Z)[A-Za-z0-9_.\-]{1,400}")


@dataclass
class LayerEntry:
    gram: str
    weight: str
    in_features: int
    out_features: int
    transposed: bool


@dataclass
class Manifest:
    model: dict[str, Any]  # reference, architecture, model_type, fingerprint
    dataset: dict[str, Any]
    examples: int
    include_padding: bool
    accumulate_dtype: str
    forward_dtype: str
    storage: str
    layers: dict[str, LayerEntry]
    grams: dict[str, GramEntry]
    layout: str = LAYOUT
    format: str = FORMAT
    version: int = VERSION
    tool: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, int] | None = None  # {"index": I, "count": N}: this cache holds share I of N
    statistics: list[str] = field(default_factory=lambda: [GRAM.name])  # what the cache holds
    fisher: dict[str, FisherEntry] = field(default_factory=dict)  # parameter name -> its diagonal Fisher

    def entries(self, statistic: str) -> dict[str, GramEntry | FisherEntry]:
        """The arrays of one statistic the cache holds, by key."""
        return getattr(self, STATISTICS[statistic].section)

    def to_json(self) -> str:
        data = asdict(self)
        if self.statistics == [GRAM.name]:  # a Grams-only cache stays in the version 1 layout
            del data["statistics"], data["fisher"]
            data["version"] = GRAMS_ONLY_VERSION
        else:
            data["version"] = VERSION
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    def write(self, folder: Path | Folder) -> None:
        folder = Folder(folder)
        if not folder.is_local:
            folder.write_text(MANIFEST_NAME, self.to_json())
            return
        with open(folder.local_path / MANIFEST_NAME, "w") as file:
            file.write(self.to_json())
            file.flush()
            os.fsync(file.fileno())  # the manifest marks the folder complete: it must not outlive its data

    def layers_of_gram(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {key: [] for key in self.grams}
        for name, layer in self.layers.items():
            groups[layer.gram].append(name)
        return groups


def manifest_from_stats(stats, *, model: dict[str, Any], dataset: dict[str, Any], storage: str,
                        forward_dtype: str, accumulate_dtype: str, include_padding: bool, tool: str = "",
                        created: str = "", fisher=None) -> Manifest:
    """The manifest of a GramStats (None: no Grams measured) and a FisherStats (checksums are filled in
    when the arrays are written)."""
    statistics = ([GRAM.name] if stats is not None else []) + (["fisher"] if fisher is not None else [])
    return Manifest(
        model=model, dataset=dataset, examples=(stats if stats is not None else fisher).examples,
        include_padding=include_padding, accumulate_dtype=accumulate_dtype, forward_dtype=forward_dtype,
        storage=storage,
        layers={name: LayerEntry(stats.layer_grams[name], layer.weight, layer.in_features, layer.out_features,
                                 layer.transposed) for name, layer in stats.layers.items()} if stats is not None else {},
        grams={key: GramEntry(int(total.shape[0]), stats.tokens[key], "") for key, total in stats.sums.items()}
        if stats is not None else {},
        tool=tool, created=created, statistics=statistics,
        fisher={name: FisherEntry(list(total.shape), fisher.counts[name], "") for name, total in fisher.sums.items()}
        if fisher is not None else {},
    )


def _check(condition: bool, where: str, problem: str) -> None:
    if not condition:
        raise RegMeanError(f"{where}: {problem}")


def _get(obj: dict, key: str, kind: type | tuple, where: str) -> Any:
    _check(key in obj, where, f"missing field '{key}'")
    value = obj[key]
    ok = isinstance(value, kind) and not (kind in (int, (int,)) and isinstance(value, bool))
    _check(ok, where, f"field '{key}' has the wrong type ({type(value).__name__})")
    return value


def _count(obj: dict, key: str, where: str, low: int = 0, high: int = 1 << 62) -> int:
    value = _get(obj, key, int, where)
    _check(low <= value <= high, where, f"field '{key}' = {value} is out of range [{low}, {high}]")
    return value


def check_name(name: Any, where: str) -> str:
    """Layer and gram names become array names on disk: no separators, no '..', no '__' prefix."""
    _check(isinstance(name, str) and bool(_SAFE_NAME.fullmatch(name)), where, f"invalid name {name!r}")
    return name


def parse_manifest(data: Any, where: str) -> Manifest:
    """Validate a decoded manifest.json; ``where`` names the file in every error."""
    _check(isinstance(data, dict), where, "not a JSON object")
    _check(data.get("format") == FORMAT, where, f"field 'format' is {data.get('format')!r}, not {FORMAT!r}")
    version = _get(data, "version", int, where)
    _check(version <= VERSION, where,
           f"cache format version {version} is newer than this tool's ({VERSION}); upgrade regmean-pipeline")
    _check(version >= 1, where, f"invalid cache format version {version}")
    model = _get(data, "model", dict, where)
    for key in ("reference", "architecture", "fingerprint"):
        _get(model, key, str, f"{where} (model)")
    storage = _get(data, "storage", str, where)
    _check(storage in STORAGE_FORMATS, where, f"field 'storage' = {storage!r} is not one of {STORAGE_FORMATS}")
    layout = _get(data, "layout", str, where)
    _check(layout == LAYOUT, where, f"field 'layout' = {layout!r} is not {LAYOUT!r}")
    accumulate_dtype = _get(data, "accumulate_dtype", str, where)
    _check(accumulate_dtype in GRAM_DTYPES, where, f"field 'accumulate_dtype' = {accumulate_dtype!r} is not one of {GRAM_DTYPES}")
    statistics = _statistics(data, version, where)

    grams: dict[str, GramEntry] = {}
    for key, entry in _get(data, "grams", dict, where).items():
        at = f"{where} (gram {key!r})"
        check_name(key, at)
        _check(isinstance(entry, dict), at, "not an object")
        checksum = _get(entry, "checksum", str, at)
        _check(checksum.startswith("sha256:") and len(checksum) == 71, at, "malformed checksum")
        grams[key] = GramEntry(_count(entry, "dim", at, 1, MAX_DIM), _count(entry, "tokens", at), checksum)

    layers: dict[str, LayerEntry] = {}
    for name, entry in _get(data, "layers", dict, where).items():
        at = f"{where} (layer {name!r})"
        check_name(name, at)
        _check(isinstance(entry, dict), at, "not an object")
        gram = check_name(_get(entry, "gram", str, at), at)
        _check(gram in grams, at, f"refers to gram {gram!r}, which the manifest does not list")
        layer = LayerEntry(
            gram=gram,
            weight=_get(entry, "weight", str, at),
            in_features=_count(entry, "in_features", at, 1, MAX_DIM),
            out_features=_count(entry, "out_features", at, 1, 1 << 40),
            transposed=_get(entry, "transposed", bool, at),
        )
        _check(layer.in_features == grams[gram].dim, at,
               f"in_features {layer.in_features} differs from its gram's dim {grams[gram].dim}")
        layers[name] = layer
    shard = data.get("shard")
    if shard is not None:
        _check(isinstance(shard, dict), where, "field 'shard' is not an object")
        count = _count(shard, "count", f"{where} (shard)", 1, 1 << 20)
        shard = {"index": _count(shard, "index", f"{where} (shard)", 0, count - 1), "count": count}
    unused = set(grams) - {layer.gram for layer in layers.values()}
    _check(not unused, where, f"grams used by no layer: {sorted(unused)[:3]}")
    _check(GRAM.name in statistics or not grams, where, "lists grams but its 'statistics' do not include gram")
    fisher = _fisher_entries(data, where) if "fisher" in statistics else {}

    return Manifest(
        model=model,
        dataset=_get(data, "dataset", dict, where),
        examples=_count(data, "examples", where),
        include_padding=_get(data, "include_padding", bool, where),
        accumulate_dtype=accumulate_dtype,
        forward_dtype=_get(data, "forward_dtype", str, where),
        storage=storage,
        layers=layers,
        grams=grams,
        layout=layout,
        format=FORMAT,
        version=version,
        tool=str(data.get("tool", "")),
        created=str(data.get("created", "")),
        extra=data.get("extra", {}) if isinstance(data.get("extra", {}), dict) else {},
        shard=shard,
        statistics=statistics,
        fisher=fisher,
    )


def _statistics(data: dict, version: int, where: str) -> list[str]:
    if version == GRAMS_ONLY_VERSION:
        _check("statistics" not in data, where, "field 'statistics' needs cache format version 2")
        return [GRAM.name]
    statistics = _get(data, "statistics", list, where)
    _check(bool(statistics) and all(isinstance(name, str) and name in STATISTICS for name in statistics)
           and len(set(statistics)) == len(statistics), where,
           f"field 'statistics' = {statistics!r} must list some of {', '.join(STATISTICS)}, each once")
    return statistics


def _fisher_entries(data: dict, where: str) -> dict[str, FisherEntry]:
    entries: dict[str, FisherEntry] = {}
    for name, entry in _get(data, "fisher", dict, where).items():
        at = f"{where} (fisher {name!r})"
        check_name(name, at)
        _check(isinstance(entry, dict), at, "not an object")
        shape = _get(entry, "shape", list, at)
        _check(len(shape) <= 8 and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_ELEMENTS
                                       for n in shape), at, f"field 'shape' = {shape!r} is not a tensor shape")
        _check(math.prod(shape) <= MAX_ELEMENTS, at, f"field 'shape' = {shape!r} is larger than any parameter")
        checksum = _get(entry, "checksum", str, at)
        _check(checksum.startswith("sha256:") and len(checksum) == 71, at, "malformed checksum")
        entries[name] = FisherEntry(shape, _count(entry, "examples", at), checksum)
    return entries


def read_manifest(folder: Path | str | Folder) -> Manifest:
    folder = Folder(folder)
    path = folder.child(MANIFEST_NAME)
    try:
        size = folder.size(MANIFEST_NAME)
        if size > MAX_MANIFEST_BYTES:
            raise RegMeanError(f"{path}: {size} bytes, more than any manifest needs ({MAX_MANIFEST_BYTES}); refused")
        raw = folder.read_range(MANIFEST_NAME, 0, size)
    except FileNotFoundError:
        raise RegMeanError(f"{path}: no manifest; not a regmean stats cache (or an unfinished one)") from None
    except OSError as exc:
        raise RegMeanError(f"{path}: cannot read ({exc})") from None
    return parse_manifest(decode_json(raw, str(path)), str(path))


def decode_json(raw: bytes, where: str) -> Any:
    """JSON from untrusted bytes: any failure (encoding, syntax, nesting, huge numbers) is one clear error."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RegMeanError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RegMeanError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise RegMeanError(f"{where}: not acceptable JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
