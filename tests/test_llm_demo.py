"""The LLM walk-through (demos/llm.py, `make llm-demo`) end to end, in a configuration small enough for a test."""

from __future__ import annotations

import json

import pytest

from demos.llm import Recipe, run
from regmean_pipeline.testing import CHAT_TASKS

TINY = Recipe(hidden=32, layers=1, base_steps=8, adapter_steps=12, batch_size=8, learning_rate=1e-2, rank=4,
              n_train=32, n_test=8, stats_examples=16, scalings=[0.5])


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-demo")
    return out, run(out, TINY)


def test_walkthrough_trains_adapters_merges_and_scores_every_method(walkthrough):
    out, results = walkthrough
    assert list(results["methods"]) == ["base", "individual", "average", "task-arithmetic-0.5", "ties", "fisher",
                                        "regmean", "regmean-response-tokens", "regmean-trace", "regmean++", "sweep"]
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert {p["method"] for p in sweep["points"]} >= {"regmean", "fisher", "average", "ties", "dare"}
    assert all(set(p["validation"]) == set(CHAT_TASKS) and "loss" in p["validation"]["topic"] for p in sweep["points"])
    assert [t["name"] for t in results["tasks"]] == list(CHAT_TASKS)
    assert {t["metric"] for t in results["tasks"]} == {"loss"}
    for name in CHAT_TASKS:
        adapter = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
        manifest = json.loads((out / "caches" / name / "manifest.json").read_text())
        assert manifest["examples"] == TINY.stats_examples and manifest["model"]["base_model"] == adapter[
            "base_model_name_or_path"]
        assert manifest["statistics"] == ["gram", "fisher"]
        trained_on = [json.loads(line) for line in (out / "tasks" / name / "validation.jsonl").read_text().splitlines()]
        assert trained_on and len(trained_on) < TINY.n_train  # held out of the adapter's training
        response = json.loads((out / "caches-response" / name / "manifest.json").read_text())
        assert response["dataset"]["tokens"] == "response"
        assert {g["tokens"] for g in response["grams"].values()} == {2 * TINY.stats_examples}  # answer + end
        training = json.loads((out / "adapters" / name / "training.json").read_text())
        for method in results["methods"].values():
            scores = method["per_task"][name]
            assert scores["tokens"] == 2 * TINY.n_test  # the answer word and the end of the turn
            assert scores["loss"] > 0
        assert training["final_loss"] > 0
    individual = results["methods"]["individual"]["per_task"]
    base = results["methods"]["base"]["per_task"]
    assert all(individual[t]["loss"] != base[t]["loss"] for t in CHAT_TASKS)  # the adapters changed the model
    table = (out / "eval" / "results.md").read_text().splitlines()
    assert table[0] == "| method | sentiment | topic | question | average | vs. individual |"
    assert [row.split(" | ")[0] for row in table[2:]] == [f"| {m}" for m in results["methods"]]
    assert (out / "eval" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_walkthrough_rerun_reuses_adapters_and_scores(walkthrough):
    out, _ = walkthrough
    before = {name: (out / "adapters" / name / "adapter_model.safetensors").read_bytes() for name in CHAT_TASKS}
    results = run(out, TINY)
    assert {name: (out / "adapters" / name / "adapter_model.safetensors").read_bytes()
            for name in CHAT_TASKS} == before
    assert results["reused_scores"] == len(CHAT_TASKS) * len(results["methods"])
