"""What `pip install regmean-pipeline` gives: the built wheel, installed into a fresh venv, works on its own.

The editable checkout the suite runs from would hide a module the wheel leaves out (easy after moving
files into subpackages), so this test builds the wheel from a copy of the sources, installs it alone
into a new venv and runs the installed `regmean` from a folder outside the repository. The venv reaches
the dependencies (torch, transformers, ...) through a `.pth` line naming this interpreter's
site-packages; a plain path line adds that folder without processing its own `.pth` files, so the
editable install's finder never runs there and `regmean_pipeline` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import regmean_pipeline

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("regmean_pipeline", "stages")  # [tool.setuptools.packages.find] include

# Every module of the installed packages, imported in the fresh venv; where each one was found.
IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
found = {}
for top in sys.argv[1:]:
    package = importlib.import_module(top)
    found[top] = package.__file__
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if not info.name.endswith("__main__"):  # stages.__main__ runs the CLI when imported
            found[info.name] = importlib.import_module(info.name).__file__
print(json.dumps(found))
"""


def source_modules() -> set[str]:
    """Module names of the checkout's packages, from their files."""
    names = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def clean_environment() -> dict[str, str]:
    """This environment without the suite's PYTHONPATH, which would show the checkout (and its egg-info) too."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def dependency_folders() -> list[str]:
    """The site-packages folders this test runs with (where torch, transformers, ... are installed)."""
    folders = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    return list(dict.fromkeys(f for f in folders if Path(f).is_dir()))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel built from a copy of the sources; returns the venv folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    env = clean_environment()
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"),
                    str(source)], check=True, cwd=root, env=env, timeout=300)
    (wheel,) = (root / "dist").glob("regmean_pipeline-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, cwd=root, env=env, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=env, timeout=60).stdout.strip()
    (Path(purelib) / "zz_test_dependencies.pth").write_text("".join(f"{f}\n" for f in dependency_folders()))
    (venv / "wheel").symlink_to(wheel)
    return venv


def run_installed(venv: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """A program of the venv, from a folder outside the repository and without the suite's PYTHONPATH."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_environment(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr}"
    return result


def test_the_wheel_holds_every_module_of_the_sources(installed):
    # pyproject reads the version off the package, so the wheel and `regmean --version` agree.
    assert (installed / "wheel").resolve().name == f"regmean_pipeline-{regmean_pipeline.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(installed / "wheel") as wheel:
        packaged = {name[: -len(".py")].replace("/", ".").removesuffix(".__init__")
                    for name in wheel.namelist() if name.endswith(".py")}
    assert source_modules() - packaged == set(), "modules the wheel leaves out"


def test_every_installed_module_imports_from_the_fresh_venv(installed, tmp_path):
    found = json.loads(run_installed(installed, installed / "bin" / "python", "-c", IMPORT_EVERY_MODULE,
                                     *PACKAGES, cwd=tmp_path).stdout)
    assert set(found) == source_modules() - {"stages.__main__"}
    outside = {name: file for name, file in found.items() if not Path(file).is_relative_to(installed)}
    assert outside == {}, "modules imported from outside the fresh venv"


def test_installed_regmean_runs_stats_and_merge_as_the_checkout_does(installed, workspace, cli, tmp_path):
    regmean = installed / "bin" / "regmean"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "stats" in run_installed(installed, regmean, "--help", cwd=elsewhere).stdout
    version = run_installed(installed, regmean, "--version", cwd=elsewhere).stdout
    assert version == f"regmean-pipeline {regmean_pipeline.__version__}\n"

    def in_checkout(*args):
        code, _, stderr = cli(*args)
        assert code == 0, stderr

    for where, invoke in (("installed", lambda *a: run_installed(installed, regmean, *a, "--quiet", cwd=elsewhere)),
                          ("checkout", in_checkout)):
        for name, seed in (("a", 1), ("b", 2)):
            invoke("stats", "--model", workspace.model("bert", seed), "--dataset", workspace.text_task(seed),
                   "--num-examples", 16, "--device", "cpu", "--out", tmp_path / where / "caches" / name)
        invoke("merge", "--cache-dir", tmp_path / where / "caches", "--device", "cpu",
               "--out", tmp_path / where / "merged")
    report = json.loads((tmp_path / "installed" / "merged" / "merge_report.json").read_text())
    assert len(report["layers"]) > 0
    installed_weights = load_file(tmp_path / "installed" / "merged" / "model.safetensors")
    checkout_weights = load_file(tmp_path / "checkout" / "merged" / "model.safetensors")
    assert installed_weights.keys() == checkout_weights.keys()
    for name, tensor in checkout_weights.items():
        np.testing.assert_allclose(installed_weights[name], tensor, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_dockerfile_installs_from_what_the_wheel_is_built_from():
    """The image of the Kubernetes example (not built here) must copy every file the package build needs."""
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    kept = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    needed = {"pyproject.toml", "README.md", *PACKAGES}
    assert needed <= copied and needed <= kept, (copied, kept)
