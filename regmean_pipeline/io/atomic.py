"""Outputs appear whole or not at all: build beside the target, rename into place at the end.

One run at a time writes a target: ``output_lock`` holds an flock on a hidden ``.NAME.lock`` beside
it for the whole run, and clears what killed runs left behind (their staging folders, or a previous
output moved aside mid-publish, which it puts back).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import filelock

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.storage import Folder

log = logging.getLogger(__name__)

STAGING_MARK = ".partial-"
PREVIOUS_MARK = ".old-"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: Path | str) -> Iterator[None]:
    """Hold the target's lock for a whole run, or fail at once if another run holds it.

    The kernel drops an flock when its holder dies, so a killed run never blocks the next one; with
    the lock held, anything a dead run left beside the target is safe to clean up.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path(target)), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RegMeanError(f"{target}: another regmean run is writing it right now (it holds "
                           f"{lock_path(target).name}); wait for that run to finish") from None
    try:
        _recover(target)
        yield
    finally:
        lock.release()


def _recover(target: Path) -> None:
    """Undo what a killed run left: put back a previous output moved aside mid-publish, drop stagings."""
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}{PREVIOUS_MARK}*")):
        previous = leftover / "previous"
        if previous.is_dir() and not target.exists():
            os.rename(previous, target)
            log.warning("%s: restored the previous output that an interrupted run had moved aside", target)
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}{STAGING_MARK}*"):
        log.info("removing %s, left by an interrupted run", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def disk_full_error(target: Path, exc: OSError) -> RegMeanError:
    return RegMeanError(f"{target}: out of disk space while writing ({os.strerror(exc.errno)}); nothing was "
                        "published and earlier outputs are intact; free some space and rerun")


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
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if exc.errno in DISK_FULL:
            raise disk_full_error(target, exc) from None
        raise
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
        if _exchange(stage, target):  # one atomic step: the old output is now at ``stage``
            _fsync_dir(target.parent)
            shutil.rmtree(stage, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{PREVIOUS_MARK}", dir=target.parent))
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


def replace_file(path: Path, text: str) -> None:
    """Write a text file in one step: a reader sees the old file or the new one, never a part.

    The new text goes to a hidden temporary file in the same folder, then is renamed over ``path``.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777  # the file keeps its permissions (mkstemp's are 0600)
    except FileNotFoundError:
        mode = 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}{STAGING_MARK}", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders atomically where the OS and file system can; False where they cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


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
