"""After `make demo`: how the merge the sweep chose on validation data does on the test sets, beside the grid
point that turned out best on them (known only because the sweep scored every point on test too, for this
report; the choice read validation alone).

    python -m demos.sweep_summary SWEEP.json EVAL_RESULTS.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def test_average(scores: dict) -> float:
    values = [s["accuracy"] * 100 if "accuracy" in s else s["loss"] for s in scores.values()]
    return sum(values) / len(values)


def summary(sweep: dict, results: dict | None = None) -> str:
    points = sweep["points"]
    chosen = points[sweep["best"]]
    accuracy = "accuracy" in next(iter(chosen["test"].values()))
    best_on_test = max(range(len(points)), key=lambda i: test_average(points[i]["test"]) * (1 if accuracy else -1))
    unit = "points" if accuracy else "loss"
    lines = [f"sweep: {len(points)} grid points; chosen on validation: #{sweep['best']} {chosen['label']}, test "
             f"average {test_average(chosen['test']):.{1 if accuracy else 3}f}",
             f"       best grid point on the test sets: #{best_on_test} {points[best_on_test]['label']}, test average "
             f"{test_average(points[best_on_test]['test']):.{1 if accuracy else 3}f} "
             f"({test_average(points[best_on_test]['test']) - test_average(chosen['test']):+.{1 if accuracy else 3}f} "
             f"{unit})"]
    if results and "sweep" in results["methods"]:
        published = results["methods"]["sweep"]["per_task"]
        lines.append(f"       the published merge (sweep/best, made again by regmean merge): test average "
                     f"{test_average(published):.{1 if accuracy else 3}f}")
    return "\n".join(lines)


def main() -> None:
    sweep = json.loads(Path(sys.argv[1]).read_text())
    results = json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) > 2 else None
    print(summary(sweep, results))


if __name__ == "__main__":
    main()
