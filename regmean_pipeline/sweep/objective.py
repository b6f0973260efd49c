"""What a sweep maximises. ``normalized`` (the default): the mean over tasks of each task's merged score
relative to that task's own candidate (accuracy: merged / own; a chat task's response loss: own / merged),
so that tasks of different difficulty weigh the same. ``mean``: the plain mean of the merged scores
(accuracy, or minus the loss)."""

from __future__ import annotations

from regmean_pipeline.errors import RegMeanError

OBJECTIVES = ("normalized", "mean")


def task_value(scores: dict, own: dict | None, objective: str) -> float:
    """One task's share of the objective, from its merged scores and its own candidate's."""
    if "accuracy" in scores:
        merged, reference, higher_is_better = scores["accuracy"], (own or {}).get("accuracy"), True
    else:
        merged, reference, higher_is_better = scores["loss"], (own or {}).get("loss"), False
    if objective == "mean":
        return merged if higher_is_better else -merged
    if not reference:
        raise RegMeanError("--objective normalized: a task's own candidate scored 0; use --objective mean")
    return merged / reference if higher_is_better else reference / merged


def objective_value(validation: dict[str, dict], own: dict[str, dict], objective: str) -> float:
    if objective not in OBJECTIVES:
        raise RegMeanError(f"--objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    values = [task_value(scores, own.get(task), objective) for task, scores in validation.items()]
    return sum(values) / len(values)
