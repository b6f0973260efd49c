"""Shared fixtures: tiny local models and task files, built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from regmean_pipeline.testing import make_model, save_model, write_image_task, write_text_task  # noqa: E402


class Workspace:
    """Builds tiny checkpoints and data on first request and reuses them across tests."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def model(self, kind: str, seed: int, **overrides) -> Path:
        key = f"{kind}-{seed}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        if key not in self._built:
            self._built[key] = save_model(make_model(kind, seed=seed, **overrides), self.root / "models" / key)
        return self._built[key]

    def text_task(self, seed: int, n: int = 24, **kwargs) -> Path:
        key = f"text-{seed}-{n}" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        if key not in self._built:
            self._built[key] = write_text_task(self.root / "data" / f"{key}.jsonl", n=n, seed=seed, **kwargs)
        return self._built[key]

    def image_task(self, seed: int, n: int = 12) -> Path:
        key = f"images-{seed}-{n}"
        if key not in self._built:
            self._built[key] = write_image_task(self.root / "data" / key, n=n, seed=seed)
        return self._built[key]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture
def cli(monkeypatch):
    """Invoke the regmean CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from stages.cli import app

    def invoke(*args: str | Path):
        result = CliRunner().invoke(app, [str(a) for a in args] + ["--quiet"], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def bert_caches(workspace, tmp_path_factory) -> dict[str, Path]:
    """One stats cache per storage format of a tiny BERT; tests copy them before damaging anything."""
    from stages.stats import StatsOptions, run_stats

    root = tmp_path_factory.mktemp("bert-caches")
    for fmt in ("zarr", "safetensors"):
        run_stats(StatsOptions(model=str(workspace.model("bert", 1)), dataset=str(workspace.text_task(1)),
                               out=str(root / fmt), format=fmt, device="cpu", progress=False))
    return {fmt: root / fmt for fmt in ("zarr", "safetensors")}


def read_every_gram(folder: Path) -> None:
    """Read a cache as merge does: every Gram, with all its checks."""
    from regmean_pipeline.cache.store import StatsCache

    cache = StatsCache(folder)
    for key in cache.manifest.grams:
        cache.read_packed(key)


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault tally (tests/faults.py) of this session, for the Reliability table in docs/reliability.md."""
    from tests.faults import summary

    lines = summary()
    if lines:
        terminalreporter.section("fault tally")
        for line in lines:
            terminalreporter.write_line(line)
