"""The sweep's record, OUT/sweep.json, written after every scored point so that a killed sweep resumes: a
point whose key (candidates, caches, settings, validation rows, evaluation settings) is recorded is not
merged or scored again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from regmean_pipeline import __version__
from regmean_pipeline.io.atomic import replace_file
from regmean_pipeline.sweep.grid import Point, canonical

FORMAT = "regmean-sweep"


def key_of(*parts: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical(parts).encode()).hexdigest()


class SweepBook:
    def __init__(self, path: Path, *, fresh: bool = False):
        self.path = Path(path)
        self.data: dict[str, Any] = {"format": FORMAT, "version": 1, "tool": f"regmean-pipeline {__version__}",
                                     "individual": {}, "points": []}
        if not fresh and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except ValueError:
                saved = None
            if isinstance(saved, dict) and saved.get("format") == FORMAT:
                self.data["individual"] = saved.get("individual") or {}
                self._earlier = {p["key"]: p for p in saved.get("points", []) if isinstance(p, dict) and "key" in p}
                return
        self._earlier = {}

    def earlier(self, key: str) -> dict | None:
        """A point scored by an earlier run with this key."""
        return self._earlier.get(key)

    def individual(self, key: str) -> dict | None:
        return self.data["individual"].get(key)

    def record_individual(self, key: str, scores: dict) -> None:
        self.data["individual"][key] = scores
        self.save()

    def record(self, point: Point, key: str, entry: dict) -> dict:
        entry = {"method": point.method, "settings": point.params, "label": point.label(), "key": key, **entry}
        self.data["points"] = [p for p in self.data["points"] if p["key"] != key] + [entry]
        self._earlier[key] = entry
        self.save()
        return entry

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, json.dumps(self.data, indent=1, default=str) + "\n")
