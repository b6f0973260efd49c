"""`regmean merge --method regmean++`: measure and merge block by block in one run, then write the model.

This method cannot be split into independent per-candidate jobs (each block's Grams need the merged
blocks before it), so it reads no caches: every candidate comes with its model and its examples. Under
torchrun the candidates are spread over the ranks; a candidate's examples, activations and Grams stay on
its rank, and only the sums the solves need cross between ranks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from regmean_pipeline.distributed import Ranks, process_group, rank_device
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.adapters import is_adapter
from regmean_pipeline.io.model_folder import parse_size
from regmean_pipeline.io.weights import adapter_base_dir, fingerprint, open_weights, resolve_model_dir
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
from regmean_pipeline.merge.methods.base import MergeMethod, recorded
from regmean_pipeline.merge.plan import Candidate, MergeSettings, plan_merge
from regmean_pipeline.plusplus.checkpoint import BlockwiseCheckpoints
from regmean_pipeline.plusplus.collective import collective_for
from regmean_pipeline.plusplus.runner import BlockwiseCandidate, BlockwiseMerge, BlockwiseSettings
from regmean_pipeline.plusplus.skeleton import empty_model
from stages.merge_options import MergeOptions
from stages.publish import MergeOutput, build_report, locked_target, sizes

log = logging.getLogger(__name__)


def run_plusplus(options: MergeOptions, method: MergeMethod, params) -> dict:
    with process_group() as ranks, locked_target(options, ranks):
        return _run(options, method, params, ranks)


def _check_options(options: MergeOptions, params, ranks: Ranks) -> None:
    for flag, given, other, other_flag in (("--dataset", params.datasets, options.models, "--model"),
                                           ("--model", options.models, params.datasets, "--dataset")):
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
    if (params.checkpoint_every or params.resume) and ranks.active:
        raise RegMeanError("--checkpoint-every/--resume: for one process; under torchrun rerun the whole merge")


def _candidate_batches(name: str, folder: Path, config, params) -> list[dict[str, torch.Tensor]]:
    """The candidate's examples as model inputs, selected and batched as `regmean stats` does."""
    images = params.image_column is not None
    spec = DatasetSpec.from_options(params.datasets[name], params)
    examples = load_examples(spec, images=images)
    preprocessor = load_preprocessor(folder, images=images, trust_remote_code=params.trust_remote_code,
                                     base_model=params.base_model)
    if not images and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = preprocessor.pad_token_id  # sequence-classification heads need it to pool
    model = empty_model(config, dtype=torch.float32, trust_remote_code=params.trust_remote_code)
    loader = make_loader(examples, preprocessor, spec, accepted=forward_inputs(model), config=config,
                         batch_size=params.batch_size, num_workers=params.num_workers)
    batches = list(loader)
    loader.log_counts(f"dataset {spec.path}")
    if not batches:
        raise RegMeanError(f"dataset {spec.path}: no usable examples (all {len(examples)} were skipped)")
    return batches


def _identity(options: MergeOptions, params, candidates: list[Candidate]) -> dict:
    """What decides a run's result: a checkpoint of another run is refused on --resume."""
    return {"candidates": {c.name: fingerprint(c.weights) for c in candidates}, **recorded(params),
            "exclude": options.exclude, "coefficients": options.coefficients, "base": options.base}


def _open_candidates(options: MergeOptions, params) -> tuple[list[Candidate], list]:
    """Every candidate's weights (lazily) and config, all of one architecture."""
    candidates, configs = [], []
    for name, reference in options.models.items():
        folder = resolve_model_dir(reference)
        # A LoRA adapter is its base plus W0 + scale B A on every read: the base's config, lazily merged weights.
        source = adapter_base_dir(folder, params.base_model) if is_adapter(folder) else folder
        config = load_config(source, trust_remote_code=params.trust_remote_code)
        if params.attn_implementation:
            config._attn_implementation = params.attn_implementation
        configs.append(config)
        weights = open_weights(folder, allow_pickle=options.allow_pickle, base_model=params.base_model)
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
    return candidates, configs


def _runner(options: MergeOptions, params, settings: MergeSettings, candidates: list[Candidate], configs: list,
            ranks: Ranks, base, device: torch.device) -> tuple[BlockwiseMerge, list[BlockwiseCandidate]]:
    """The blockwise merge over this rank's candidates' examples (the others' only by their weights)."""
    try:
        activation_memory = parse_size(params.activation_memory)
    except ValueError as exc:
        raise RegMeanError(f"--activation-memory: {exc}") from None
    held = [i for i in range(len(candidates)) if i % ranks.world == ranks.rank]
    blockwise = [BlockwiseCandidate(c.name, config, c.weights, c.coefficient,
                                    _candidate_batches(c.name, c.model_dir, config, params) if i in held else None)
                 for i, (c, config) in enumerate(zip(candidates, configs))]
    runner = BlockwiseMerge(
        blockwise, BlockwiseSettings(settings, parse_dtype(params.dtype),
                                     parse_dtype(params.accumulate_dtype, "--accumulate-dtype"), params.include_padding,
                                     activation_memory, Path(params.spill_dir) if params.spill_dir else None,
                                     params.trust_remote_code),
        device=device, base=base, collective=collective_for(ranks), progress=options.progress and ranks.is_main)
    return runner, blockwise


def _run(options: MergeOptions, method: MergeMethod, params, ranks: Ranks) -> dict:
    started = time.perf_counter()
    _check_options(options, params, ranks)
    checkpoints = BlockwiseCheckpoints(Path(options.out), every=params.checkpoint_every) \
        if params.checkpoint_every or params.resume else None
    _, batch_bytes = sizes(options)
    settings = MergeSettings(list(options.exclude), batch_bytes, method.solve(params), None, method.name)
    device = resolve_device(rank_device(ranks, options.device))
    candidates, configs = _open_candidates(options, params)
    base_folder = resolve_model_dir(options.base) if options.base else None
    base = open_weights(base_folder, allow_pickle=options.allow_pickle) if base_folder else None
    plan = plan_merge(candidates, settings, base=base, check_fingerprints=False)
    runner, blockwise = _runner(options, params, settings, candidates, configs, ranks, base, device)
    identity = _identity(options, params, candidates) if checkpoints is not None else {}
    resumed = checkpoints.load(identity) if checkpoints is not None and params.resume else None
    if checkpoints is not None and not params.resume:
        checkpoints.clear()
    prepared = time.perf_counter()

    with MergeOutput(options, ranks) as output:
        result = output.write_tensors(plan.outputs, lambda sink: runner.run(
            sink, resumed=resumed.unit if resumed else (lambda label: None),
            unit_done=(lambda done: checkpoints.maybe_save(done, identity)) if checkpoints is not None
            else (lambda done: None)))
        if not ranks.is_main:
            return {}
        if resumed is not None:
            result["layers"] = {**resumed.layers, **result["layers"]}
        report = build_report(options, method, params, plan, candidates,
                              {"layers": result["layers"], "timings": result["timings"]}, device)
        _describe_blocks(report, options, params, plan, result, blockwise, resumed)
        report["settings"]["ranks"] = ranks.world
        report["timings"]["load_data_and_check"] = prepared - started
        output.finish(report, candidates, base_folder=base_folder, started=started)
    if checkpoints is not None:
        checkpoints.clear()
    log.info("merge (regmean++): %d candidates, %d blocks, %d layers solved, %.1fs -> %s", len(candidates),
             result["stack"]["blocks"], len(result["layers"]), report["timings"]["total"], options.out)
    return report


def _describe_blocks(report: dict, options: MergeOptions, params, plan, result: dict,
                     blockwise: list[BlockwiseCandidate], resumed) -> None:
    """What the blockwise run adds to the report: each candidate's examples, the units, stack and activations."""
    for entry, (name, _) in zip(report["candidates"], options.models.items()):
        entry["dataset"] = {"path": params.datasets[name], **{key: getattr(params, key) for key in (
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
