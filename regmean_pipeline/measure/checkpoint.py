"""Checkpoints of a stats run, so that a killed run resumes where it was and ends with the same cache.

A checkpoint is an ordinary cache folder (safetensors Grams, checksummed, manifest last) whose
manifest carries ``extra.checkpoint``: how many loader batches it covers and the run's identity
(weights fingerprint, examples, options). It lives in a hidden ``.NAME.checkpoint/`` folder beside
OUT; each one is staged and renamed into place (atomic), then the one before it is renamed out of
sight and deleted, so a kill at any moment leaves the previous checkpoint or the new one (or both),
never half of one under a checkpoint's name. Merge refuses checkpoint manifests, and ``--cache-dir``
never lists hidden folders.

Examples are selected by a seeded shuffle and batched in a fixed order, so the batches already done
are skipped by position: the resumed run sees exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regmean_pipeline.cache.manifest import CHECKPOINT_FIELD, Manifest
from regmean_pipeline.cache.store import StatsCache, write_cache
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import staged_directory
from regmean_pipeline.measure.fisher import FisherStats
from regmean_pipeline.measure.gram import GramStats
from regmean_pipeline.measure.linear import LinearLayer

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"batches-(\d{9})")


def checkpoint_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint"


@dataclass
class Resumed:
    """Where a checkpoint leaves a run: its sums, and how many loader batches they cover."""

    stats: GramStats
    batches: int
    counts: dict[str, int] = field(default_factory=dict)  # skipped / truncated examples so far
    fisher: FisherStats | None = None


class StatsCheckpoints:
    """The checkpoints of one stats output: save every ``every`` batches, load, clear."""

    def __init__(self, out: Path, identity: Mapping[str, Any], *, every: int = 0,
                 manifest_of: Callable[[GramStats, FisherStats | None], Manifest] | None = None):
        if every < 0:
            raise RegMeanError(f"--checkpoint-every: must be 0 (off) or a number of batches, got {every}")
        self.folder = checkpoint_folder(Path(out))
        self.identity = dict(identity)
        self.every = every
        self.manifest_of = manifest_of
        self._saved_at = 0
        if self.folder.is_symlink():
            raise RegMeanError(f"{self.folder}: is a link; checkpoints are only written to a plain folder")

    def _generations(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _GENERATION.fullmatch(p.name))]
        return sorted(found)

    def exists(self) -> bool:
        return bool(self._generations())

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def load(self, layers: Mapping[str, LinearLayer]) -> Resumed | None:
        """The latest checkpoint, checked against this run's identity and model; None if there is none."""
        generations = self._generations()
        if not generations:
            return None
        batches, folder = generations[-1]
        cache = StatsCache(folder, checkpoint=True)
        manifest = cache.manifest
        state = manifest.extra[CHECKPOINT_FIELD]
        if not isinstance(state, dict) or state.get("batches") != batches:
            raise RegMeanError(f"{folder}: damaged checkpoint state; pass --overwrite to start over")
        saved = state.get("identity")
        saved = saved if isinstance(saved, dict) else {}
        for key in sorted(self.identity.keys() | saved.keys()):
            if saved.get(key) != self.identity.get(key):
                raise RegMeanError(
                    f"--resume: the checkpoint in {self.folder} was made with {key} = {saved.get(key)!r}, this "
                    f"run has {self.identity.get(key)!r}; rerun with the same inputs and options, or pass "
                    "--overwrite instead of --resume to start over")
        # Sizes come from the model, not the file: a checkpoint cannot make us allocate more than it needs.
        for name, entry in manifest.layers.items():
            layer = layers.get(name)
            if layer is None or layer.in_features != entry.in_features or layer.weight != entry.weight:
                raise RegMeanError(f"{folder}: layer {name} does not match this model's layers")
        sums = {key: cache.gram(key) for key in manifest.grams}
        stats = GramStats(
            layers={name: layers[name] for name in manifest.layers},
            layer_grams={name: entry.gram for name, entry in manifest.layers.items()},
            sums=sums,
            tokens={key: entry.tokens for key, entry in manifest.grams.items()},
            examples=manifest.examples,
        )
        fisher = FisherStats({name: cache.fisher(name) for name in manifest.fisher}, manifest.examples) \
            if "fisher" in manifest.statistics else None
        counts = state.get("counts") if isinstance(state.get("counts"), dict) else {}
        self._saved_at = batches
        log.info("resuming from %s: %d batches (%d examples) already done", folder, batches, manifest.examples)
        return Resumed(stats, batches, {str(k): int(v) for k, v in counts.items() if isinstance(v, int)}, fisher)

    def maybe_save(self, batches: int, snapshot: Callable[[], tuple[GramStats, FisherStats | None]],
                   counts: Mapping[str, int]) -> None:
        """Save when ``every`` batches have passed since the last checkpoint."""
        if self.every and batches - self._saved_at >= self.every:
            self.save(batches, *snapshot(), counts=counts)

    def save(self, batches: int, stats: GramStats, fisher: FisherStats | None = None, *,
             counts: Mapping[str, int]) -> None:
        if self.manifest_of is None:
            raise ValueError("StatsCheckpoints.save needs manifest_of")
        manifest = self.manifest_of(stats, fisher)
        manifest.storage = "safetensors"  # one file per checkpoint, whatever the cache's format
        manifest.extra = {CHECKPOINT_FIELD: {"batches": batches, "identity": self.identity, "counts": dict(counts)}}
        previous = self._generations()
        self.folder.mkdir(parents=True, exist_ok=True)
        with staged_directory(self.folder / f"batches-{batches:09d}", overwrite=True) as stage:
            write_cache(stage, manifest, stats.sums, fisher.sums if fisher is not None else None)
        for _, folder in previous:
            if folder.name != f"batches-{batches:09d}":
                # Out of sight first (one atomic rename), then deleted: a kill halfway through a delete
                # must not leave a half-deleted folder under a checkpoint's name.
                doomed = folder.with_name(f".{folder.name}.deleting-{uuid.uuid4().hex[:8]}")
                os.rename(folder, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        self._saved_at = batches
        log.debug("checkpoint: %d batches -> %s", batches, self.folder)
