"""Stage 1: run a candidate over its task data and write its Gram cache (several candidates: one
after another in one process, stages/stats_candidates.py)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from regmean_pipeline import __version__
from regmean_pipeline.cache.manifest import MANIFEST_NAME, STORAGE_FORMATS, Manifest, manifest_from_stats, read_manifest
from regmean_pipeline.cache.shards import ShardSpec
from regmean_pipeline.cache.statistics import parse_statistics
from regmean_pipeline.cache.store import write_cache
from regmean_pipeline.distributed import Ranks, launched_ranks, process_group, rank_device, share
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.adapters import is_adapter
from regmean_pipeline.io.atomic import check_folder_target, output_lock, published_folder
from regmean_pipeline.io.model_folder import parse_size
from regmean_pipeline.io.storage import Folder
from regmean_pipeline.io.weights import adapter_base_dir, fingerprint, open_weights, resolve_model_dir
from regmean_pipeline.measure.checkpoint import StatsCheckpoints
from regmean_pipeline.measure.data import DatasetSpec, examples_digest, load_examples, make_loader
from regmean_pipeline.measure.fisher import ESTIMATORS as FISHER_ESTIMATORS
from regmean_pipeline.measure.fisher import FisherAccumulator
from regmean_pipeline.measure.gram import collect_grams
from regmean_pipeline.measure.linear import find_linear_layers
from regmean_pipeline.measure.models import (
    architecture_of,
    check_finite_parameters,
    config_summary,
    forward_inputs,
    load_model,
    load_preprocessor,
    parse_dtype,
    resolve_device,
    tied_parameter_names,
)
from regmean_pipeline.measure.passes import collect_grams_in_passes
from regmean_pipeline.measure.ranks import sum_fisher_stats, sum_gram_stats
from stages.stats_candidates import StatsCandidate

log = logging.getLogger(__name__)


@dataclass
class StatsOptions:
    model: str
    dataset: str
    out: str
    split: str = "train"
    text_column: str | None = None
    text_pair_column: str | None = None
    image_column: str | None = None
    num_examples: int = 256
    batch_size: int = 32
    max_length: int | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    accumulate_dtype: str = "float32"
    include_padding: bool = False
    format: str = "zarr"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    overwrite: bool = False
    progress: bool = True
    shard: str | None = None  # "I/N": this job's share of the examples, written to OUT/shard-I-of-N
    device_map: str | None = None  # accelerate device map ("auto"): the model spread over GPUs and CPU
    max_gram_memory: str | None = None  # bound on all accumulators together; more passes when exceeded
    checkpoint_every: int = 0  # save a checkpoint every N batches (0: never)
    resume: bool = False  # continue from the checkpoint an interrupted run left
    messages_column: str | None = None  # chat data (see DatasetSpec)
    prompt_columns: list[str] = field(default_factory=list)
    response_column: str | None = None
    system_column: str | None = None
    target_column: str | None = None  # an encoder-decoder's labels
    tokens: str = "all"  # "response": only the assistant's tokens count
    base_model: str | None = None  # a LoRA adapter's base, instead of the one its config names
    attn_implementation: str | None = None  # passed to from_pretrained (sdpa, flash_attention_2, eager)
    statistics: str = "gram"  # what to measure: gram, fisher, or both ("gram,fisher")
    fisher_estimator: str = "per-example"  # measure/fisher.py: per-example (Matena & Raffel) or batch (FusionBench)


def run_stats(options: StatsOptions) -> Manifest:
    """One stats job; under torchrun, one rank of it (the ranks split the examples, rank 0 writes).

    The writing process holds the local OUT's lock throughout, so a second run on it stops at once.
    """
    with process_group() as ranks:
        out = _target(options)
        locked = out.is_local and ranks.is_main
        with output_lock(out.local_path) if locked else contextlib.nullcontext():
            return _run_stats(options, ranks)


def run_stats_candidates(candidates: list[StatsCandidate], options: StatsOptions) -> dict[str, Manifest]:
    """Several candidates one after another in this one process, so the interpreter and the imports
    start once; candidate NAME is written to OUT/NAME exactly as its own ``regmean stats --model M
    --dataset D --out OUT/NAME`` with the same options would write it (same bytes of every Gram; each
    published atomically, under its own lock). ``options.model``/``dataset`` are not used.

    Every target is checked before the first candidate runs. Per candidate, as for one: --resume
    takes up what an interrupted call left (finished candidates are checked and kept, an interrupted
    one continues from its checkpoint beside OUT/NAME), --shard I/N writes OUT/NAME/shard-I-of-N.
    Not under torchrun, whose processes split one candidate's examples between them.
    """
    if launched_ranks().active:
        raise RegMeanError("several candidates run one after another in one process, not under torchrun (its "
                           "processes split one candidate's examples); launch one torchrun per candidate")
    root = Folder(options.out)
    if root.exists(MANIFEST_NAME):
        raise RegMeanError(f"--out {root}: is a stats cache itself; several candidates are written to OUT/NAME/, "
                           "so give the folder that is to hold them")
    runs = {c.name: replace(options, model=c.model, dataset=c.dataset, out=str(root.child(c.name)))
            for c in candidates}
    for run in runs.values():
        resolve_model_dir(run.model)
        check_stats_target(_target(run), run)
    manifests = {}
    cuda = list(range(torch.cuda.device_count()))
    for index, (name, run) in enumerate(runs.items(), 1):
        log.info("stats: candidate %d of %d, %s", index, len(runs), name)
        with torch.random.fork_rng(devices=cuda):  # each candidate starts from the RNG state the process had
            manifests[name] = run_stats(run)
    return manifests


def check_stats_target(out: Folder, options: StatsOptions) -> None:
    """Fail before any work when OUT may not be written (it exists, or holds an interrupted run's checkpoint)."""
    if not (options.resume and out.exists()):
        check_folder_target(out, overwrite=options.overwrite)
    if out.is_local and StatsCheckpoints(out.local_path, {}).exists() and not (options.resume or options.overwrite):
        raise RegMeanError(f"{out}: an interrupted run left a checkpoint; pass --resume to continue it, "
                           "or --overwrite to start over")


def _target(options: StatsOptions) -> Folder:
    out = Folder(options.out)
    return out.child(ShardSpec.parse(options.shard).folder_name) if options.shard else out


@dataclass
class _Run:
    """A stats run's settings, checked before anything is loaded."""

    out: Folder
    shard: ShardSpec | None
    budget: int | None
    checkpointed: bool
    statistics: list[str]
    forward_dtype: torch.dtype
    accumulate_dtype: torch.dtype
    device: torch.device


def _checked_run(options: StatsOptions, ranks: Ranks) -> _Run:
    shard = ShardSpec.parse(options.shard) if options.shard else None
    out = _target(options)
    budget = _gram_budget(options.max_gram_memory)
    checkpointed = bool(options.checkpoint_every or options.resume)
    if checkpointed and (ranks.active or budget is not None or not out.is_local):
        raise RegMeanError("--checkpoint-every/--resume: for one process writing a local OUT in one pass (not under "
                           "torchrun, with --max-gram-memory, or to an object store); use --shard jobs instead")
    if options.format not in STORAGE_FORMATS:
        raise RegMeanError(f"--format: {options.format!r} is not one of {', '.join(STORAGE_FORMATS)}")
    if options.accumulate_dtype not in ("float32", "float64"):
        raise RegMeanError("--accumulate-dtype: must be float32 or float64")
    if options.fisher_estimator not in FISHER_ESTIMATORS:
        raise RegMeanError(f"--fisher-estimator: {options.fisher_estimator!r} is not one of "
                           f"{', '.join(FISHER_ESTIMATORS)}")
    if options.device_map and ranks.active:
        raise RegMeanError("--device-map: spreads one process's model over the devices; under torchrun each rank "
                           "already takes its own GPU, so leave --device-map out there")
    return _Run(out, shard, budget, checkpointed, parse_statistics(options.statistics),
                parse_dtype(options.dtype), parse_dtype(options.accumulate_dtype, "--accumulate-dtype"),
                resolve_device(rank_device(ranks, options.device)))


def _run_stats(options: StatsOptions, ranks: Ranks) -> Manifest:
    started = time.perf_counter()
    run = _checked_run(options, ranks)
    check_stats_target(run.out, options)
    folder = resolve_model_dir(options.model)
    weights_fingerprint = fingerprint(open_weights(folder, allow_pickle=options.allow_pickle,
                                                   base_model=options.base_model)) if ranks.is_main else ""
    spec = DatasetSpec.from_options(options.dataset, options)
    examples = select_share(load_examples(spec, images=options.image_column is not None), run.shard, ranks)
    identity = {"fingerprint": weights_fingerprint, "dataset": spec.as_dict(),
                "examples": examples_digest(examples, spec) if run.checkpointed else "",
                "batch_size": options.batch_size, "include_padding": options.include_padding, "dtype": options.dtype,
                "accumulate_dtype": options.accumulate_dtype, "shard": options.shard,
                **({} if run.statistics == ["gram"] else {"statistics": run.statistics,
                                                          "fisher_estimator": options.fisher_estimator})}
    if options.resume and run.out.exists():
        return _already_complete(run.out.local_path, identity)
    model, preprocessor = _loaded_model(options, folder, run)
    manifest_of = _manifest_maker(options, folder, model, spec, weights_fingerprint)
    checkpoints = StatsCheckpoints(run.out.local_path, identity, every=options.checkpoint_every,
                                   manifest_of=manifest_of) if run.checkpointed else None
    grams, fisher = _measure(options, run, model, preprocessor, spec, examples, checkpoints, ranks)
    manifest = manifest_of(grams, fisher)
    manifest.shard = run.shard.as_dict() if run.shard is not None else None
    if not ranks.is_main:
        return manifest
    with published_folder(run.out, overwrite=options.overwrite, ready_marker=MANIFEST_NAME) as stage:
        write_cache(stage, manifest, grams.sums if grams is not None else {},
                    fisher.sums if fisher is not None else None)
    if checkpoints is not None:
        checkpoints.clear()
    tokens = sum(entry.tokens for entry in manifest.grams.values())
    log.info("stats: %d examples%s, %s: %d linear layers -> %d Grams (%s rows), %d Fisher arrays, %.1fs -> %s",
             manifest.examples, f" over {ranks.world} processes" if ranks.active else "", ", ".join(run.statistics),
             len(manifest.layers), len(manifest.grams), f"{tokens:,}", len(manifest.fisher),
             time.perf_counter() - started, run.out)
    return manifest


def _loaded_model(options: StatsOptions, folder: Path, run: _Run):
    """The candidate with its own head, checked for finite weights, and its tokenizer or image processor."""
    model = load_model(folder, dtype=run.forward_dtype, device=run.device, trust_remote_code=options.trust_remote_code,
                       allow_pickle=options.allow_pickle, device_map=options.device_map,
                       base_model=options.base_model, attn_implementation=options.attn_implementation)
    check_finite_parameters(model, str(folder))
    if options.device_map:
        run.device = input_device(model)
    images = options.image_column is not None
    preprocessor = load_preprocessor(folder, images=images, trust_remote_code=options.trust_remote_code,
                                     base_model=options.base_model)
    if not images and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = preprocessor.pad_token_id  # sequence-classification heads need it to pool
    return model, preprocessor


def _manifest_maker(options: StatsOptions, folder: Path, model, spec: DatasetSpec, weights_fingerprint: str):
    """The manifest of what was measured, for the cache and for each checkpoint."""
    base_dir = adapter_base_dir(folder, options.base_model) if is_adapter(folder) else None
    reference = options.model if not Path(options.model).expanduser().exists() else str(folder)
    described = {"reference": reference, "architecture": architecture_of(model.config),
                 "model_type": getattr(model.config, "model_type", ""), "fingerprint": weights_fingerprint,
                 "config": config_summary(model.config), **({"base_model": str(base_dir)} if base_dir else {})}
    measured = set(parse_statistics(options.statistics))

    def manifest_of(grams, fisher) -> Manifest:
        return manifest_from_stats(
            grams if "gram" in measured else None, model=described, dataset=spec.as_dict(),
            storage=options.format, forward_dtype=options.dtype, accumulate_dtype=options.accumulate_dtype,
            include_padding=options.include_padding, tool=f"regmean-pipeline {__version__}",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            fisher=fisher if "fisher" in measured else None)

    return manifest_of


def _measure(options: StatsOptions, run: _Run, model, preprocessor, spec: DatasetSpec, examples,
             checkpoints: StatsCheckpoints | None, ranks: Ranks):
    """The statistics asked for, over this job's share of the examples, summed over the ranks: one pass
    (resumable from a checkpoint), or several under --max-gram-memory."""
    resumed = checkpoints.load({layer.name: layer for layer in find_linear_layers(model)}) if options.resume else None
    if checkpoints is not None and not options.resume:
        checkpoints.clear()  # --overwrite: an old checkpoint must not be mixed into this run
    if options.resume and resumed is None:
        log.info("--resume: no checkpoint for %s; starting from the first batch", run.out)
    fisher = FisherAccumulator(model, estimator=options.fisher_estimator, accumulate_dtype=run.accumulate_dtype) \
        if "fisher" in run.statistics else None
    if fisher is not None and resumed is not None and resumed.fisher is not None:
        fisher.restore(resumed.fisher, run.device)
    batches = make_loader(examples, preprocessor, spec, accepted=forward_inputs(model), config=model.config,
                          batch_size=options.batch_size, num_workers=options.num_workers,
                          skip_batches=resumed.batches if resumed else 0, counts=resumed.counts if resumed else None)
    grams_wanted = "gram" in run.statistics
    with tqdm(total=len(examples), initial=min(len(examples), batches.consumed * options.batch_size),
              desc=f"stats {run.out.name}", unit="ex", disable=not options.progress or not ranks.is_main) as bar:
        if run.budget is None or not grams_wanted:
            save = None if checkpoints is None else lambda acc: checkpoints.maybe_save(
                batches.consumed, lambda: (acc.snapshot(), fisher.snapshot() if fisher else None), batches.counts)
            grams = collect_grams(model, batches, device=run.device, include_padding=options.include_padding,
                                  accumulate_dtype=run.accumulate_dtype, progress=bar,
                                  start=resumed.stats if resumed else None, after_batch=save, fisher=fisher,
                                  grams=grams_wanted)
        else:
            grams = collect_grams_in_passes(model, batches, device=run.device, budget=run.budget,
                                            include_padding=options.include_padding,
                                            accumulate_dtype=run.accumulate_dtype, progress=bar, fisher=fisher)
    batches.log_counts(f"dataset {spec.path}")
    if grams.examples == 0:
        raise RegMeanError(f"dataset {spec.path}: no usable examples (all {len(examples)} were skipped)")
    grams = grams.without_weights(tied_parameter_names(model)) if grams_wanted else None
    fisher = fisher.result() if fisher is not None else None
    if ranks.active:
        grams = sum_gram_stats(grams) if grams is not None else None
        fisher = sum_fisher_stats(fisher) if fisher is not None else None
    return grams, fisher


def select_share(examples, shard: ShardSpec | None, ranks: Ranks):
    """This job's examples: the shard's share of the seeded selection, then this rank's share of that.

    Shares are contiguous and disjoint, so N shards (or N ranks) together see exactly the examples one
    process would, and their Gram sums add up to its cache.
    """
    indices = range(len(examples))
    for index, parts, what in ((shard.index, shard.count, "--shard") if shard else (0, 1, ""),
                               (ranks.rank, ranks.world, "torchrun processes")):
        if parts > len(indices):
            raise RegMeanError(f"{what}: {len(indices)} examples cannot be split into {parts} non-empty shares")
        part = share(len(indices), index, parts)
        indices = indices[part.start:part.stop]
    return examples if len(indices) == len(examples) else examples.select(indices)


def input_device(model) -> torch.device:
    """Where a device-mapped model takes its inputs: the device of its input embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    parameter = next(embeddings.parameters()) if embeddings is not None else next(model.parameters())
    return parameter.device


def _gram_budget(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise RegMeanError(f"--max-gram-memory: {exc}") from None


def _already_complete(out: Path, identity: dict) -> Manifest:
    """--resume on a finished OUT (a run killed between publishing and cleaning up): done, if it is the
    same run's output; its leftover checkpoint goes."""
    manifest = read_manifest(out)
    if manifest.model.get("fingerprint") != identity["fingerprint"] or manifest.dataset != identity["dataset"]:
        raise RegMeanError(f"{out}: already exists and holds another run's cache; pass --overwrite to replace it")
    StatsCheckpoints(out, identity).clear()
    log.info("stats: %s is already complete", out)
    return manifest
