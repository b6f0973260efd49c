"""Names read from files (manifests, shard indexes) must not lead outside the folder that holds them."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from regmean_pipeline.errors import RegMeanError


def inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name``, refused when ``name`` is absolute, climbs out with '..', or is a link out.

    A link is allowed only to another place inside ``folder``, or, for a Hugging Face hub snapshot
    (``.../snapshots/REV``), into that repository's ``blobs`` folder, where the hub keeps the files.
    """
    if not isinstance(name, str) or not name:
        raise RegMeanError(f"{where}: {name!r} is not a name inside {folder}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in pure.parts or "\\" in name or "\0" in name:
        raise RegMeanError(f"{where}: {name!r} is not a name inside {folder}")
    path = folder / name
    resolved = path.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent.resolve() / "blobs")
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise RegMeanError(f"{where}: {name!r} is a link that leads outside {folder} (to {resolved})")
    return path
