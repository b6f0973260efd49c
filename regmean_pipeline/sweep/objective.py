"""What a sweep maximises, from each point's validation scores and each task's own candidate's.

- ``normalized`` (the default): each task's merged score relative to its own candidate's (accuracy: merged /
  own; a chat task's response loss: own / merged), combined by their geometric mean. Relative scores make
  tasks of different difficulty weigh the same; the geometric mean keeps a merge from winning by keeping one
  task while losing the others (an arithmetic mean of loss ratios, each at most 1 and near 0 for a lost task,
  does reward that: the LLM walk-through in docs/llm.md shows it).
- ``arithmetic``: the arithmetic mean of the same relative scores.
- ``mean``: the plain mean of the merged scores (accuracy, or minus the loss).
"""

from __future__ import annotations

import math

from regmean_pipeline.errors import RegMeanError

OBJECTIVES = ("normalized", "arithmetic", "mean")


def relative(scores: dict, own: dict | None) -> float:
    """One task's merged score relative to its own candidate's (1: as good)."""
    if "accuracy" in scores:
        merged, reference = scores["accuracy"], (own or {}).get("accuracy")
        ratio = merged / reference if reference else None
    else:
        merged, reference = scores["loss"], (own or {}).get("loss")
        ratio = reference / merged if reference and merged else None
    if ratio is None:
        raise RegMeanError("--objective: a task's own candidate (or a merge) scored 0, so relative scores are "
                           "undefined; use --objective mean")
    return ratio


def objective_value(validation: dict[str, dict], own: dict[str, dict], objective: str) -> float:
    if objective not in OBJECTIVES:
        raise RegMeanError(f"--objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "mean":
        values = [s["accuracy"] if "accuracy" in s else -s["loss"] for s in validation.values()]
        return sum(values) / len(values)
    ratios = [relative(scores, own.get(task)) for task, scores in validation.items()]
    if objective == "arithmetic":
        return sum(ratios) / len(ratios)
    return math.exp(sum(math.log(max(r, 1e-300)) for r in ratios) / len(ratios))
