"""Stage 2: load every candidate's cache and weights, solve each layer, write the merged model."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from regmean_pipeline import __version__
from regmean_pipeline.cache.manifest import MANIFEST_NAME
from regmean_pipeline.cache.shards import open_sharded, shard_folders
from regmean_pipeline.cache.store import GramCache
from regmean_pipeline.distributed import Ranks, all_ok, broadcast_text, process_group, rank_device
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import STAGING_MARK, check_target, output_lock, staged_directory
from regmean_pipeline.io.background import BackgroundWrites
from regmean_pipeline.io.model_folder import copy_model_files, parse_size, write_json
from regmean_pipeline.io.safetensors_io import ShardedCheckpointWriter
from regmean_pipeline.io.storage import Folder
from regmean_pipeline.io.weights import fingerprint, open_weights, resolve_model_dir
from regmean_pipeline.measure.models import parse_dtype, resolve_device
from regmean_pipeline.merge.baselines import DEFAULT_SCALING, PretrainedWeights, task_arithmetic
from regmean_pipeline.merge.executor import execute_merge
from regmean_pipeline.merge.layer_parallel import output_owners, split_plan
from regmean_pipeline.merge.model_card import write_card
from regmean_pipeline.merge.per_candidate import export_per_candidate
from regmean_pipeline.merge.plan import BLOCKWISE, DATALESS, Candidate, GramSource, MergeSettings, exclusion, plan_merge

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
    method: str = "regmean"
    scaling: float | None = None  # task arithmetic's lambda (default DEFAULT_SCALING)
    pretrained: str | None = None  # task arithmetic's starting point
    per_candidate: bool = False
    # --method regmean++ only: each candidate's examples (stats' data options) and the run's resources.
    datasets: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    text_column: str | None = None
    text_pair_column: str | None = None
    image_column: str | None = None
    num_examples: int = 256
    seed: int = 0
    max_length: int | None = None
    batch_size: int = 32
    num_workers: int = 0
    include_padding: bool = False
    dtype: str = "float32"
    accumulate_dtype: str = "float32"
    activation_memory: str = "4GiB"
    spill_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    trust_remote_code: bool = False
    messages_column: str | None = None  # chat data, as `regmean stats` takes it
    prompt_columns: list[str] = field(default_factory=list)
    response_column: str | None = None
    system_column: str | None = None
    tokens: str = "all"
    base_model: str | None = None  # LoRA adapter candidates' base, instead of the one their config names
    attn_implementation: str | None = None


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


def open_grams(folder: Folder) -> GramSource:
    """A candidate's Grams: its cache, or the sum of the shard caches its folder holds."""
    if not folder.exists(MANIFEST_NAME):
        return open_sharded([folder], where=str(folder))
    cache = GramCache(folder)
    if cache.manifest.shard is not None:
        shard = cache.manifest.shard
        raise RegMeanError(f"{folder}: shard {shard['index']} of {shard['count']} of a candidate; give the folder "
                           "holding all its shards, or sum them first with `regmean combine`")
    return cache


def open_candidates(options: MergeOptions) -> list[Candidate]:
    """One candidate per cache; for the dataless baselines also each --model NAME=PATH without a cache."""
    folders = discover_caches(options.cache_dir, options.caches)
    names = {folder.name for folder in folders}
    uncached = [name for name in options.models if name not in names] if options.method in DATALESS else []
    known = names | set(uncached)
    for flag, given in (("--model", options.models), ("--coefficient", options.coefficients)):
        unknown = sorted(set(given) - known)
        if unknown:
            raise RegMeanError(f"{flag} {unknown[0]}=...: no candidate has that name (candidates: {', '.join(sorted(known))})")

    def candidate(name: str, grams: GramSource | None, reference: str, where: str) -> Candidate:
        try:
            model_dir = resolve_model_dir(reference)
        except RegMeanError as exc:
            raise RegMeanError(f"candidate {name}: {exc} (set its weights with --model {name}=PATH)") from None
        # An adapter's base as its stats run found it, unless --model points the candidate elsewhere.
        base_model = grams.manifest.model.get("base_model") if grams and name not in options.models else None
        return Candidate(name, grams, open_weights(model_dir, allow_pickle=options.allow_pickle, base_model=base_model),
                         float(options.coefficients.get(name, 1.0)), model_dir, where or str(model_dir), reference)

    candidates = []
    for folder in folders:
        grams = open_grams(folder)
        candidates.append(candidate(folder.name, grams, options.models.get(folder.name, grams.manifest.model["reference"]),
                                    str(folder)))
    return candidates + [candidate(name, None, options.models[name], "") for name in uncached]


def run_merge(options: MergeOptions) -> dict:
    """One merge; under torchrun, one rank of it (the ranks share the solves, rank 0 publishes).

    The publishing process holds OUT's lock throughout, so a second run on the same OUT stops at once.
    """
    if options.method == BLOCKWISE:
        from stages.plusplus import run_plusplus

        return run_plusplus(options)
    check_blockwise_options(options)
    with process_group() as ranks:
        with output_lock(Path(options.out)) if ranks.is_main else contextlib.nullcontext():
            return _run_merge(options, ranks)


def _run_merge(options: MergeOptions, ranks: Ranks) -> dict:
    started = time.perf_counter()
    out = Path(options.out)
    check_target(out, overwrite=options.overwrite)
    try:
        max_shard, batch_bytes = parse_size(options.max_shard_size), parse_size(options.batch_memory)
    except ValueError as exc:
        raise RegMeanError(f"--max-shard-size/--batch-memory: {exc}") from None
    settings = MergeSettings(options.reduce_non_diagonal_ratio, options.gram_weighting, list(options.exclude),
                             parse_dtype(options.solve_dtype, "--solve-dtype"), batch_bytes, method=options.method)
    check_method_options(options)
    device = resolve_device(rank_device(ranks, options.device))
    candidates = open_candidates(options)
    base_folder = resolve_model_dir(options.base) if options.base else None
    base = open_weights(base_folder, allow_pickle=options.allow_pickle) if base_folder else None
    plan = plan_merge(candidates, settings, base=base)
    combine = None
    if options.method == "task-arithmetic":
        folder = resolve_model_dir(options.pretrained)
        pretrained = PretrainedWeights.for_candidates(open_weights(folder, allow_pickle=options.allow_pickle),
                                                      plan.averaged)
        pretrained.check(plan.averaged, candidates[0])
        combine = task_arithmetic(candidates, pretrained, options.scaling)
    parts = split_plan(plan, ranks.world)
    owners = output_owners(parts)
    planned = time.perf_counter()

    with contextlib.ExitStack() as publish:
        stage = publish.enter_context(staged_directory(out, overwrite=options.overwrite)) if ranks.is_main else None
        if ranks.active:  # every rank writes its files into rank 0's staging folder (a shared filesystem)
            stage = Path(broadcast_text(str(stage) if stage else None))
        writer = None
        try:
            writer = ShardedCheckpointWriter(stage, plan.outputs, max_shard, owner_of=owners.__getitem__,
                                             rank=ranks.rank)
            # The writes of the merged tensors overlap the solves; at most one batch's budget is queued.
            with BackgroundWrites(writer.write, max_pending_bytes=batch_bytes) as sink:
                result = execute_merge(parts[ranks.rank], candidates, settings, sink, device=device, base=base,
                                       progress=options.progress and ranks.is_main, combine=combine)
                finishing = time.perf_counter()
            writer.close()
            result["timings"]["finish_writes"] = time.perf_counter() - finishing  # the queue's tail and fsync
        except BaseException:
            if writer is not None:
                writer.abort()
            if ranks.active:
                all_ok(False)
            raise
        if ranks.active:
            write_json(stage / f"{RANK_RESULT}{ranks.rank}.json", result)
            if not all_ok(True):
                raise RegMeanError("another rank of this merge failed; nothing was published")
            if not ranks.is_main:
                return {}
            result = gather_rank_results(stage, ranks.world)
        copy_model_files(base_folder or candidates[0].model_dir, stage,
                         base_dir=None if base_folder else getattr(candidates[0].weights, "base_dir", None))
        report = build_report(options, settings, plan, candidates, result, device)
        if options.per_candidate:
            report["per_candidate"] = export_per_candidate(stage, open_weights(stage), candidates,
                                                           exclusion(settings.exclude), max_shard,
                                                           progress=options.progress)
        report["timings"]["plan_and_checks"] = planned - started
        report["timings"]["total"] = time.perf_counter() - started
        report["settings"]["ranks"] = ranks.world
        write_cards(stage, report, out.resolve().name)
        write_json(stage / REPORT_NAME, report)
    fallbacks = report["totals"]["fallback_systems"]
    log.info("merge: %d candidates, %d layers solved (%d systems%s), %d averaged, %d copied%s, %.1fs -> %s",
             len(candidates), len(result["layers"]), plan.num_systems,
             f", {fallbacks} through the fallback" if fallbacks else "", len(plan.averaged), len(plan.copied),
             f", over {ranks.world} processes" if ranks.active else "", report["timings"]["total"], out)
    return report


RANK_RESULT = ".rank-result-"


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


# Options that decide which examples each candidate's blocks see under --method regmean++, hence the merged bytes.
BLOCKWISE_DATA = ("split", "text_column", "text_pair_column", "image_column", "num_examples", "seed", "max_length",
                  "batch_size", "include_padding", "dtype", "accumulate_dtype", "messages_column", "prompt_columns",
                  "response_column", "system_column", "tokens", "base_model", "attn_implementation")
# Everything only --method regmean++ reads: its data and its run's resources.
BLOCKWISE_ONLY = ("datasets", *BLOCKWISE_DATA, "num_workers", "activation_memory", "spill_dir", "checkpoint_every",
                  "resume", "trust_remote_code")


def check_blockwise_options(options: MergeOptions) -> None:
    """Data options mean nothing to a merge of caches: given anyway, they are an error, not ignored."""
    defaults = MergeOptions(out="")
    for name in BLOCKWISE_ONLY:
        if getattr(options, name) != getattr(defaults, name):
            flag = "--dataset" if name == "datasets" else "--" + name.replace("_", "-")
            raise RegMeanError(f"{flag}: only --method {BLOCKWISE} reads data while merging (not {options.method}); "
                               "`regmean stats` takes the data options for the other methods")


def check_method_options(options: MergeOptions) -> None:
    """Options that belong to another method are an error, not silently ignored."""
    if options.method == "task-arithmetic":
        if not options.pretrained:
            raise RegMeanError("--method task-arithmetic: needs --pretrained PATH, the model the candidates were "
                               "fine-tuned from")
        if options.scaling is None:
            options.scaling = DEFAULT_SCALING
    elif options.pretrained or options.scaling is not None:
        raise RegMeanError(f"--pretrained/--scaling: only --method task-arithmetic uses them (not {options.method})")


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
        "candidates": [candidate_entry(c) for c in candidates],
        # every option that decides the merged bytes, as given (a model card's config gives them back), and
        # the device, which does not
        "settings": {"method": settings.method, "scaling": options.scaling, "pretrained": options.pretrained,
                     "reduce_non_diagonal_ratio": settings.reduce_non_diagonal_ratio,
                     "gram_weighting": settings.gram_weighting, "exclude": settings.exclude,
                     "solve_dtype": str(settings.solve_dtype).replace("torch.", ""), "device": str(device),
                     "base": options.base, "cache_dir": options.cache_dir, "caches": list(options.caches),
                     "models": dict(options.models), "coefficients": dict(options.coefficients),
                     "per_candidate": options.per_candidate, "max_shard_size": options.max_shard_size,
                     "batch_memory": options.batch_memory},
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


def candidate_entry(candidate: Candidate) -> dict:
    """A candidate in the report: where its weights and Grams came from, and what they were measured on."""
    manifest = candidate.grams.manifest if candidate.grams else None
    return {"name": candidate.name, "reference": candidate.reference, "cache": candidate.where if manifest else None,
            "weights": candidate.weights.reference, "coefficient": candidate.coefficient,
            # plan_merge checked a cache's fingerprint against the weights; without a cache, take it here
            "fingerprint": manifest.model["fingerprint"] if manifest else fingerprint(candidate.weights),
            "dataset": manifest.dataset if manifest else None, "examples": manifest.examples if manifest else None}


def write_cards(folder: Path, report: dict, name: str) -> None:
    """README.md model cards: the merged model's, and each per-candidate model's."""
    write_card(folder, report, model_name=name)
    for candidate, relative in report.get("per_candidate", {}).items():
        write_card(folder / relative, report, model_name=f"{name}-{candidate}", candidate=candidate)
