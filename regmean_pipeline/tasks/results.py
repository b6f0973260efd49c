"""Scores per task and method: the table (Markdown, so it pastes into a README) and the bar chart.

Each task has one metric: accuracy (classification, higher is better) or loss (chat tasks: the mean
loss of the responses, lower is better). Averages are taken per metric.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHARTS_INSTALL = "pip install 'regmean-pipeline[charts]'"  # matplotlib is an extra: the chart is optional


@dataclass(frozen=True)
class Metric:
    name: str
    scale: float  # shown as value * scale
    digits: int
    higher_is_better: bool
    axis: str


METRICS = {
    "accuracy": Metric("accuracy", 100.0, 1, True, "accuracy (%)"),
    "loss": Metric("loss", 1.0, 3, False, "mean response loss (lower is better)"),
}


def metric_of(task: dict) -> str:
    """A results entry's metric; results written before chat tasks existed are all accuracy."""
    return task.get("metric", "accuracy")


def metric_averages(per_task: dict[str, dict], tasks: list[dict]) -> dict[str, float]:
    """Per metric, the unweighted mean over its tasks (each task counts once, whatever its test size)."""
    averages = {}
    for metric in dict.fromkeys(metric_of(task) for task in tasks):
        values = [per_task[task["name"]][metric] for task in tasks if metric_of(task) == metric]
        averages[metric] = sum(values) / len(values)
    return averages


def _cell(metric: str, value: float) -> str:
    spec = METRICS[metric]
    return f"{value * spec.scale:.{spec.digits}f}"


def format_table(results: dict) -> str:
    """Rows: methods; columns: tasks, each metric's average, and that average against the reference
    method (accuracy: as a ratio; loss: as a difference)."""
    tasks = results["tasks"]
    metrics = list(dict.fromkeys(metric_of(task) for task in tasks))
    single = len(metrics) == 1
    reference = results.get("reference")
    header = [t["name"] + ("" if single else f" ({metric_of(t)})") for t in tasks]
    header += ["average" if single else f"average {m}" for m in metrics]
    if reference:
        header += [f"vs. {reference}" + ("" if single else f" ({m})") for m in metrics]
    lines = ["| method | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    averages = {label: method.get("averages") or {"accuracy": method["average"]}
                for label, method in results["methods"].items()}
    for label, method in results["methods"].items():
        cells = [label] + [_cell(metric_of(t), method["per_task"][t["name"]][metric_of(t)]) for t in tasks]
        cells += [f"**{_cell(m, averages[label][m])}**" for m in metrics]
        if reference:
            for m in metrics:
                ours, theirs = averages[label][m], averages[reference][m]
                cells.append(f"{100 * ours / theirs:.1f}%" if METRICS[m].higher_is_better else f"{ours - theirs:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scores(results: dict, path: Path | str, title: str = "Test accuracy per task") -> Path | None:
    """Grouped bars, one panel per metric: one group per task (and the average), one bar per method.

    Without matplotlib (the `charts` extra) no chart is drawn: one warning names it, and None is returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        reason = ("matplotlib is not installed" if exc.name == "matplotlib"
                  else f"matplotlib cannot be imported ({str(exc).splitlines()[0]})")
        log.warning("%s not drawn: %s (%s)", Path(path).name, reason, CHARTS_INSTALL)
        return None

    metrics = list(dict.fromkeys(metric_of(task) for task in results["tasks"]))
    methods = list(results["methods"])
    width = 0.8 / len(methods)
    panels = []
    for metric in metrics:
        tasks = [t["name"] for t in results["tasks"] if metric_of(t) == metric]
        panels.append((metric, tasks, tasks + ["average"]))
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # one colour per method
    figure, axes_list = plt.subplots(1, len(panels), dpi=120, squeeze=False,
                                     figsize=(sum(max(7.0, 1.4 * len(g) + 1) for _, _, g in panels), 4.2))
    for axes, (metric, tasks, groups) in zip(axes_list[0], panels):
        spec = METRICS[metric]
        for i, label in enumerate(methods):
            method = results["methods"][label]
            average = (method.get("averages") or {"accuracy": method["average"]})[metric]
            values = [spec.scale * method["per_task"][t][metric] for t in tasks] + [spec.scale * average]
            positions = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
            bars = axes.bar(positions, values, width, label=label, color=palette(i % palette.N))
            axes.bar_label(bars, labels=[f"{values[-1]:.{spec.digits}f}" if j == len(values) - 1 else ""
                                         for j in range(len(values))], fontsize=6, rotation=90, padding=2)
        axes.set_xticks(range(len(groups)), groups)
        axes.set_ylabel(spec.axis)
        if metric == "accuracy":
            axes.set_ylim(0, 105)
        axes.set_title(title)
        axes.legend(fontsize=7, ncols=min(len(methods), 4), loc="lower center", bbox_to_anchor=(0.5, -0.32))
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
