"""Accuracy per task and method: the table (Markdown, so it pastes into a README) and the bar chart."""

from __future__ import annotations

from pathlib import Path


def method_average(per_task: dict[str, dict]) -> float:
    """The unweighted mean over tasks (each task counts once, whatever its test size), as papers report."""
    return sum(entry["accuracy"] for entry in per_task.values()) / len(per_task)


def format_table(results: dict) -> str:
    """Rows: methods; columns: tasks, their average, and the average relative to the reference method."""
    tasks = [task["name"] for task in results["tasks"]]
    reference = results.get("reference")
    header = ["method"] + tasks + ["average"] + ([f"vs. {reference}"] if reference else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reference_average = results["methods"][reference]["average"] if reference else None
    for label, method in results["methods"].items():
        cells = [label] + [f"{100 * method['per_task'][t]['accuracy']:.1f}" for t in tasks]
        cells.append(f"**{100 * method['average']:.1f}**")
        if reference:
            cells.append(f"{100 * method['average'] / reference_average:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(results: dict, path: Path | str, title: str = "Test accuracy per task") -> Path:
    """Grouped bars: one group per task (and the average), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task["name"] for task in results["tasks"]]
    groups = tasks + ["average"]
    methods = list(results["methods"])
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(figsize=(max(7.0, 1.4 * len(groups) + 1), 4.2), dpi=120)
    for i, label in enumerate(methods):
        method = results["methods"][label]
        values = [100 * method["per_task"][t]["accuracy"] for t in tasks] + [100 * method["average"]]
        positions = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(positions, values, width, label=label)
        axes.bar_label(bars, labels=[f"{values[-1]:.1f}" if j == len(values) - 1 else "" for j in range(len(values))],
                       fontsize=6, rotation=90, padding=2)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title(title)
    axes.legend(fontsize=7, ncols=min(len(methods), 4), loc="lower center", bbox_to_anchor=(0.5, -0.32))
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
