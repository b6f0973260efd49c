"""A tally of injected faults for the Reliability table in docs/reliability.md: tried, survived, outputs lost.

A fault counts as tried when its trial starts and as survived when every check after it passed;
an output counts as lost when a check that an earlier output is intact fails.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

TALLY: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "survived": 0, "lost": 0})


@contextlib.contextmanager
def trial(fault: str) -> Iterator[None]:
    TALLY[fault]["tried"] += 1
    yield
    TALLY[fault]["survived"] += 1


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_intact(fault: str, folder: Path, before: dict[str, bytes]) -> None:
    """The earlier output at ``folder`` is byte for byte what it was."""
    if snapshot(folder) != before:
        TALLY[fault]["lost"] += 1
        raise AssertionError(f"{folder}: an earlier output changed ({fault})")


def summary() -> list[str]:
    if not TALLY:
        return []
    tried = sum(t["tried"] for t in TALLY.values())
    survived = sum(t["survived"] for t in TALLY.values())
    lost = sum(t["lost"] for t in TALLY.values())
    lines = [f"{len(TALLY)} kinds of fault, {tried} tried, {survived} survived, outputs lost: {lost}"]
    lines += [f"  {name}: {t['tried']} tried, {t['survived']} survived, {t['lost']} lost"
              for name, t in sorted(TALLY.items())]
    return lines
