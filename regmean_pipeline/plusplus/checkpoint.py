"""Checkpoints of a RegMean++ run: the merged units so far, so that a killed run resumes where it was.

Each merged unit's tensors are written to a file of their own in a hidden ``.NAME.checkpoint/`` folder
beside OUT as soon as the unit is merged; every ``every`` units, ``state.json`` (replaced atomically)
commits the units written so far. A resumed run reads the committed units instead of measuring and
solving them again, recomputes every candidate's hidden states through them, and goes on. Files no
state lists (a kill between a unit's file and the next commit) are ignored and overwritten.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import replace_file
from regmean_pipeline.io.safetensors_io import SafetensorsFileWriter, SafetensorsReader, TensorSpec

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
FORMAT = "regmean-plusplus-checkpoint"


@dataclass
class Resumed:
    """The committed units of an earlier run: their tensors on demand, and their report entries."""

    folder: Path
    files: dict[str, str]
    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.files)

    def unit(self, label: str) -> dict[str, torch.Tensor] | None:
        if label not in self.files:
            return None
        reader = SafetensorsReader(self.folder / self.files[label])
        return {name: reader.read(name) for name in reader.keys()}


class BlockwiseCheckpoints:
    def __init__(self, out: Path, *, every: int = 0) -> None:
        self.folder = out.parent / f".{out.name}.checkpoint"
        self.every = every
        self._committed: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        if self.folder.is_symlink():
            raise RegMeanError(f"{self.folder}: is a link; checkpoints are only written to a plain folder")

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def load(self, identity: Mapping[str, Any]) -> Resumed | None:
        path = self.folder / STATE_NAME
        if not path.is_file():
            log.info("--resume: no checkpoint in %s; starting from the first unit", self.folder)
            return None
        try:
            state = json.loads(path.read_text())
            units = state["units"]
            saved = state["identity"]
            if state.get("format") != FORMAT or not isinstance(units, list) or not isinstance(saved, dict):
                raise ValueError("not a RegMean++ checkpoint")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegMeanError(f"{path}: damaged checkpoint state ({exc}); pass --overwrite to start over") from None
        saved = json.loads(json.dumps(saved))
        current = json.loads(json.dumps(dict(identity)))
        for key in sorted(saved.keys() | current.keys()):
            if saved.get(key) != current.get(key):
                raise RegMeanError(f"--resume: the checkpoint in {self.folder} was made with {key} = {saved.get(key)!r}, "
                                   f"this run has {current.get(key)!r}; rerun with the same inputs and options, or "
                                   "drop --resume to start over")
        files, layers = {}, {}
        for unit in units:
            name = str(unit["file"])
            if "/" in name or name.startswith(".") or not (self.folder / name).is_file():
                raise RegMeanError(f"{path}: unit {unit.get('label')!r} names a missing or foreign file {name!r}")
            files[str(unit["label"])] = name
            layers.update(unit.get("layers") or {})
        self._committed = list(units)
        log.info("resuming from %s: %d units already merged", self.folder, len(files))
        return Resumed(self.folder, files, layers)

    def maybe_save(self, done, identity: Mapping[str, Any]) -> None:
        """Write a merged unit's file; commit the units written so far every ``every`` units."""
        if not self.every or any(unit["label"] == done.label for unit in self._committed):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"unit-{len(self._committed) + len(self._pending):05d}.safetensors"
        specs = [TensorSpec(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in done.tensors.items()]
        writer = SafetensorsFileWriter(self.folder / name, specs)
        try:
            for key, tensor in done.tensors.items():
                writer.write(key, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self._pending.append({"label": done.label, "file": name, "layers": done.layers})
        if len(self._pending) >= self.every or done.label == "tail":
            self._commit(identity)

    def _commit(self, identity: Mapping[str, Any]) -> None:
        units = self._committed + self._pending
        state = {"format": FORMAT, "version": 1, "identity": dict(identity), "units": units}
        replace_file(self.folder / STATE_NAME, json.dumps(state, indent=1, default=str))
        self._committed, self._pending = units, []
        log.debug("checkpoint: %d units -> %s", len(units), self.folder)
