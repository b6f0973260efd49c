"""matplotlib (`charts` extra) and Pillow (`vision` extra) are optional: without them everything imports, eval
writes its table and results and says in one line which chart it did not draw, and an image task stops with
one line naming the extra.

Each check runs in a child Python whose import system cannot see matplotlib or PIL: the PathFinder on
sys.meta_path is swapped for one that finds nothing under those names, so `import PIL` raises
ModuleNotFoundError and `importlib.util.find_spec("PIL")` is None, as when the package is not installed
(libraries that probe for Pillow, such as datasets and transformers, then see it missing too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regmean_pipeline.tasks.results import format_table
from regmean_pipeline.testing import make_model, save_model, write_classification_task

ROOT = Path(__file__).resolve().parents[1]
CHART_WARNING = "accuracy.png not drawn: matplotlib is not installed (pip install 'regmean-pipeline[charts]')"
VISION_ERROR = "--image-column: image tasks need Pillow (pip install 'regmean-pipeline[vision]')"

WITHOUT_EXTRAS = """
import importlib.machinery, importlib.util, sys

HIDDEN = ("matplotlib", "PIL")


class NotInstalled(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
for hidden in HIDDEN:
    assert hidden not in sys.modules and importlib.util.find_spec(hidden) is None, hidden
    try:
        __import__(hidden)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(hidden + " still imports")
"""


def run_without_extras(code: str, *args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``code`` in a child Python without matplotlib and PIL; its stdout's last line is JSON."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS + code, *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                 "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return result


def source_modules() -> set[str]:
    names = set()
    for package in ("regmean_pipeline", "stages"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names - {"stages.__main__"}  # runs the CLI when imported


def test_every_module_imports_without_matplotlib_and_pillow():
    result = run_without_extras("""
import importlib, json, pkgutil
import regmean_pipeline
import stages.cli
from typer.testing import CliRunner

found = []
for top in ("regmean_pipeline", "stages"):
    package = importlib.import_module(top)
    found.append(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
            found.append(info.name)
help = CliRunner().invoke(stages.cli.app, ["--help"])
print(json.dumps({"found": found, "help": help.exit_code, "loaded": sorted(m for m in sys.modules if m.startswith(HIDDEN))}))
""")
    report = json.loads(result.stdout.splitlines()[-1])
    assert set(report["found"]) == source_modules()
    assert report["help"] == 0 and report["loaded"] == []


TINY_RESULTS = {
    "tasks": [{"name": "sst2", "metric": "accuracy"}, {"name": "trec", "metric": "accuracy"}],
    "reference": "individual",
    "methods": {
        "individual": {"per_task": {"sst2": {"accuracy": 0.9}, "trec": {"accuracy": 0.8}}, "average": 0.85},
        "regmean": {"per_task": {"sst2": {"accuracy": 0.85}, "trec": {"accuracy": 0.7}}, "average": 0.775},
    },
}


def test_plot_scores_without_matplotlib_warns_once_and_returns_none(tmp_path):
    result = run_without_extras("""
import json, logging
from pathlib import Path
from regmean_pipeline.tasks.results import format_table, plot_scores

logging.basicConfig(level=logging.INFO, format="%(message)s")
out, results = Path(sys.argv[1]), json.loads(sys.argv[2])
(out / "results.md").write_text(format_table(results) + "\\n")
print(json.dumps({"drawn": plot_scores(results, out / "accuracy.png", title="toy")}))
""", tmp_path, json.dumps(TINY_RESULTS))
    assert json.loads(result.stdout.splitlines()[-1]) == {"drawn": None}
    assert result.stderr.splitlines() == [CHART_WARNING]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]
    assert (tmp_path / "results.md").read_text() == format_table(TINY_RESULTS) + "\n"
    assert "| regmean | 85.0 | 70.0 | **77.5** | 91.2% |" in format_table(TINY_RESULTS)


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, Path]:
    """A classification task folder and a candidates folder holding a tiny classifier for it."""
    root = tmp_path_factory.mktemp("scored")
    task = write_classification_task(root / "toy", ["no", "yes"], n_train=4, n_test=12)
    save_model(make_model("bert", seed=1, num_labels=2), root / "candidates" / "toy")
    return task, root / "candidates"


def test_eval_without_matplotlib_writes_results_and_table_but_no_chart(scored, tmp_path):
    task, candidates = scored
    out = tmp_path / "eval"
    result = run_without_extras("""
import json
from typer.testing import CliRunner
from stages.cli import app

run = CliRunner().invoke(app, ["eval", *sys.argv[1:]], catch_exceptions=False)
print(run.stdout)
print(json.dumps({"code": run.exit_code, "stderr": run.stderr}))
""", "--task", task, "--method", f"individual={candidates}", "--out", out, "--device", "cpu", "--batch-size", 4,
        "--quiet")
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 0, report["stderr"]
    assert report["stderr"].splitlines() == [CHART_WARNING]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["individual"]["per_task"]["toy"]["accuracy"] >= 0
    assert (out / "results.md").read_text() == format_table(results) + "\n"
    assert format_table(results) in result.stdout


def test_image_tasks_without_pillow_stop_with_one_line(workspace, tmp_path):
    model, images = workspace.model("clip_vision", 1), workspace.image_task(1)
    result = run_without_extras("""
import json
from pathlib import Path
from typer.testing import CliRunner
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.data import DatasetSpec, ImageCollator, load_examples
from regmean_pipeline.measure.models import load_preprocessor
from regmean_pipeline.testing import write_image_task
from stages.cli import app

model, images, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
report = {}
for name, args in (("stats", ["stats", "--model", model, "--dataset", images, "--out", tmp / "caches"]),
                   ("regmean++", ["merge", "--method", "regmean++", "--model", "a=" + model, "--dataset", "a=" + images,
                                  "--out", tmp / "merged"])):
    run = CliRunner().invoke(app, [*map(str, args), "--image-column", "image", "--device", "cpu", "--quiet"])
    report[name] = [run.exit_code, run.stderr]
calls = {
    "load_examples": lambda: load_examples(DatasetSpec(images), images=True),
    "load_preprocessor": lambda: load_preprocessor(Path(model), images=True),
    "ImageCollator": lambda: ImageCollator(None, DatasetSpec("mem", image_column="image"), set()),
    "write_image_task": lambda: write_image_task(tmp / "more"),
}
for name, call in calls.items():
    try:
        call()
        report[name] = None
    except RegMeanError as exc:
        report[name] = str(exc)
report["left"] = sorted(p.name for p in tmp.iterdir() if not p.name.endswith(".lock"))  # the stages' locks
print(json.dumps(report))
""", model, images, tmp_path)
    report = json.loads(result.stdout.splitlines()[-1])
    for stage in ("stats", "regmean++"):
        assert report[stage] == [2, f"error: {VISION_ERROR}\n"], stage
    assert report["load_examples"] == report["load_preprocessor"] == VISION_ERROR
    assert report["ImageCollator"] == ("dataset mem: image column 'image': image tasks need Pillow "
                                       "(pip install 'regmean-pipeline[vision]')")
    assert report["write_image_task"] == "write_image_task: image tasks need Pillow (pip install 'regmean-pipeline[vision]')"
    assert report["left"] == []  # nothing written: not the caches, the merge nor the image task
