"""The one way a merge's output is made, whatever the method: a staged folder that appears whole or not at
all, holding the merged tensors (written as they are produced), the model files, the per-candidate
copies, merge_report.json and the model cards."""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from regmean_pipeline import __version__
from regmean_pipeline.distributed import Ranks, all_ok, broadcast_text
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import check_target, output_lock, staged_directory
from regmean_pipeline.io.background import BackgroundWrites
from regmean_pipeline.io.model_folder import copy_model_files, parse_size, write_json
from regmean_pipeline.io.safetensors_io import ShardedCheckpointWriter, TensorSpec
from regmean_pipeline.io.weights import fingerprint, open_weights
from regmean_pipeline.merge.methods.base import MergeMethod, recorded
from regmean_pipeline.merge.model_card import write_card
from regmean_pipeline.merge.per_candidate import export_per_candidate
from regmean_pipeline.merge.plan import Candidate, MergePlan, exclusion
from stages.merge_options import MergeOptions

log = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"
Sink = Callable[[str, torch.Tensor], None]


@contextlib.contextmanager
def locked_target(options: MergeOptions, ranks: Ranks) -> Iterator[None]:
    """OUT's lock, held by the publishing process for the whole run (a second run on the same OUT stops
    at once), and OUT checked before any work."""
    with output_lock(Path(options.out)) if ranks.is_main else contextlib.nullcontext():
        check_target(Path(options.out), overwrite=options.overwrite)
        yield


def sizes(options: MergeOptions) -> tuple[int, int]:
    """--max-shard-size and --batch-memory in bytes."""
    try:
        return parse_size(options.max_shard_size), parse_size(options.batch_memory)
    except ValueError as exc:
        raise RegMeanError(f"--max-shard-size/--batch-memory: {exc}") from None


class MergeOutput:
    """OUT, staged: tensors first, then ``finish`` adds everything else; published when the block ends
    without an error, removed otherwise. Under torchrun every rank writes its tensors into rank 0's
    staging folder (a shared filesystem) when ``shared`` is set; rank 0 alone finishes."""

    def __init__(self, options: MergeOptions, ranks: Ranks, *, shared: bool = False):
        self.options, self.ranks, self.shared = options, ranks, shared
        self.out = Path(options.out)
        self.max_shard, self.batch_bytes = sizes(options)
        self._stack = contextlib.ExitStack()
        self.stage: Path | None = None

    def __enter__(self) -> MergeOutput:
        if self.ranks.is_main:
            self.stage = self._stack.enter_context(staged_directory(self.out, overwrite=self.options.overwrite))
        if self.shared and self.ranks.active:
            self.stage = Path(broadcast_text(str(self.stage) if self.stage else None))
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)

    def write_tensors(self, outputs: list[TensorSpec], produce: Callable[[Sink], dict], *,
                      owner_of: Callable[[str], int] | None = None, background: bool = False) -> dict:
        """Run ``produce(sink)``, every tensor it hands the sink written into the staged folder (by this
        rank's writer; on a thread of its own with ``background``, at most one batch's budget queued).
        A failure on any rank aborts every rank's writes; nothing is published."""
        writing = self.stage is not None
        writer = None
        try:
            if writing:
                writer = ShardedCheckpointWriter(self.stage, outputs, self.max_shard, owner_of=owner_of,
                                                 rank=self.ranks.rank if owner_of else 0)
            write = writer.write if writer is not None else (lambda name, tensor: None)
            if background:
                with BackgroundWrites(write, max_pending_bytes=self.batch_bytes) as sink:
                    result = produce(sink)
                    finishing = time.perf_counter()
            else:
                result = produce(write)
                finishing = time.perf_counter()
            if writer is not None:
                writer.close()
            result.setdefault("timings", {})["finish_writes"] = time.perf_counter() - finishing
        except BaseException:
            if writer is not None:
                writer.abort()
            if self.ranks.active:
                all_ok(False)
            raise
        if self.ranks.active and not all_ok(True):
            raise RegMeanError("another rank of this merge failed; nothing was published")
        return result

    def finish(self, report: dict, candidates: list[Candidate], *, base_folder: Path | None, started: float) -> dict:
        """The model files (the base's, else the first candidate's), the per-candidate copies, the cards
        and merge_report.json, into the staged folder."""
        stage, options = self.stage, self.options
        copy_model_files(base_folder or candidates[0].model_dir, stage,
                         base_dir=None if base_folder else getattr(candidates[0].weights, "base_dir", None))
        if options.per_candidate:
            report["per_candidate"] = export_per_candidate(stage, open_weights(stage), candidates,
                                                           exclusion(options.exclude), self.max_shard,
                                                           progress=options.progress)
        report["timings"]["total"] = time.perf_counter() - started
        write_cards(stage, report, self.out.resolve().name)
        write_json(stage / REPORT_NAME, report)
        return report


def build_report(options: MergeOptions, method: MergeMethod, params: Any, plan: MergePlan,
                 candidates: list[Candidate], result: dict, device: torch.device) -> dict:
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
        "settings": {"method": method.name, **recorded(params), "pretrained": options.pretrained,
                     "exclude": list(options.exclude), "device": str(device), "base": options.base,
                     "cache_dir": options.cache_dir, "caches": list(options.caches), "models": dict(options.models),
                     "coefficients": dict(options.coefficients), "per_candidate": options.per_candidate,
                     "max_shard_size": options.max_shard_size, "batch_memory": options.batch_memory},
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
        **({"method_report": result["method_report"]} if result.get("method_report") else {}),
        **({"chosen_by": options.chosen_by} if options.chosen_by else {}),
    }


def candidate_entry(candidate: Candidate) -> dict:
    """A candidate in the report: where its weights and statistics came from, and what they were measured on."""
    manifest = candidate.stats.manifest if candidate.stats else None
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
