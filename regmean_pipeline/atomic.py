"""Outputs appear whole or not at all: build beside the target, rename into place at the end."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import RegMeanError

log = logging.getLogger(__name__)

STAGING_MARK = ".partial-"


def check_target(target: Path, *, overwrite: bool) -> None:
    """Fail before any heavy work when the target exists and may not be replaced."""
    if target.exists() and not overwrite:
        raise RegMeanError(f"{target}: already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise RegMeanError(f"{target}: exists and is not a folder")


@contextlib.contextmanager
def staged_directory(target: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``target`` by rename, on error it vanishes.

    A run killed at any point leaves at most a hidden ``.NAME.partial-*`` folder, which nothing
    reads as a finished output. Two runs racing for one target: the first rename wins, the second
    fails with a clear message (rename onto a non-empty folder is refused by the OS).
    """
    target = Path(target)
    check_target(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would make shared caches unreadable to others
    try:
        yield stage
        _publish(stage, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish(stage: Path, target: Path, *, overwrite: bool) -> None:
    _fsync_dir(stage)
    old = None
    if target.exists():
        if not overwrite:
            raise RegMeanError(f"{target}: another run finished writing it first; this run's output was discarded")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "previous")
    try:
        os.rename(stage, target)
    except OSError as exc:
        if old is not None:
            os.rename(old / "previous", target)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise RegMeanError(f"{target}: another run finished writing it first; this run's output was discarded") from None
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
