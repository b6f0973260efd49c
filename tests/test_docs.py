"""The documentation holds together: the strict site build passes (and fails on a broken copy), every
relative link and #anchor of README.md and docs/ resolves, and docs/cli.md is what typer generates today."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The command `make cli-docs` runs; typer's own generator, fed the app itself.
CLI_DOCS = ["-m", "typer", "stages.cli", "utils", "docs", "--name", "regmean", "--title", "Command reference"]


def build_site(project: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of a project folder (mkdocs.yml + docs/), as `make docs` runs it."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(project / "mkdocs.yml"), "--site-dir", str(site)],
                          capture_output=True, text=True, timeout=120)


def test_the_site_builds_strictly_with_every_page_in_it(tmp_path):
    result = build_site(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    for page in sorted(DOCS.glob("*.md")):
        built = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / built).is_file(), f"{page.name} was not built"


def break_link(docs: Path) -> None:
    with (docs / "usage.md").open("a") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")


def break_anchor(docs: Path) -> None:
    with (docs / "usage.md").open("a") as f:
        f.write("\nSee [a section that is not there](scale.md#no-such-section).\n")


def leave_out_of_nav(docs: Path) -> None:
    (docs / "orphan.md").write_text("# A page nobody can reach\n")


@pytest.mark.parametrize("damage, message", [
    (break_link, "'no-such-page.md', but the target is not found"),
    (break_anchor, "does not contain an anchor '#no-such-section'"),
    (leave_out_of_nav, "not included in the \"nav\" configuration"),
], ids=["broken link", "missing anchor", "page not in nav"])
def test_a_broken_copy_of_the_docs_fails_the_strict_build(damage, message, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(DOCS, project / "docs")
    shutil.copy2(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    damage(project / "docs")
    result = build_site(project, tmp_path / "site")
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --- relative links and anchors, GitHub's way (README.md is not part of the site) ---

PARSER = MarkdownIt("commonmark").enable("table")


def github_anchor(text: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def inline_tokens(tokens):
    for token in tokens:
        yield token
        yield from inline_tokens(token.children or [])


def anchors_and_links(path: Path) -> tuple[set[str], list[str]]:
    """The heading anchors a Markdown file defines (duplicates numbered as GitHub does) and every link in it."""
    tokens = PARSER.parse(path.read_text())
    anchors: set[str] = set()
    links: list[str] = []
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            text = "".join(t.content for t in inline_tokens(tokens[i + 1].children) if t.type in ("text", "code_inline"))
            anchor, n = github_anchor(text), 0
            while (anchor if n == 0 else f"{anchor}-{n}") in anchors:
                n += 1
            anchors.add(anchor if n == 0 else f"{anchor}-{n}")
        for child in inline_tokens(token.children or []):
            target = child.attrGet("href") if child.type == "link_open" else \
                child.attrGet("src") if child.type == "image" else None
            if target is not None:
                links.append(target)
    return anchors, links


def broken_links(files: list[Path]) -> list[str]:
    """Every relative link of the files whose target file, or #anchor in it, does not exist."""
    problems = []
    for path in files:
        for link in anchors_and_links(path)[1]:
            if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE):
                continue  # https:, mailto: ...: not ours to check offline
            target, _, anchor = link.partition("#")
            resolved = (path.parent / target).resolve() if target else path
            if not resolved.exists():
                problems.append(f"{path.name}: {link}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors_and_links(resolved)[0]:
                problems.append(f"{path.name}: {link}: no heading with that anchor")
    return problems


def test_every_relative_link_and_anchor_of_the_readme_and_docs_resolves():
    files = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    assert sum(len(anchors_and_links(f)[1]) for f in files) > 30  # the parser sees the links at all
    assert broken_links(files) == []


def test_the_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Size it first: `regmean plan`\n\n## Title\n")
    (tmp_path / "b.md").write_text(
        "| x | [ok](a.md#size-it-first-regmean-plan) |\n| --- | --- |\n\n[ok](a.md#title-1) [ok](#here) "
        "![bad](missing.png) [bad](a.md#nowhere) [bad](gone.md) [skip](https://example.org/x)\n\n## Here\n"
        "```\n[not a link](inside-code.md)\n```\n")
    assert broken_links([tmp_path / "b.md"]) == [
        "b.md: missing.png: no such file", "b.md: a.md#nowhere: no heading with that anchor",
        "b.md: gone.md: no such file"]


# --- the numbers the front door shows are those of the demo page ---

def demo_table(text: str) -> str:
    """From the line that says when and where it was measured down to the chart."""
    start = text.index("\nMeasured ")
    return text[start:text.index("\n![", start)]


def test_the_readme_shows_the_demo_table_of_the_demo_page():
    assert demo_table((ROOT / "README.md").read_text()) == demo_table((DOCS / "demo.md").read_text())


# --- docs/cli.md is generated from the typer app ---

def test_the_command_reference_is_what_typer_generates_from_the_app(tmp_path):
    fresh = tmp_path / "cli.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, *CLI_DOCS, "--output", str(fresh)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)

    def lines(path: Path) -> list[str]:
        return [line.rstrip() for line in path.read_text().rstrip().splitlines()]

    assert lines(DOCS / "cli.md") == lines(fresh), "docs/cli.md is out of date: run `make cli-docs`"
    text = fresh.read_text()
    assert "## `regmean stats`" in text and "`--version`" in text
    # Defaults written into help texts survive typer's rich markup (an unescaped [default: 256] vanishes).
    assert "after a seeded shuffle [default: 256]." in text and "(--method regmean, regmean++) [default: 0.95]" in text
