"""The package's shape: its parts depend on each other in one direction only, and the stages sit on top.

Each part of ``regmean_pipeline`` has a rank; a module may import its own part and parts of lower rank,
never a part beside or above it, and never ``stages`` (which compose the library into commands).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "regmean_pipeline"

# part -> rank: the order in which the pipeline's parts build on one another.
RANKS = {
    "errors": 0,
    "distributed": 1, "config": 1, "io": 1,
    "cache": 2,
    "measure": 3, "tasks": 3,
    "merge": 4,
    "plusplus": 5, "sweep": 5,
    "api": 6, "sizing": 6, "testing": 6,
}


def part_of(module: str) -> str:
    """``regmean_pipeline.merge.plan`` -> ``merge``; a top-level module is a part of its own."""
    return module.split(".")[1]


def library_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
    return found


def test_every_part_has_a_rank_and_a_one_line_purpose():
    parts = {part_of(module) for module in library_modules() if module != "regmean_pipeline"}
    assert parts <= set(RANKS), f"parts without a rank in tests/test_layout.py: {sorted(parts - set(RANKS))}"
    for folder in sorted(p for p in LIBRARY.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder} is not a package"
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and "\n" not in docstring.strip(), f"{init}: say in one line what the part is for"


@pytest.mark.parametrize("module", sorted(library_modules()))
def test_no_module_imports_upward_or_sideways(module):
    path = library_modules()[module]
    if module == "regmean_pipeline":
        return  # the package root re-exports the API
    own = part_of(module)
    for imported in imported_modules(path, module):
        top = imported.split(".")[0]
        assert top != "stages", f"{module} imports {imported}: the library never imports a stage or the CLI"
        if top != "regmean_pipeline" or imported == "regmean_pipeline":
            continue
        theirs = part_of(imported)
        assert theirs == own or RANKS[theirs] < RANKS[own], (
            f"{module} (part {own}, rank {RANKS[own]}) imports {imported} (part {theirs}, rank {RANKS[theirs]})")


# stage module -> rank: a stage may import only stages of lower rank (no cycles; the CLI on top).
STAGE_RANKS = {
    "__init__": 0, "merge_options": 0, "stats_candidates": 0, "combine": 0, "finetune": 0, "evaluate": 0,
    "publish": 1, "method_flags": 1, "stats": 1,
    "plusplus": 2,
    "merge": 3,
    "sweep": 4,
    "cli": 5,
    "__main__": 6,
}


def test_stages_only_compose_the_library():
    for path in sorted((ROOT / "stages").glob("*.py")):
        for imported in imported_modules(path, f"stages.{path.stem}"):
            assert imported.split(".")[0] not in ("tests", "bench"), f"{path}: imports {imported}"


@pytest.mark.parametrize("path", sorted((ROOT / "stages").glob("*.py")), ids=lambda path: path.stem)
def test_no_stage_imports_upward_or_sideways(path):
    own = path.stem
    assert own in STAGE_RANKS, f"stage module {own} has no rank in tests/test_layout.py"
    for imported in imported_modules(path, f"stages.{own}"):
        if imported.split(".")[0] != "stages" or imported == "stages":
            continue
        theirs = imported.split(".")[1]
        assert STAGE_RANKS[theirs] < STAGE_RANKS[own], (
            f"stages.{own} (rank {STAGE_RANKS[own]}) imports {imported} (rank {STAGE_RANKS[theirs]})")
