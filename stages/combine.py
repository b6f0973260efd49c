"""Sum one candidate's shard caches into one ordinary cache, published like any stats output."""

from __future__ import annotations

import logging

from regmean_pipeline.cache.manifest import MANIFEST_NAME, STORAGE_FORMATS, Manifest
from regmean_pipeline.cache.shards import combine_shards
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import check_folder_target, published_folder
from regmean_pipeline.io.storage import Folder

log = logging.getLogger(__name__)


def run_combine(sources: list[str], out: str, *, storage: str | None = None, overwrite: bool = False) -> Manifest:
    if storage is not None and storage not in STORAGE_FORMATS:
        raise RegMeanError(f"--format: {storage!r} is not one of {', '.join(STORAGE_FORMATS)}")
    target = Folder(out)
    check_folder_target(target, overwrite=overwrite)
    with published_folder(target, overwrite=overwrite, ready_marker=MANIFEST_NAME) as stage:
        manifest = combine_shards(sources, stage, storage=storage)
    log.info("combine: %d shards, %d examples, %d Grams -> %s", len(manifest.extra["combined_from"]),
             manifest.examples, len(manifest.grams), target)
    return manifest
