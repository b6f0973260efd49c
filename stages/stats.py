"""Stage 1: run one candidate over its task data and write its Gram cache."""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from regmean_pipeline import __version__
from regmean_pipeline.atomic import check_target, staged_directory
from regmean_pipeline.cache import write_cache
from regmean_pipeline.data import DatasetSpec, load_examples, make_loader
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.gram import collect_grams
from regmean_pipeline.manifest import STORAGE_FORMATS, Manifest, manifest_from_stats
from regmean_pipeline.models import (architecture_of, forward_inputs, load_model, load_preprocessor, parse_dtype,
                                     resolve_device, tied_parameter_names)
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


def run_stats(options: StatsOptions) -> Manifest:
    started = time.perf_counter()
    out = Path(options.out)
    if options.format not in STORAGE_FORMATS:
        raise RegMeanError(f"--format: {options.format!r} is not one of {', '.join(STORAGE_FORMATS)}")
    accumulate_dtype = parse_dtype(options.accumulate_dtype, "--accumulate-dtype")
    if options.accumulate_dtype not in ("float32", "float64"):
        raise RegMeanError("--accumulate-dtype: must be float32 or float64")
    forward_dtype = parse_dtype(options.dtype)
    device = resolve_device(options.device)
    check_target(out, overwrite=options.overwrite)

    folder = resolve_model_dir(options.model)
    weights_fingerprint = fingerprint(open_weights(folder, allow_pickle=options.allow_pickle))
    images = options.image_column is not None
    dataset = str(Path(options.dataset).expanduser().resolve()) if Path(options.dataset).expanduser().exists() \
        else options.dataset
    spec = DatasetSpec(dataset, options.split, options.text_column, options.text_pair_column,
                       options.image_column, options.num_examples, options.seed, options.max_length)
    examples = load_examples(spec, images=images)
    model = load_model(folder, dtype=forward_dtype, device=device, trust_remote_code=options.trust_remote_code,
                       allow_pickle=options.allow_pickle)
    preprocessor = load_preprocessor(folder, images=images, trust_remote_code=options.trust_remote_code)
    if not images and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = preprocessor.pad_token_id  # sequence-classification heads need it to pool
    loader = make_loader(examples, preprocessor, spec, accepted=forward_inputs(model), config=model.config,
                         batch_size=options.batch_size, num_workers=options.num_workers)

    with tqdm(total=len(examples), desc=f"stats {out.name}", unit="ex", disable=not options.progress) as bar:
        stats = collect_grams(model, loader, device=device, include_padding=options.include_padding,
                              accumulate_dtype=accumulate_dtype, progress=bar)
    stats = stats.without_weights(tied_parameter_names(model))
    reference = options.model if not Path(options.model).expanduser().exists() else str(folder)
    manifest = manifest_from_stats(
        stats,
        model={"reference": reference, "architecture": architecture_of(model.config),
               "model_type": getattr(model.config, "model_type", ""), "fingerprint": weights_fingerprint},
        dataset=spec.as_dict(),
        storage=options.format, forward_dtype=options.dtype, accumulate_dtype=options.accumulate_dtype,
        include_padding=options.include_padding, tool=f"regmean-pipeline {__version__}",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    with staged_directory(out, overwrite=options.overwrite) as stage:
        write_cache(stage, manifest, stats.sums)
    tokens = sum(entry.tokens for entry in manifest.grams.values())
    log.info("stats: %d examples, %d linear layers -> %d Grams (%s rows), %.1fs -> %s", manifest.examples,
             len(manifest.layers), len(manifest.grams), f"{tokens:,}", time.perf_counter() - started, out)
    return manifest
