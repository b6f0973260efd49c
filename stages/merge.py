"""Stage 2: load every candidate's cache and weights, solve each layer, write the merged model."""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from regmean_pipeline import __version__
from regmean_pipeline.atomic import STAGING_MARK, check_target, output_lock, staged_directory
from regmean_pipeline.cache import GramCache
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.executor import execute_merge
from regmean_pipeline.hf_output import copy_model_files, parse_size, write_json
from regmean_pipeline.manifest import MANIFEST_NAME
from regmean_pipeline.models import parse_dtype, resolve_device
from regmean_pipeline.plan import Candidate, MergeSettings, plan_merge
from regmean_pipeline.safetensors_io import ShardedCheckpointWriter
from regmean_pipeline.weights import open_weights, resolve_model_dir

log = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"


@dataclass
class MergeOptions:
    out: str
    cache_dir: str | None = None
    caches: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    coefficients: dict[str, float] = field(default_factory=dict)
    base: str | None = None
    exclude: list[str] = field(default_factory=list)
    reduce_non_diagonal_ratio: float = 0.95
    gram_weighting: str = "equal"
    solve_dtype: str = "float32"
    device: str = "auto"
    max_shard_size: str = "5GB"
    batch_memory: str = "1GiB"
    allow_pickle: bool = False
    overwrite: bool = False
    progress: bool = True


def discover_caches(cache_dir: str | None, caches: list[str]) -> list[Path]:
    """Every subfolder of cache_dir holding a manifest (sorted by name), then each explicit --cache."""
    found: list[Path] = []
    if cache_dir is not None:
        root = Path(cache_dir)
        if not root.is_dir():
            raise RegMeanError(f"--cache-dir {root}: no such folder")
        found += [p for p in sorted(root.iterdir())
                  if p.is_dir() and not p.name.startswith(".") and STAGING_MARK not in p.name
                  and (p / MANIFEST_NAME).exists()]
        if not found and not caches:
            raise RegMeanError(f"--cache-dir {root}: no subfolder holds a {MANIFEST_NAME} (run `regmean stats` first)")
    for cache in caches:
        path = Path(cache)
        if not (path / MANIFEST_NAME).exists():
            raise RegMeanError(f"--cache {path}: no {MANIFEST_NAME}; not a finished stats cache")
        found.append(path)
    return found


def open_candidates(options: MergeOptions) -> list[Candidate]:
    caches = [GramCache(path) for path in discover_caches(options.cache_dir, options.caches)]
    names = {cache.name for cache in caches}
    for flag, given in (("--model", options.models), ("--coefficient", options.coefficients)):
        unknown = sorted(set(given) - names)
        if unknown:
            raise RegMeanError(f"{flag} {unknown[0]}=...: no candidate has that name (candidates: {', '.join(sorted(names))})")
    candidates = []
    for cache in caches:
        reference = options.models.get(cache.name, cache.manifest.model["reference"])
        try:
            folder = resolve_model_dir(reference)
        except RegMeanError as exc:
            raise RegMeanError(f"candidate {cache.name}: {exc} (set its weights with --model {cache.name}=PATH)") from None
        candidates.append(Candidate(cache.name, cache, open_weights(folder, allow_pickle=options.allow_pickle),
                                    float(options.coefficients.get(cache.name, 1.0)), folder, str(cache.folder)))
    return candidates


def run_merge(options: MergeOptions) -> dict:
    """One merge; it holds OUT's lock throughout, so a second run on the same OUT stops at once."""
    with output_lock(Path(options.out)):
        return _run_merge(options)


def _run_merge(options: MergeOptions) -> dict:
    started = time.perf_counter()
    out = Path(options.out)
    check_target(out, overwrite=options.overwrite)
    try:
        max_shard, batch_bytes = parse_size(options.max_shard_size), parse_size(options.batch_memory)
    except ValueError as exc:
        raise RegMeanError(f"--max-shard-size/--batch-memory: {exc}") from None
    settings = MergeSettings(options.reduce_non_diagonal_ratio, options.gram_weighting, list(options.exclude),
                             parse_dtype(options.solve_dtype, "--solve-dtype"), batch_bytes)
    device = resolve_device(options.device)
    candidates = open_candidates(options)
    base_folder = resolve_model_dir(options.base) if options.base else None
    base = open_weights(base_folder, allow_pickle=options.allow_pickle) if base_folder else None
    plan = plan_merge(candidates, settings, base=base)
    planned = time.perf_counter()

    with staged_directory(out, overwrite=options.overwrite) as stage:
        writer = ShardedCheckpointWriter(stage, plan.outputs, max_shard)
        try:
            result = execute_merge(plan, candidates, settings, writer.write, device=device, base=base,
                                   progress=options.progress)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_model_files(base_folder or candidates[0].model_dir, stage)
        report = build_report(options, settings, plan, candidates, result, device)
        report["timings"]["plan_and_checks"] = planned - started
        report["timings"]["total"] = time.perf_counter() - started
        write_json(stage / REPORT_NAME, report)
    fallbacks = report["totals"]["fallback_systems"]
    log.info("merge: %d candidates, %d layers solved (%d systems%s), %d averaged, %d copied, %.1fs -> %s",
             len(candidates), len(result["layers"]), plan.num_systems,
             f", {fallbacks} through the fallback" if fallbacks else "", len(plan.averaged), len(plan.copied),
             report["timings"]["total"], out)
    return report


def build_report(options: MergeOptions, settings: MergeSettings, plan, candidates: list[Candidate], result: dict,
                 device: torch.device) -> dict:
    layers = result["layers"]
    fallback = {name: entry for name, entry in layers.items() if entry["solver"] != "cholesky"}
    errors = [entry["residual"] for entry in layers.values()]
    return {
        "format": "regmean-merge-report",
        "version": 1,
        "tool": f"regmean-pipeline {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "candidates": [{"name": c.name, "cache": c.where, "weights": c.weights.reference,
                        "coefficient": c.coefficient, "examples": c.grams.manifest.examples} for c in candidates],
        "settings": {"reduce_non_diagonal_ratio": settings.reduce_non_diagonal_ratio,
                     "gram_weighting": settings.gram_weighting, "exclude": settings.exclude,
                     "solve_dtype": str(settings.solve_dtype).replace("torch.", ""), "device": str(device),
                     "base": options.base},
        "layers": layers,
        "fallback_layers": sorted(fallback),
        "averaged": plan.averaged,
        "copied": plan.copied,
        "totals": {"candidates": len(candidates), "layers_solved": len(layers), "systems": plan.num_systems,
                   "batches": len(plan.batches), "averaged": len(plan.averaged), "copied": len(plan.copied),
                   "fallback_systems": len({entry["gram"] for entry in fallback.values()}),
                   "max_residual": max(errors, default=0.0),
                   "output_bytes": sum(spec.nbytes for spec in plan.outputs)},
        "timings": result["timings"],
    }
