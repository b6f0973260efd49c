"""Stage 2: `regmean merge`. The methods that read caches (or nothing but weights) stream here: every
candidate opened lazily, the merge planned, then executed batch by batch into the output; the methods
that measure while they merge run in stages/plusplus.py. Both publish through stages/publish.py."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from regmean_pipeline.cache.manifest import MANIFEST_NAME
from regmean_pipeline.cache.shards import open_sharded, shard_folders
from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.distributed import Ranks, all_ok, process_group, rank_device
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import STAGING_MARK
from regmean_pipeline.io.model_folder import write_json
from regmean_pipeline.io.storage import Folder
from regmean_pipeline.io.weights import open_weights, resolve_model_dir
from regmean_pipeline.measure.models import resolve_device
from regmean_pipeline.merge.executor import execute_merge
from regmean_pipeline.merge.layer_parallel import output_owners, split_plan
from regmean_pipeline.merge.methods.base import MergeMethod, MethodInputs
from regmean_pipeline.merge.plan import Candidate, MergeSettings, StatsSource, plan_merge
from regmean_pipeline.merge.pretrained import PretrainedWeights
from stages.merge_options import MergeOptions, resolve_method
from stages.plusplus import run_plusplus
from stages.publish import MergeOutput, build_report, locked_target, sizes

log = logging.getLogger(__name__)


def run_merge(options: MergeOptions) -> dict:
    """One merge; under torchrun, one rank of it (the ranks share the work, rank 0 publishes)."""
    method, params = resolve_method(options)
    if method.needs.data:
        return run_plusplus(options, method, params)
    with process_group() as ranks, locked_target(options, ranks):
        return _run_merge(options, method, params, ranks)


def discover_caches(cache_dir: str | None, caches: list[str]) -> list[Folder]:
    """Every subfolder of cache_dir holding a manifest or shard caches (sorted by name), then each --cache.

    Folders may be local paths or fsspec URLs (s3://bucket/prefix).
    """
    found: list[Folder] = []
    if cache_dir is not None:
        root = Folder(cache_dir)
        if not root.is_dir():
            raise RegMeanError(f"--cache-dir {root}: no such folder")
        found += [sub for sub in root.subfolders()
                  if not sub.name.startswith(".") and STAGING_MARK not in sub.name
                  and (sub.exists(MANIFEST_NAME) or shard_folders(sub))]
        if not found and not caches:
            raise RegMeanError(f"--cache-dir {root}: no subfolder holds a {MANIFEST_NAME} (run `regmean stats` first)")
    for cache in caches:
        folder = Folder(cache)
        if not folder.exists(MANIFEST_NAME) and not shard_folders(folder):
            raise RegMeanError(f"--cache {folder}: no {MANIFEST_NAME}; not a finished stats cache")
        found.append(folder)
    return found


def open_stats(folder: Folder) -> StatsSource:
    """A candidate's statistics: its cache, or the sum of the shard caches its folder holds."""
    if not folder.exists(MANIFEST_NAME):
        return open_sharded([folder], where=str(folder))
    cache = StatsCache(folder)
    if cache.manifest.shard is not None:
        shard = cache.manifest.shard
        raise RegMeanError(f"{folder}: shard {shard['index']} of {shard['count']} of a candidate; give the folder "
                           "holding all its shards, or sum them first with `regmean combine`")
    return cache


def open_candidates(options: MergeOptions, method: MergeMethod) -> list[Candidate]:
    """One candidate per cache; for the methods that read no statistics also each --model NAME=PATH without
    a cache."""
    folders = discover_caches(options.cache_dir, options.caches)
    names = {folder.name for folder in folders}
    uncached = [name for name in options.models if name not in names] if method.needs.statistic is None else []
    known = names | set(uncached)
    for flag, given in (("--model", options.models), ("--coefficient", options.coefficients)):
        unknown = sorted(set(given) - known)
        if unknown:
            raise RegMeanError(f"{flag} {unknown[0]}=...: no candidate has that name (candidates: {', '.join(sorted(known))})")

    from regmean_pipeline.io.weights import resolve_adapter_reference

    def candidate(name: str, stats: StatsSource | None, reference: str, where: str) -> Candidate:
        try:  # BASE+ADAPTER (mergekit's notation): the adapter over that base
            model_dir, adapter_base = resolve_adapter_reference(reference)
        except RegMeanError as exc:
            raise RegMeanError(f"candidate {name}: {exc} (set its weights with --model {name}=PATH)") from None
        # An adapter's base as its stats run found it, unless --model points the candidate elsewhere.
        base_model = adapter_base or (stats.manifest.model.get("base_model") if stats and name not in options.models
                                      else None)
        return Candidate(name, stats, open_weights(model_dir, allow_pickle=options.allow_pickle, base_model=base_model),
                         float(options.coefficients.get(name, 1.0)), model_dir, where or str(model_dir), reference)

    candidates = []
    for folder in folders:
        stats = open_stats(folder)
        candidates.append(candidate(folder.name, stats, options.models.get(folder.name, stats.manifest.model["reference"]),
                                    str(folder)))
    return candidates + [candidate(name, None, options.models[name], "") for name in uncached]


def _run_merge(options: MergeOptions, method: MergeMethod, params, ranks: Ranks) -> dict:
    started = time.perf_counter()
    _, batch_bytes = sizes(options)
    settings = MergeSettings(list(options.exclude), batch_bytes, method.solve(params) if method.solve else None,
                             method.needs.statistic, method.name)
    device = resolve_device(rank_device(ranks, options.device))
    candidates = open_candidates(options, method)
    base_folder = resolve_model_dir(options.base) if options.base else None
    base = open_weights(base_folder, allow_pickle=options.allow_pickle) if base_folder else None
    plan = plan_merge(candidates, settings, base=base)
    inputs = MethodInputs(candidates, plan.averaged, _pretrained(options, plan, candidates), batch_bytes,
                          options.progress and ranks.is_main)
    combine = method.combiner(inputs, params)
    parts = split_plan(plan, ranks.world)
    owners = output_owners(parts)
    planned = time.perf_counter()

    with MergeOutput(options, ranks, shared=True) as output:
        result = output.write_tensors(
            plan.outputs, lambda sink: execute_merge(parts[ranks.rank], candidates, settings, sink, device=device,
                                                     base=base, progress=inputs.progress, combine=combine),
            owner_of=owners.__getitem__, background=True)
        if inputs.report:
            result["method_report"] = inputs.report
        if ranks.active:
            result = _gathered(output.stage, ranks, result)
            if not ranks.is_main:
                return {}
        report = build_report(options, method, params, plan, candidates, result, device)
        report["timings"]["plan_and_checks"] = planned - started
        report["settings"]["ranks"] = ranks.world
        output.finish(report, candidates, base_folder=base_folder, started=started)
    fallbacks = report["totals"]["fallback_systems"]
    log.info("merge: %d candidates, %s, %d layers solved (%d systems%s), %d averaged or combined, %d copied%s, "
             "%.1fs -> %s", len(candidates), method.name, len(result["layers"]), plan.num_systems,
             f", {fallbacks} through the fallback" if fallbacks else "", len(plan.averaged), len(plan.copied),
             f", over {ranks.world} processes" if ranks.active else "", report["timings"]["total"], options.out)
    return report


def _pretrained(options: MergeOptions, plan, candidates: list[Candidate]) -> PretrainedWeights | None:
    """The --pretrained model, every combined parameter checked against it before any work."""
    if not options.pretrained:
        return None
    folder = resolve_model_dir(options.pretrained)
    pretrained = PretrainedWeights.for_candidates(open_weights(folder, allow_pickle=options.allow_pickle),
                                                  plan.averaged)
    pretrained.check(plan.averaged, candidates[0])
    return pretrained


RANK_RESULT = ".rank-result-"


def _gathered(stage: Path, ranks: Ranks, result: dict) -> dict:
    """Each rank's report entries written beside the output; rank 0 reads them all back."""
    write_json(stage / f"{RANK_RESULT}{ranks.rank}.json", result)
    if not all_ok(True):
        raise RegMeanError("another rank of this merge failed; nothing was published")
    return gather_rank_results(stage, ranks.world) if ranks.is_main else {}


def gather_rank_results(stage: Path, world: int) -> dict:
    """All ranks' report entries in one; per-rank timings are kept side by side (the files are removed)."""
    layers: dict[str, dict] = {}
    timings: dict[str, float] = {}
    per_rank = []
    for rank in range(world):
        path = stage / f"{RANK_RESULT}{rank}.json"
        part = json.loads(path.read_text())
        path.unlink()
        layers.update(part["layers"])
        per_rank.append(part["timings"])
        for key, value in part["timings"].items():
            timings[key] = max(timings.get(key, 0.0), value)  # the slowest rank sets the pace
    return {"layers": layers, "timings": {**timings, "per_rank": per_rank}}


