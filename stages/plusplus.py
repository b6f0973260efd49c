"""`regmean merge --method regmean++`: measure and merge block by block in one run, then write the model.

This method cannot be split into independent per-candidate jobs (each block's Grams need the merged
blocks before it), so it reads no caches: every candidate comes with its model and its examples. Under
torchrun the candidates are spread over the ranks; a candidate's examples, activations and Grams stay on
its rank, and only the sums the solves need cross between ranks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from regmean_pipeline.distributed import Ranks, all_ok, process_group, rank_device
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.adapters import is_adapter
from regmean_pipeline.io.atomic import check_target, output_lock, staged_directory
from regmean_pipeline.io.model_folder import copy_model_files, parse_size, write_json
from regmean_pipeline.io.safetensors_io import ShardedCheckpointWriter
from regmean_pipeline.io.weights import adapter_base_dir, open_weights, resolve_model_dir
from regmean_pipeline.measure.data import DatasetSpec, load_examples, make_loader
from regmean_pipeline.measure.models import (
    architecture_of,
    config_summary,
    forward_inputs,
    load_config,
    load_preprocessor,
    parse_dtype,
    resolve_device,
)
from regmean_pipeline.merge.per_candidate import export_per_candidate
from regmean_pipeline.merge.plan import Candidate, MergeSettings, exclusion, plan_merge
from regmean_pipeline.plusplus.checkpoint import BlockwiseCheckpoints
from regmean_pipeline.plusplus.collective import collective_for
from regmean_pipeline.plusplus.runner import BlockwiseCandidate, BlockwiseMerge, BlockwiseSettings
from regmean_pipeline.plusplus.skeleton import empty_model
from stages.merge import BLOCKWISE_DATA, REPORT_NAME, MergeOptions, build_report, write_cards

log = logging.getLogger(__name__)


def run_plusplus(options: MergeOptions) -> dict:
    with process_group() as ranks:
        with output_lock(Path(options.out)) if ranks.is_main else contextlib.nullcontext():
            return _run(options, ranks)


def _check_options(options: MergeOptions, ranks: Ranks) -> None:
    if options.cache_dir or options.caches:
        raise RegMeanError("--cache-dir/--cache: --method regmean++ measures its Grams block by block while it "
                           "merges and reads no caches; give each candidate as --model NAME=PATH --dataset NAME=PATH")
    if options.pretrained or options.scaling is not None:
        raise RegMeanError("--pretrained/--scaling: only --method task-arithmetic uses them (not regmean++)")
    for flag, given, other, other_flag in (("--dataset", options.datasets, options.models, "--model"),
                                           ("--model", options.models, options.datasets, "--dataset")):
        unmatched = [name for name in given if name not in other]
        if unmatched:
            raise RegMeanError(f"{flag} {unmatched[0]}=...: no {other_flag} {unmatched[0]}=PATH; --method regmean++ "
                               "needs both for every candidate")
    if not options.models:
        raise RegMeanError("--method regmean++: give every candidate as --model NAME=PATH --dataset NAME=PATH")
    unknown = sorted(set(options.coefficients) - set(options.models))
    if unknown:
        raise RegMeanError(f"--coefficient {unknown[0]}=...: no candidate has that name "
                           f"(candidates: {', '.join(options.models)})")
    if ranks.world > len(options.models):
        raise RegMeanError(f"torchrun: {ranks.world} processes for {len(options.models)} candidates; RegMean++ "
                           "spreads candidates over processes, so use at most one process per candidate")
    if options.checkpoint_every < 0:
        raise RegMeanError(f"--checkpoint-every: must be 0 (off) or a number of blocks, got {options.checkpoint_every}")
    if (options.checkpoint_every or options.resume) and ranks.active:
        raise RegMeanError("--checkpoint-every/--resume: for one process; under torchrun rerun the whole merge")


def _candidate_batches(name: str, folder: Path, config, options: MergeOptions) -> list[dict[str, torch.Tensor]]:
    """The candidate's examples as model inputs, selected and batched as `regmean stats` does."""
    images = options.image_column is not None
    spec = DatasetSpec.from_options(options.datasets[name], options)
    examples = load_examples(spec, images=images)
    preprocessor = load_preprocessor(folder, images=images, trust_remote_code=options.trust_remote_code,
                                     base_model=options.base_model)
    if not images and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = preprocessor.pad_token_id  # sequence-classification heads need it to pool
    model = empty_model(config, dtype=torch.float32, trust_remote_code=options.trust_remote_code)
    loader = make_loader(examples, preprocessor, spec, accepted=forward_inputs(model), config=config,
                         batch_size=options.batch_size, num_workers=options.num_workers)
    batches = list(loader)
    loader.log_counts(f"dataset {spec.path}")
    if not batches:
        raise RegMeanError(f"dataset {spec.path}: no usable examples (all {len(examples)} were skipped)")
    return batches


def _identity(options: MergeOptions, candidates: list[Candidate]) -> dict:
    """What decides a run's result: a checkpoint of another run is refused on --resume."""
    from regmean_pipeline.io.weights import fingerprint

    fields = ("datasets", *BLOCKWISE_DATA, "exclude", "reduce_non_diagonal_ratio", "gram_weighting", "solve_dtype",
              "coefficients", "base")
    return {"candidates": {c.name: fingerprint(c.weights) for c in candidates},
            **{name: getattr(options, name) for name in fields}}


def _run(options: MergeOptions, ranks: Ranks) -> dict:
    started = time.perf_counter()
    _check_options(options, ranks)
    out = Path(options.out)
    checkpoints = BlockwiseCheckpoints(out, every=options.checkpoint_every) \
        if options.checkpoint_every or options.resume else None
    check_target(out, overwrite=options.overwrite)
    try:
        max_shard = parse_size(options.max_shard_size)
        batch_bytes = parse_size(options.batch_memory)
        activation_memory = parse_size(options.activation_memory)
    except ValueError as exc:
        raise RegMeanError(f"--max-shard-size/--batch-memory/--activation-memory: {exc}") from None
    settings = MergeSettings(options.reduce_non_diagonal_ratio, options.gram_weighting, list(options.exclude),
                             parse_dtype(options.solve_dtype, "--solve-dtype"), batch_bytes, method="regmean++")
    forward_dtype = parse_dtype(options.dtype)
    accumulate_dtype = parse_dtype(options.accumulate_dtype, "--accumulate-dtype")
    if options.accumulate_dtype not in ("float32", "float64"):
        raise RegMeanError("--accumulate-dtype: must be float32 or float64")
    device = resolve_device(rank_device(ranks, options.device))

    candidates, configs = [], []
    for name, reference in options.models.items():
        folder = resolve_model_dir(reference)
        # A LoRA adapter is its base plus W0 + scale B A on every read: the base's config, lazily merged weights.
        source = adapter_base_dir(folder, options.base_model) if is_adapter(folder) else folder
        config = load_config(source, trust_remote_code=options.trust_remote_code)
        if options.attn_implementation:
            config._attn_implementation = options.attn_implementation
        configs.append(config)
        weights = open_weights(folder, allow_pickle=options.allow_pickle, base_model=options.base_model)
        candidates.append(Candidate(name, None, weights, float(options.coefficients.get(name, 1.0)), folder,
                                    str(folder), reference))
    for candidate, config in zip(candidates[1:], configs[1:]):
        ours, theirs = architecture_of(configs[0]), architecture_of(config)
        if ours != theirs:
            raise RegMeanError(f"candidate {candidate.name}: architecture {theirs}, but {candidates[0].name} is {ours}; "
                               "all candidates must share one architecture")
        for key, value in config_summary(config).items():
            if config_summary(configs[0]).get(key, value) != value:
                raise RegMeanError(f"candidate {candidate.name}: {key} = {value!r}, but {candidates[0].name} has "
                                   f"{config_summary(configs[0])[key]!r}; all candidates must share one architecture")
    base_folder = resolve_model_dir(options.base) if options.base else None
    base = open_weights(base_folder, allow_pickle=options.allow_pickle) if base_folder else None
    plan = plan_merge(candidates, settings, base=base, check_fingerprints=False)

    held = [i for i in range(len(candidates)) if i % ranks.world == ranks.rank]
    blockwise = [BlockwiseCandidate(c.name, config, c.weights, c.coefficient,
                                    _candidate_batches(c.name, c.model_dir, config, options) if i in held else None)
                 for i, (c, config) in enumerate(zip(candidates, configs))]
    identity = _identity(options, candidates) if checkpoints is not None else {}
    resumed = checkpoints.load(identity) if checkpoints is not None and options.resume else None
    if checkpoints is not None and not options.resume:
        checkpoints.clear()
    runner = BlockwiseMerge(
        blockwise, BlockwiseSettings(settings, forward_dtype, accumulate_dtype, options.include_padding,
                                     activation_memory, Path(options.spill_dir) if options.spill_dir else None,
                                     options.trust_remote_code),
        device=device, base=base, collective=collective_for(ranks), progress=options.progress and ranks.is_main)
    prepared = time.perf_counter()

    with contextlib.ExitStack() as publish:
        stage = publish.enter_context(staged_directory(out, overwrite=options.overwrite)) if ranks.is_main else None
        writer = ShardedCheckpointWriter(stage, plan.outputs, max_shard) if ranks.is_main else None
        try:
            result = runner.run(writer.write if writer else (lambda name, tensor: None),
                                resumed=resumed.unit if resumed else (lambda label: None),
                                unit_done=(lambda done: checkpoints.maybe_save(done, identity))
                                if checkpoints is not None else (lambda done: None))
            if writer is not None:
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            if ranks.active:
                all_ok(False)
            raise
        if ranks.active and not all_ok(True):
            raise RegMeanError("another rank of this merge failed; nothing was published")
        if not ranks.is_main:
            return {}
        if resumed is not None:
            result["layers"] = {**resumed.layers, **result["layers"]}
        copy_model_files(base_folder or candidates[0].model_dir, stage,
                         base_dir=None if base_folder else getattr(candidates[0].weights, "base_dir", None))
        report = build_report(options, settings, plan, candidates,
                              {"layers": result["layers"], "timings": result["timings"]}, device)
        # the data options decide the merged bytes too (a model card's config gives them back)
        report["settings"].update(method="regmean++", ranks=ranks.world, datasets=dict(options.datasets),
                                  **{name: getattr(options, name) for name in BLOCKWISE_DATA})
        for entry, (name, _) in zip(report["candidates"], options.models.items()):
            entry["dataset"] = {"path": options.datasets[name], **{key: getattr(options, key) for key in (
                "split", "text_column", "text_pair_column", "image_column", "num_examples", "seed", "max_length")}}
            held = next((c for c in blockwise if c.name == name and c.batches is not None), None)
            entry["examples"] = sum(len(next(iter(b.values()))) for b in held.batches) if held else None
        solved = {entry["weight"] for entry in report["layers"].values()}
        report["averaged"] = [name for name in plan.averaged if name not in solved]
        report["totals"].update(systems=len({entry["gram"] for entry in report["layers"].values()}),
                                batches=result["batches"], averaged=len(report["averaged"]))
        report["units"] = result["units"]
        report["stack"] = result["stack"]
        report["activations"] = result["activations"]
        if resumed is not None:
            report["resumed_units"] = resumed.labels
        if options.per_candidate:
            report["per_candidate"] = export_per_candidate(stage, open_weights(stage), candidates,
                                                           exclusion(settings.exclude), max_shard,
                                                           progress=options.progress)
        report["timings"]["load_data_and_check"] = prepared - started
        report["timings"]["total"] = time.perf_counter() - started
        write_cards(stage, report, out.resolve().name)
        write_json(stage / REPORT_NAME, report)
    if checkpoints is not None:
        checkpoints.clear()
    log.info("merge (regmean++): %d candidates, %d blocks, %d layers solved, %.1fs -> %s", len(candidates),
             result["stack"]["blocks"], len(result["layers"]), report["timings"]["total"], out)
    return report

