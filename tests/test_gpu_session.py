"""bench/gpu_session.py, the one entry point of a GPU session, run end to end on tiny sizes on the CPU, so
that it cannot rot between the rare sessions that have a GPU: every part runs or says why it does not, the
output folder is what the device tool brings back, and the environment check names packages that are
missing (hidden here by an import blocker in the child processes, as the GPU machine lacks zarr and datasets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from bench.gpu_session import PARTS

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
BLOCKER = '''import importlib.abc
import sys

HIDDEN = {hidden!r}


class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"No module named {{name!r}} (hidden by the test)")
        return None


sys.meta_path.insert(0, Hide())
'''


def session(tmp_path: Path, *args, hide: tuple[str, ...] = (), timeout: float = 900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    if hide:
        blocker = tmp_path / "blocker"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(BLOCKER.format(hidden=sorted(hide)))
        paths.insert(0, str(blocker))  # every process of the session, the parts' too, imports it first
    env["PYTHONPATH"] = os.pathsep.join(paths)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench.gpu_session", str(out), "--small", "--work",
                             str(tmp_path / "work"), *map(str, args)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads((out / "session.json").read_text()) if (out / "session.json").exists() else None
    return result, out, report


def statuses(report: dict) -> dict[str, dict]:
    return {part["name"]: part for part in report["parts"]}


def summary_rows(out: Path) -> dict[str, str]:
    """part -> status, from the table of summary.md."""
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in {p.name for p in PARTS}:
            rows[cells[0]] = cells[1]
    return rows


def test_the_whole_session_runs_end_to_end_on_tiny_sizes(tmp_path):
    result, out, report = session(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "device: " in result.stdout
    rows = summary_rows(out)
    assert set(rows) == {p.name for p in PARTS}, rows  # every part, with its status
    sweep = "passed" if (ROOT / "stages" / "sweep.py").exists() else "skipped"
    expected = {"gpu_check": "passed", "plusplus": "passed", "methods": "passed", "reliability": "passed",
                "sweep": sweep, "bench_gpu": "passed"}
    assert rows == expected, (rows, output[-6000:])
    parts = statuses(report)
    assert {name: part["status"] for name, part in parts.items()} == expected
    if not CUDA:  # the CUDA-only checks say so, in one clear line each
        assert "env: no CUDA device" in result.stdout
        for name in ("gpu_check", "plusplus", "methods"):
            assert "skipped: no CUDA device" in parts[name]["note"], parts[name]
    assert parts["gpu_check"]["result"]["ok"] and "nccl" in parts["gpu_check"]["result"]
    assert parts["plusplus"]["result"]["path"] == "regmean merge --method regmean++"
    for method in ("ties", "dare", "fisher", "regmean"):
        assert parts["methods"]["result"][method]["finite"], method
    assert parts["reliability"]["result"]["resume"]["ok"]
    assert "| zarr/datasets imported" in (out / "summary.md").read_text()  # bench.gpu's own table, inline
    # What comes back from the device machine: at most 8 plain files, no folders.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["parts.tar.gz", "session.json", "session.log", "summary.md"], files
    with tarfile.open(out / "parts.tar.gz") as tar:
        names = set(tar.getnames())
    ran = [name for name, status in expected.items() if status == "passed"]
    assert {f"logs/{name}.log" for name in ran} <= names, names
    assert {"gpu_check/gpu_check.json", "bench_gpu/gpu.md", "methods/result.json"} <= names


def test_hidden_packages_are_named_and_the_parts_fall_back_or_skip(tmp_path):
    result, out, report = session(tmp_path, "--only", "plusplus,methods,reliability", hide=("zarr", "datasets"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("env: missing datasets (") for line in lines), lines
    assert any(line.startswith("env: missing zarr (") for line in lines), lines
    assert report["missing_optional"].keys() == {"datasets", "zarr"}
    parts = statuses(report)
    assert parts["reliability"]["status"] == "skipped" and "datasets" in parts["reliability"]["note"]
    assert parts["plusplus"]["status"] == "passed"
    assert parts["plusplus"]["result"]["path"].startswith("in-memory")
    assert parts["methods"]["status"] == "passed"
    assert parts["methods"]["result"]["ties"]["finite"] and parts["methods"]["result"]["dare"]["finite"]
    assert parts["methods"]["result"]["fisher"].startswith("skipped")
    rows = summary_rows(out)
    assert rows["gpu_check"].startswith("not selected") and rows["reliability"] == "skipped"


def test_a_missing_required_package_stops_before_any_part(tmp_path):
    result, out, report = session(tmp_path, hide=("typer",), timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "env: MISSING (required) typer: " in result.stdout
    assert report["parts"] == [] and report["missing_required"] == ["typer"]
    assert all("not run" in status for status in summary_rows(out).values())
