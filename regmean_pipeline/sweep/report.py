"""The sweep's table (OUT/sweep.md), chart (OUT/sweep.png) and the text the chosen merge's model card gives."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _score(scores: dict) -> str:
    return f"{100 * scores['accuracy']:.1f}" if "accuracy" in scores else f"{scores['loss']:.3f}"


def table(sweep: dict) -> str:
    """One row per point: its method, settings, validation score per task and objective; the chosen one bold."""
    tasks = list(sweep["tasks"])
    test = any(point.get("test") for point in sweep["points"])
    head = ["#", "method", "settings", *tasks, "objective", *(["test average"] if test else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    individual = sweep.get("individual_validation") or {}
    if individual:
        cells = ["", "individual candidates", "", *(_score(individual[t]) for t in tasks), "",
                 *([_average(sweep.get("individual_test"))] if test else [])]
        lines.append("| " + " | ".join(cells) + " |")
    for number, point in enumerate(sweep["points"]):
        settings = ", ".join(f"{k}={v}" for k, v in point["settings"].items()) or "defaults"
        cells = [str(number), point["method"], settings, *(_score(point["validation"][t]) for t in tasks),
                 f"{point['objective']:.4f}"]
        if test:
            cells.append(_average(point.get("test")))
        if number == sweep.get("best"):
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _average(scores: dict | None) -> str:
    if not scores:
        return ""
    values = [s["accuracy"] * 100 if "accuracy" in s else s["loss"] for s in scores.values()]
    return f"{sum(values) / len(values):.{1 if 'accuracy' in next(iter(scores.values())) else 3}f}"


def chart(sweep: dict, path: Path) -> Path | None:
    """The objective of every point, grouped by method; skipped (one warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        log.warning("%s not drawn: matplotlib is not installed (pip install 'regmean-pipeline[charts]')", path.name)
        return None
    points = sweep["points"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    figure, axes = pyplot.subplots(figsize=(max(6.0, 0.45 * len(points) + 2), 4))
    colours = pyplot.get_cmap("tab10")
    for index, point in enumerate(points):
        axes.bar(index, point["objective"], color=colours(methods.index(point["method"]) % 10),
                 edgecolor="black" if index == sweep.get("best") else "none", linewidth=2)
    axes.set_xticks(range(len(points)), [str(i) for i in range(len(points))])
    axes.set_xlabel("grid point (sweep.md lists their settings)")
    axes.set_ylabel(f"objective ({sweep['objective']})")
    handles = [pyplot.Rectangle((0, 0), 1, 1, color=colours(i % 10)) for i in range(len(methods))]
    axes.legend(handles, methods, fontsize=8, loc="lower right")
    axes.set_title("Validation objective per grid point (outlined: chosen)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def card_text(sweep: dict) -> str:
    """For the chosen merge's model card: chosen by a sweep, over what grid, on which rows, with what scores."""
    best = sweep["points"][sweep["best"]]
    methods = ", ".join(dict.fromkeys(p["method"] for p in sweep["points"]))
    rows = "; ".join(f"{name}: {entry['rows']} rows of `{entry['file']}` (`{entry['sha256'][:19]}…`)"
                     for name, entry in sweep["validation"].items())
    scores = ", ".join(f"{task} {_score(value)}" for task, value in best["validation"].items())
    return (f"Chosen by `regmean sweep` as the best of {len(sweep['points'])} grid points ({methods}) by the "
            f"{sweep['objective']} objective on the tasks' validation splits, which no candidate was trained on: "
            f"{rows}. Its validation scores: {scores}; objective {best['objective']:.4f}. Every point's scores are "
            "in the sweep's sweep.json and sweep.md.")
