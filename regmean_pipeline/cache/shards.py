"""Shard caches: one candidate's stats split over independent jobs, each over its share of the examples.

``regmean stats --shard I/N --out CANDIDATE`` writes ``CANDIDATE/shard-0000I-of-0000N/``, a normal cache
whose manifest also records ``shard: {index: I, count: N}`` and the settings of the whole run. Because
every stored array is a sum over rows, the candidate's cache is the plain sum of its shards:
``ShardedStats`` reads it that way (so merge accepts the candidate folder as is) and ``combine`` writes it
out once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Sequence

import numpy as np

from regmean_pipeline.cache.manifest import MANIFEST_NAME, Manifest
from regmean_pipeline.cache.statistics import STATISTICS
from regmean_pipeline.cache.store import StatsCache, write_arrays
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.storage import Folder

log = logging.getLogger(__name__)

_SHARD_FOLDER = re.compile(r"^shard-(\d+)-of-(\d+)$")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``I/N`` with 0 <= I < N (0-based, like SLURM_ARRAY_TASK_ID and JOB_COMPLETION_INDEX)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise RegMeanError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        return cls(int(match[1]), int(match[2]))

    @property
    def folder_name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def as_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}


def is_shard_folder(folder: Folder) -> bool:
    return bool(_SHARD_FOLDER.match(folder.name))


def shard_folders(folder: Folder) -> list[Folder]:
    """The shard caches directly inside a candidate folder (those holding a manifest)."""
    if not folder.is_dir():
        return []
    return [sub for sub in folder.subfolders() if is_shard_folder(sub) and sub.exists(MANIFEST_NAME)]


# What every shard of one candidate must agree on: everything but what depends on its share. The
# model's and the dataset's paths may differ between machines; the weights' fingerprint may not.
_SAME_RUN = ("include_padding", "accumulate_dtype", "forward_dtype", "layers", "layout", "statistics")


def _run_settings(manifest: Manifest) -> dict:
    settings = {field: getattr(manifest, field) for field in _SAME_RUN}
    settings["model"] = {k: manifest.model.get(k) for k in ("architecture", "fingerprint")}
    settings["dataset"] = {k: v for k, v in manifest.dataset.items() if k != "path"}
    return settings


class ShardedStats:
    """A candidate's statistics as the sum of its shard caches: the interface merge reads caches through."""

    def __init__(self, caches: Sequence[StatsCache], where: str):
        self.where = where
        self.shards = _checked(list(caches), where)
        first = self.shards[0].manifest
        summed = {STATISTICS[statistic].section: {
            key: entry.counted(sum(c.manifest.entries(statistic)[key].count for c in self.shards))
            for key, entry in first.entries(statistic).items()} for statistic in first.statistics}
        self.manifest = dataclasses.replace(first, **summed, shard=None,
                                            examples=sum(c.manifest.examples for c in self.shards))

    def read(self, statistic: str, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The array's sum over all shards (added in float64, stored back in the accumulation dtype; into
        ``out`` when given)."""
        total = None
        for cache in self.shards:
            values = cache.read(statistic, key)
            total = values.astype(np.float64) if total is None else total + values
        if out is None:
            return total.astype(np.dtype(self.manifest.accumulate_dtype))
        out[...] = total
        return out


def _checked(caches: list[StatsCache], where: str) -> list[StatsCache]:
    if not caches:
        raise RegMeanError(f"{where}: no shard caches (folders shard-IIIII-of-NNNNN holding a {MANIFEST_NAME})")
    by_index: dict[int, StatsCache] = {}
    first = caches[0]
    count = _shard_of(first)["count"]
    for cache in caches:
        shard = _shard_of(cache)
        if shard["count"] != count:
            raise RegMeanError(f"{cache.folder}: shard {shard['index']} of {shard['count']}, but {first.folder} is "
                               f"one of {count}; all shards of a candidate come from one --shard I/N split")
        if shard["index"] in by_index:
            raise RegMeanError(f"{cache.folder}: duplicate of shard {shard['index']} of {count} "
                               f"(also in {by_index[shard['index']].folder})")
        ours_all, theirs_all = _run_settings(first.manifest), _run_settings(cache.manifest)
        for field, ours in ours_all.items():
            if ours != theirs_all[field]:
                detail = "another model's weights" if field == "model" else f"other settings ({field} differs)"
                raise RegMeanError(f"{cache.folder}: this shard was computed with {detail} than {first.folder}")
        for statistic in first.manifest.statistics:
            ours_sizes = {k: e.length for k, e in first.manifest.entries(statistic).items()}
            if {k: e.length for k, e in cache.manifest.entries(statistic).items()} != ours_sizes:
                raise RegMeanError(f"{cache.folder}: holds other {statistic} arrays than {first.folder}")
        by_index[shard["index"]] = cache
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise RegMeanError(f"{where}: shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:5]))} of "
                           f"{count} missing (run regmean stats --shard {missing[0]}/{count})")
    return [by_index[i] for i in range(count)]


def _shard_of(cache: StatsCache) -> dict[str, int]:
    if cache.manifest.shard is None:
        raise RegMeanError(f"{cache.folder}: a whole cache, not a shard; it cannot be combined with shards")
    return cache.manifest.shard


def open_sharded(sources: Sequence[str | Folder], where: str | None = None) -> ShardedStats:
    """Shard caches given as shard folders, or as candidate folders holding them."""
    caches: list[StatsCache] = []
    for source in map(Folder, sources):
        if source.exists(MANIFEST_NAME):
            caches.append(StatsCache(source))
            continue
        found = shard_folders(source)
        if not found:
            raise RegMeanError(f"{source}: neither a shard cache nor a folder of shard caches")
        caches += [StatsCache(folder) for folder in found]
    return ShardedStats(caches, where or ", ".join(map(str, sources)))


def combine_shards(sources: Sequence[str | Folder], target: Folder, *, storage: str | None = None) -> Manifest:
    """Write the sum of the shards as one ordinary cache in ``target`` (an empty, writable folder)."""
    sharded = open_sharded(sources)
    sections = {STATISTICS[statistic].section: {k: dataclasses.replace(e) for k, e in
                                                sharded.manifest.entries(statistic).items()}
                for statistic in sharded.manifest.statistics}
    manifest = dataclasses.replace(sharded.manifest, storage=storage or sharded.manifest.storage, **sections)
    manifest.extra = {**manifest.extra, "combined_from": [str(c.folder) for c in sharded.shards]}
    return write_arrays(target, manifest, {statistic: functools.partial(sharded.read, statistic)
                                           for statistic in manifest.statistics})
