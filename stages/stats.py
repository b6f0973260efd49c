"""Stage 1: run one candidate over its task data and write its Gram cache."""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from regmean_pipeline import __version__
from regmean_pipeline.atomic import check_folder_target, published_folder
from regmean_pipeline.cache import write_cache
from regmean_pipeline.data import DatasetSpec, load_examples, make_loader
from regmean_pipeline.distributed import Ranks, process_group, rank_device, share, sum_gram_stats
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.gram import collect_grams
from regmean_pipeline.gram_passes import collect_grams_in_passes
from regmean_pipeline.hf_output import parse_size
from regmean_pipeline.manifest import MANIFEST_NAME, STORAGE_FORMATS, Manifest, manifest_from_stats
from regmean_pipeline.models import (architecture_of, forward_inputs, load_model, load_preprocessor, parse_dtype,
                                     resolve_device, tied_parameter_names)
from regmean_pipeline.shards import ShardSpec
from regmean_pipeline.storage import Folder
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
    shard: str | None = None  # "I/N": this job's share of the examples, written to OUT/shard-I-of-N
    device_map: str | None = None  # accelerate device map ("auto"): the model spread over GPUs and CPU
    max_gram_memory: str | None = None  # bound on all accumulators together; more passes when exceeded


def run_stats(options: StatsOptions) -> Manifest:
    """One stats job; under torchrun, one rank of it (the ranks split the examples, rank 0 writes)."""
    with process_group() as ranks:
        return _run_stats(options, ranks)


def _run_stats(options: StatsOptions, ranks: Ranks) -> Manifest:
    started = time.perf_counter()
    shard = ShardSpec.parse(options.shard) if options.shard else None
    out = Folder(options.out)
    if shard is not None:
        out = out.child(shard.folder_name)
    budget = _gram_budget(options.max_gram_memory)
    if options.format not in STORAGE_FORMATS:
        raise RegMeanError(f"--format: {options.format!r} is not one of {', '.join(STORAGE_FORMATS)}")
    accumulate_dtype = parse_dtype(options.accumulate_dtype, "--accumulate-dtype")
    if options.accumulate_dtype not in ("float32", "float64"):
        raise RegMeanError("--accumulate-dtype: must be float32 or float64")
    forward_dtype = parse_dtype(options.dtype)
    if options.device_map and ranks.active:
        raise RegMeanError("--device-map: spreads one process's model over the devices; under torchrun each rank "
                           "already takes its own GPU, so leave --device-map out there")
    device = resolve_device(rank_device(ranks, options.device))
    check_folder_target(out, overwrite=options.overwrite)

    folder = resolve_model_dir(options.model)
    weights_fingerprint = fingerprint(open_weights(folder, allow_pickle=options.allow_pickle)) if ranks.is_main else ""
    images = options.image_column is not None
    dataset = str(Path(options.dataset).expanduser().resolve()) if Path(options.dataset).expanduser().exists() \
        else options.dataset
    spec = DatasetSpec(dataset, options.split, options.text_column, options.text_pair_column,
                       options.image_column, options.num_examples, options.seed, options.max_length)
    examples = select_share(load_examples(spec, images=images), shard, ranks)
    model = load_model(folder, dtype=forward_dtype, device=device, trust_remote_code=options.trust_remote_code,
                       allow_pickle=options.allow_pickle, device_map=options.device_map)
    if options.device_map:
        device = input_device(model)
    preprocessor = load_preprocessor(folder, images=images, trust_remote_code=options.trust_remote_code)
    if not images and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = preprocessor.pad_token_id  # sequence-classification heads need it to pool
    loader = make_loader(examples, preprocessor, spec, accepted=forward_inputs(model), config=model.config,
                         batch_size=options.batch_size, num_workers=options.num_workers)

    with tqdm(total=len(examples), desc=f"stats {out.name}", unit="ex",
              disable=not options.progress or not ranks.is_main) as bar:
        if budget is None:
            stats = collect_grams(model, loader, device=device, include_padding=options.include_padding,
                                  accumulate_dtype=accumulate_dtype, progress=bar)
        else:
            stats = collect_grams_in_passes(model, loader, device=device, budget=budget,
                                            include_padding=options.include_padding,
                                            accumulate_dtype=accumulate_dtype, progress=bar)
    stats = stats.without_weights(tied_parameter_names(model))
    if ranks.active:
        stats = sum_gram_stats(stats)
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
    manifest.shard = shard.as_dict() if shard is not None else None
    if not ranks.is_main:
        return manifest
    with published_folder(out, overwrite=options.overwrite, ready_marker=MANIFEST_NAME) as stage:
        write_cache(stage, manifest, stats.sums)
    tokens = sum(entry.tokens for entry in manifest.grams.values())
    log.info("stats: %d examples%s, %d linear layers -> %d Grams (%s rows), %.1fs -> %s", manifest.examples,
             f" over {ranks.world} processes" if ranks.active else "", len(manifest.layers), len(manifest.grams),
             f"{tokens:,}", time.perf_counter() - started, out)
    return manifest


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
