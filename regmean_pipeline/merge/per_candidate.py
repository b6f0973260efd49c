"""One deployable model per candidate: the merged shared parameters plus that candidate's own
excluded ones (its task head), with its own config and tokenizer.

This is how the RegMean paper evaluates merged classifiers whose heads differ per task. The
folders are written with the merge's streaming checkpoint writer, one tensor at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from regmean_pipeline.io.model_folder import copy_model_files
from regmean_pipeline.io.safetensors_io import ShardedCheckpointWriter, TensorSpec
from regmean_pipeline.io.weights import WeightSource
from regmean_pipeline.merge.plan import Candidate

log = logging.getLogger(__name__)

PER_CANDIDATE_DIR = "per_candidate"


def export_per_candidate(folder: Path, merged: WeightSource, candidates: list[Candidate],
                         excluded: Callable[[str], bool], max_shard_bytes: int, *,
                         progress: bool = True) -> dict[str, str]:
    """Write folder/per_candidate/<name>/ for every candidate; returns name -> folder relative to ``folder``."""
    written = {}
    for candidate in tqdm(candidates, desc="merge: per-candidate export", unit="model", disable=not progress,
                          leave=False):
        target = folder / PER_CANDIDATE_DIR / candidate.name
        target.mkdir(parents=True)
        names = candidate.weights.names()
        source_of = {name: candidate.weights if excluded(name) else merged for name in names}
        specs = [TensorSpec(name, source_of[name].dtype(name), source_of[name].shape(name)) for name in names]
        writer = ShardedCheckpointWriter(target, specs, max_shard_bytes)
        try:
            for name in names:
                writer.write(name, source_of[name].get(name))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if candidate.model_dir is not None:
            copy_model_files(candidate.model_dir, target, base_dir=getattr(candidate.weights, "base_dir", None))
        written[candidate.name] = str(target.relative_to(folder))
        log.debug("per-candidate export %s: %d own parameters", candidate.name,
                  sum(source_of[name] is candidate.weights for name in names))
    return written
