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
from .storage import Folder

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


@contextlib.contextmanager
def published_folder(target: Folder, *, overwrite: bool = False, ready_marker: str) -> Iterator[Folder]:
    """Yield a folder to write an output into; it is accepted by readers only once complete.

    A local target is staged and renamed (``staged_directory``). An object store has no rename, so
    there the output is written in place with ``ready_marker`` (the manifest) as its last file: an
    old output loses its marker first, and a failed run deletes what it wrote. Readers must require
    the marker, which they do for caches.
    """
    if target.is_local:
        with staged_directory(target.local_path, overwrite=overwrite) as stage:
            yield Folder(stage)
        return
    check_remote_target(target, overwrite=overwrite)
    if not target.is_empty():
        target.remove(ready_marker)  # from here on no reader accepts the old output
        target.remove_all()
    try:
        yield target
    except BaseException:
        try:
            target.remove(ready_marker)
            target.remove_all()
        except Exception as exc:  # the marker never got written, so what is left is inert
            log.warning("%s: could not delete a partial output (%s); nothing reads it without %s",
                        target, exc, ready_marker)
        raise


def check_remote_target(target: Folder, *, overwrite: bool) -> None:
    """check_target for a folder on an object store: any object under its prefix counts as existing."""
    if not target.is_empty() and not overwrite:
        raise RegMeanError(f"{target}: already exists; pass --overwrite to replace it")


def check_folder_target(target: Folder, *, overwrite: bool) -> None:
    if target.is_local:
        check_target(target.local_path, overwrite=overwrite)
    else:
        check_remote_target(target, overwrite=overwrite)


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
