"""Cache folders that are local paths or fsspec URLs (``s3://bucket/prefix``, ``file://``, ``gs://`` ...).

One small wrapper over an fsspec filesystem and a path on it, so the cache code reads and writes
the same way wherever the folder lives. Local folders keep their plain paths (memory-mapped reads,
the staged-rename publish); other filesystems are reached only through fsspec, and zarr groups on
them through zarr's own ``FsspecStore``. Credentials and endpoints come from fsspec's usual
configuration (``AWS_*`` variables, ``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec``).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from regmean_pipeline.errors import RegMeanError


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("file:")


class Folder:
    """A folder on some filesystem, named by a local path or an fsspec URL."""

    def __init__(self, location: str | Path | Folder):
        if isinstance(location, Folder):
            self.fs, self.path, self.text = location.fs, location.path, location.text
            return
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        text = str(location)
        if _is_url(text):
            try:
                self.fs, path = fsspec.core.url_to_fs(text)
            except (ImportError, ValueError) as exc:
                raise RegMeanError(f"{text}: no filesystem for this URL ({exc}); for s3:// install s3fs "
                                   "(pip install 'regmean-pipeline[scale]')") from None
            self.path = path.rstrip("/")
        else:
            self.fs = LocalFileSystem()
            self.path = str(Path(text).expanduser())
        # A file:// URL is a local folder: named, staged and renamed by its path like any other.
        self.text = self.path if self.is_local else text.rstrip("/")

    @property
    def is_local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self}: not a local folder")
        return Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/")) if not self.is_local else Path(self.path).name

    def child(self, name: str) -> Folder:
        child = Folder(self)
        child.path = str(Path(self.path) / name) if self.is_local else posixpath.join(self.path, name)
        child.text = str(Path(self.text) / name) if self.is_local else f"{self.text}/{name}"
        return child

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Folder({self.text!r})"

    def _join(self, name: str) -> str:
        return str(Path(self.path) / name) if self.is_local else posixpath.join(self.path, name)

    # -- queries -----------------------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        return bool(self.fs.exists(self._join(name) if name else self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def is_empty(self) -> bool:
        return not self.fs.exists(self.path) or not self.fs.ls(self.path, detail=False)

    def subfolders(self) -> list[Folder]:
        """Direct subfolders, sorted by name."""
        entries = self.fs.ls(self.path, detail=True)
        # A local link to a folder (a cache kept elsewhere) counts as the folder it leads to.
        names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"
                       or (e.get("islink") and self.fs.isdir(e["name"])))
        return [self.child(name) for name in names]

    def size(self, name: str) -> int:
        return int(self.fs.size(self._join(name)))

    # -- reading and writing -----------------------------------------------------------------------
    def read_text(self, name: str) -> str:
        """The file's text; FileNotFoundError when it is not there."""
        with self.fs.open(self._join(name), "rb") as f:
            return f.read().decode()

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of a file: one ranged read on object stores."""
        return bytes(self.fs.cat_file(self._join(name), start=start, end=stop))

    def write_text(self, name: str, text: str) -> None:
        if self.is_local:
            Path(self._join(name)).write_text(text)
        else:
            self.fs.pipe_file(self._join(name), text.encode())

    def put_file(self, local: Path, name: str) -> None:
        """Upload (or, locally, move) a finished file into the folder."""
        if self.is_local:
            Path(local).replace(self._join(name))
        else:
            self.fs.put_file(str(local), self._join(name))

    def remove(self, name: str) -> None:
        path = self._join(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def remove_all(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def makedirs(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def zarr_store(self, name: str, *, writable: bool):
        """A zarr v3 store for a group inside this folder: a LocalStore or zarr's FsspecStore."""
        import zarr

        if self.is_local:
            return zarr.storage.LocalStore(self._join(name), read_only=not writable)
        if getattr(self.fs, "async_impl", False):
            return zarr.storage.FsspecStore.from_url(f"{self.text}/{name}", read_only=not writable)
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        return zarr.storage.FsspecStore(AsyncFileSystemWrapper(self.fs), path=self._join(name), read_only=not writable)
