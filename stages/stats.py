"""Stage 1: run one candidate over its task data and write its Gram cache."""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from regmean_pipeline import __version__
from regmean_pipeline.atomic import check_target, output_lock, staged_directory
from regmean_pipeline.cache import write_cache
from regmean_pipeline.checkpoint import StatsCheckpoints
from regmean_pipeline.data import DatasetSpec, examples_digest, load_examples, make_loader
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.gram import collect_grams
from regmean_pipeline.linear import find_linear_layers
from regmean_pipeline.manifest import STORAGE_FORMATS, Manifest, manifest_from_stats, read_manifest
from regmean_pipeline.models import (architecture_of, check_finite_parameters, config_summary, forward_inputs,
                                     load_model, load_preprocessor, parse_dtype, resolve_device,
                                     tied_parameter_names)
from regmean_pipeline.weights import fingerprint, open_weights, resolve_model_dir

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
    checkpoint_every: int = 0  # save a checkpoint every N batches (0: never)
    resume: bool = False  # continue from the checkpoint an interrupted run left


def run_stats(options: StatsOptions) -> Manifest:
    """One stats run; it holds OUT's lock throughout, so a second run on the same OUT stops at once."""
    with output_lock(Path(options.out)):
        return _run_stats(options)


def _run_stats(options: StatsOptions) -> Manifest:
    started = time.perf_counter()
    out = Path(options.out)
    if options.format not in STORAGE_FORMATS:
        raise RegMeanError(f"--format: {options.format!r} is not one of {', '.join(STORAGE_FORMATS)}")
    accumulate_dtype = parse_dtype(options.accumulate_dtype, "--accumulate-dtype")
    if options.accumulate_dtype not in ("float32", "float64"):
        raise RegMeanError("--accumulate-dtype: must be float32 or float64")
    forward_dtype = parse_dtype(options.dtype)
    device = resolve_device(options.device)
    if not (options.resume and out.exists()):
        check_target(out, overwrite=options.overwrite)
    if StatsCheckpoints(out, {}).exists() and not (options.resume or options.overwrite):
        raise RegMeanError(f"{out}: an interrupted run left a checkpoint; pass --resume to continue it, "
                           "or --overwrite to start over")

    folder = resolve_model_dir(options.model)
    weights_fingerprint = fingerprint(open_weights(folder, allow_pickle=options.allow_pickle))
    images = options.image_column is not None
    dataset = str(Path(options.dataset).expanduser().resolve()) if Path(options.dataset).expanduser().exists() \
        else options.dataset
    spec = DatasetSpec(dataset, options.split, options.text_column, options.text_pair_column,
                       options.image_column, options.num_examples, options.seed, options.max_length)
    examples = load_examples(spec, images=images)
    identity = {"fingerprint": weights_fingerprint, "dataset": spec.as_dict(),
                "examples": examples_digest(examples, spec), "batch_size": options.batch_size,
                "include_padding": options.include_padding, "dtype": options.dtype,
                "accumulate_dtype": options.accumulate_dtype}
    if options.resume and out.exists():
        return _already_complete(out, identity)
    model = load_model(folder, dtype=forward_dtype, device=device, trust_remote_code=options.trust_remote_code,
                       allow_pickle=options.allow_pickle)
    check_finite_parameters(model, str(folder))
    preprocessor = load_preprocessor(folder, images=images, trust_remote_code=options.trust_remote_code)
    if not images and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = preprocessor.pad_token_id  # sequence-classification heads need it to pool
    reference = options.model if not Path(options.model).expanduser().exists() else str(folder)

    def manifest_of(stats) -> Manifest:
        return manifest_from_stats(
            stats,
            model={"reference": reference, "architecture": architecture_of(model.config),
                   "model_type": getattr(model.config, "model_type", ""), "fingerprint": weights_fingerprint,
                   "config": config_summary(model.config)},
            dataset=spec.as_dict(),
            storage=options.format, forward_dtype=options.dtype, accumulate_dtype=options.accumulate_dtype,
            include_padding=options.include_padding, tool=f"regmean-pipeline {__version__}",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )

    checkpoints = StatsCheckpoints(out, identity, every=options.checkpoint_every, manifest_of=manifest_of)
    if not options.resume:
        checkpoints.clear()  # --overwrite: an old checkpoint must not be mixed into this run
    resumed = checkpoints.load({layer.name: layer for layer in find_linear_layers(model)}) if options.resume else None
    if options.resume and resumed is None:
        log.info("--resume: no checkpoint for %s; starting from the first batch", out)
    batches = make_loader(examples, preprocessor, spec, accepted=forward_inputs(model), config=model.config,
                          batch_size=options.batch_size, num_workers=options.num_workers,
                          skip_batches=resumed.batches if resumed else 0, counts=resumed.counts if resumed else None)

    with tqdm(total=len(examples), initial=min(len(examples), batches.consumed * options.batch_size),
              desc=f"stats {out.name}", unit="ex", disable=not options.progress) as bar:
        stats = collect_grams(
            model, batches, device=device, include_padding=options.include_padding,
            accumulate_dtype=accumulate_dtype, progress=bar, start=resumed.stats if resumed else None,
            after_batch=lambda acc: checkpoints.maybe_save(batches.consumed, acc.snapshot, batches.counts))
    batches.log_counts(f"dataset {spec.path}")
    if stats.examples == 0:
        raise RegMeanError(f"dataset {spec.path}: no usable examples (all {len(examples)} were skipped)")
    stats = stats.without_weights(tied_parameter_names(model))
    manifest = manifest_of(stats)
    with staged_directory(out, overwrite=options.overwrite) as stage:
        write_cache(stage, manifest, stats.sums)
    checkpoints.clear()
    tokens = sum(entry.tokens for entry in manifest.grams.values())
    log.info("stats: %d examples, %d linear layers -> %d Grams (%s rows), %.1fs -> %s", manifest.examples,
             len(manifest.layers), len(manifest.grams), f"{tokens:,}", time.perf_counter() - started, out)
    return manifest


def _already_complete(out: Path, identity: dict) -> Manifest:
    """--resume on a finished OUT (a run killed between publishing and cleaning up): done, if it is the
    same run's output; its leftover checkpoint goes."""
    manifest = read_manifest(out)
    if manifest.model.get("fingerprint") != identity["fingerprint"] or manifest.dataset != identity["dataset"]:
        raise RegMeanError(f"{out}: already exists and holds another run's cache; pass --overwrite to replace it")
    StatsCheckpoints(out, identity).clear()
    log.info("stats: %s is already complete", out)
    return manifest
