"""manifest.json of a Gram cache: what was measured, on which weights, and where each Gram lives.

The manifest is parsed strictly: a cache travels between machines and users, so every field is
checked for type and range before anything trusts it (sizes, names, versions).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.storage import Folder

FORMAT = "regmean-stats"
VERSION = 1
MANIFEST_NAME = "manifest.json"
STORAGE_FORMATS = ("zarr", "safetensors")
GRAM_DTYPES = ("float32", "float64")
LAYOUT = "packed-upper"
MAX_DIM = 1 << 18  # far above any hidden size in use; bounds what a manifest can make us allocate
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
class GramEntry:
    dim: int
    tokens: int
    checksum: str


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

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
                        created: str = "") -> Manifest:
    """The manifest of a GramStats (checksums are filled in when the Grams are written)."""
    return Manifest(
        model=model, dataset=dataset, examples=stats.examples, include_padding=include_padding,
        accumulate_dtype=accumulate_dtype, forward_dtype=forward_dtype, storage=storage,
        layers={name: LayerEntry(stats.layer_grams[name], layer.weight, layer.in_features, layer.out_features,
                                 layer.transposed) for name, layer in stats.layers.items()},
        grams={key: GramEntry(int(total.shape[0]), stats.tokens[key], "") for key, total in stats.sums.items()},
        tool=tool, created=created,
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
    )


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
