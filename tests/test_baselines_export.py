"""Per-candidate export (merged body + own head) and the dataless baselines, against float64 references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from regmean_pipeline.testing import make_model, save_model
from tests.conftest import read_json

HEAD = r"classifier\..*"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny pretrained body (BertModel: names without the 'bert.' prefix) and two task models made from
    it with 2 and 3 labels, their bodies moved apart by seeded noise as fine-tuning would."""
    root = tmp_path_factory.mktemp("family")
    base = save_model(make_model("bert", seed=0, architectures=["BertModel"]), root / "base")
    candidates = {}
    for seed, (name, labels) in enumerate((("alpha", 2), ("beta", 3)), start=1):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=labels)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)
        candidates[name] = save_model(model, root / name)
    return base, candidates


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def body(names):
    return [name for name in names if not name.startswith("classifier.")]


def test_per_candidate_export_is_merged_body_plus_own_head_bit_for_bit(family, workspace, cli, tmp_path):
    _, candidates = family
    for i, (name, folder) in enumerate(candidates.items()):
        code, _, err = cli("stats", "--model", folder, "--dataset", workspace.text_task(seed=i, n=20),
                           "--out", tmp_path / "caches" / name, "--device", "cpu")
        assert code == 0, err
    out = tmp_path / "merged"
    code, _, err = cli("merge", "--cache-dir", tmp_path / "caches", "--exclude", HEAD, "--per-candidate",
                       "--out", out, "--device", "cpu")
    assert code == 0, err
    merged = state(out)
    report = read_json(out / "merge_report.json")
    assert report["per_candidate"] == {name: f"per_candidate/{name}" for name in candidates}
    assert report["totals"]["layers_solved"] > 0
    for name, folder in candidates.items():
        export = out / "per_candidate" / name
        own = state(folder)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(export)).eval()
        loaded = model.state_dict()
        assert model.config.num_labels == (2 if name == "alpha" else 3)
        assert set(state(export)) == set(own)
        for key in body(own):
            assert torch.equal(loaded[key], merged[key]), key
            assert torch.equal(state(export)[key], merged[key]), key
        for key in ("classifier.weight", "classifier.bias"):
            assert torch.equal(loaded[key], own[key]), key
        assert not torch.equal(merged["bert.pooler.dense.weight"], own["bert.pooler.dense.weight"])
        assert (export / "tokenizer.json").exists() and not (export / "merge_report.json").exists()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
        with torch.inference_mode():
            logits = model(**tokenizer(["the movie was good"], return_tensors="pt")).logits
        assert logits.shape == (1, model.config.num_labels)


def test_simple_average_needs_no_caches_and_is_the_mean(family, cli, tmp_path):
    _, candidates = family
    out = tmp_path / "average"
    code, _, err = cli("merge", "--method", "average", *[f"--model={n}={f}" for n, f in candidates.items()],
                       "--exclude", HEAD, "--per-candidate", "--out", out, "--device", "cpu")
    assert code == 0, err
    merged, (a, b) = state(out), [state(f) for f in candidates.values()]
    for key in body(a):
        expected = ((a[key].double() + b[key].double()) / 2).to(a[key].dtype)
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-7, msg=key)
    assert torch.equal(state(out / "per_candidate" / "beta")["classifier.weight"], b["classifier.weight"])
    report = read_json(out / "merge_report.json")
    assert report["settings"]["method"] == "average" and report["totals"]["layers_solved"] == 0


@pytest.mark.parametrize("scaling", [0.3, 1.0])
def test_task_arithmetic_against_float64(family, cli, tmp_path, scaling):
    """theta = theta_pre + lambda * sum_i (theta_i - theta_pre); the bare encoder's names lack 'bert.'."""
    base, candidates = family
    out = tmp_path / "ta"
    code, _, err = cli("merge", "--method", "task-arithmetic", "--pretrained", base, "--scaling", scaling,
                       *[f"--model={n}={f}" for n, f in candidates.items()], "--exclude", HEAD, "--out", out,
                       "--device", "cpu")
    assert code == 0, err
    merged, pre, tuned = state(out), state(base), [state(f) for f in candidates.values()]
    for key in body(tuned[0]):
        p = pre[key.removeprefix("bert.")]
        if not p.is_floating_point():
            assert torch.equal(merged[key], tuned[0][key])
            continue
        expected = p.double() + scaling * sum(t[key].double() - p.double() for t in tuned)
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)
    # lambda = 1/K would be plain averaging; 0.3 and 1.0 must differ from it
    average = (tuned[0]["bert.pooler.dense.weight"] + tuned[1]["bert.pooler.dense.weight"]) / 2
    assert not torch.allclose(merged["bert.pooler.dense.weight"], average)


def test_method_option_errors(family, workspace, cli, tmp_path):
    base, candidates = family
    models = [f"--model={n}={f}" for n, f in candidates.items()]
    code, _, err = cli("merge", "--method", "task-arithmetic", *models, "--exclude", HEAD, "--out", tmp_path / "x")
    assert code == 2 and "needs --pretrained" in err
    code, _, err = cli("merge", "--method", "average", "--scaling", "0.5", *models, "--exclude", HEAD, "--out",
                       tmp_path / "x")
    assert code == 2 and "only --method task-arithmetic" in err
    code, _, err = cli("merge", "--method", "mean", *models, "--out", tmp_path / "x")
    assert code == 2 and "--method: 'mean'" in err
    code, _, err = cli("merge", *models, "--out", tmp_path / "x")  # RegMean needs caches
    assert code == 2 and "no candidate has that name" in err
    other = save_model(make_model("bert", seed=0, architectures=["BertModel"], intermediate_size=48), tmp_path / "other")
    code, _, err = cli("merge", "--method", "task-arithmetic", "--pretrained", other, *models, "--exclude", HEAD,
                       "--out", tmp_path / "x")
    assert code == 2 and "intermediate.dense" in err and "shape" in err
    assert not (tmp_path / "x").exists()
