"""NaN and Inf in weights, activations and Grams; singular and ill-conditioned RegMean systems.

Singular systems have many minimisers, so the merge is judged by its objective value,
f(X) = sum_i tr((X - X_i)^T G~_i (X - X_i)) = sum_i ||X_i^{in} (W - W_i)||^2 / n_i, against the float64
least-squares optimum computed here from the same caches (eigendecomposition, no shared code).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.testing import make_model, save_model
from tests import faults
from tests.conftest import read_json

DEAD = [0, 1, 2, 3]  # hidden features every LayerNorm zeroes, and intermediate units that never fire


def dead_feature_model(seed: int, folder):
    """A BERT whose LayerNorms zero features 0-3 and whose FFNs have four units that never fire:
    every Gram gets zero rows and columns, so even G~ with a < 1 is singular."""
    model = make_model("bert", seed=seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm) or name.endswith("intermediate.dense"):
                module.weight[DEAD] = 0
                module.bias[DEAD] = 0
    return save_model(model, folder)


def outlier_feature_model(seed: int, folder):
    """A BERT with one hidden feature 300x larger than the rest: ill-conditioned, not singular."""
    model = make_model("bert", seed=seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[5] *= 300
    return save_model(model, folder)


def objective_gaps(caches, models, merged, ratio: float, *, bounded: bool = False) -> dict[str, float]:
    """Per layer: (f(merged) - f(optimum)) / f(first candidate), all in float64. ``bounded``: also check
    the merged weights stay the size of the candidates' (no blow-up along directions no input reached)."""
    gaps = {}
    loaded = [StatsCache(caches / name) for name in sorted(p.name for p in caches.iterdir() if not p.name.startswith("."))]
    weights = [load_file(str(m / "model.safetensors")) for m in models]
    state = load_file(str(merged / "model.safetensors"))
    for layer, entry in loaded[0].manifest.layers.items():
        grams = []
        for cache in loaded:
            g = cache.gram(entry.gram).double() / cache.manifest.grams[entry.gram].tokens
            g = ratio * g + (1 - ratio) * torch.diag(torch.diag(g))
            values, vectors = torch.linalg.eigh(g)
            grams.append((vectors * values.clamp_min(0)) @ vectors.T)  # PSD, as X^T X is
        targets = [w[entry.weight].double().T for w in weights]
        values, vectors = torch.linalg.eigh(sum(grams))
        kept = values > 1e-12 * values.max()
        optimum = (vectors[:, kept] / values[kept]) @ (vectors[:, kept].T @ sum(g @ t for g, t in zip(grams, targets)))

        def f(x):
            return sum(torch.trace((x - t).T @ g @ (x - t)) for g, t in zip(grams, targets)).item()

        gaps[layer] = (f(state[entry.weight].double().T) - f(optimum)) / f(targets[0])
        if bounded:
            assert state[entry.weight].norm() <= 1.5 * max(w[entry.weight].norm() for w in weights), layer
    return gaps


@pytest.fixture(scope="module")
def singular_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("singular")
    data = root / "duplicated.jsonl"  # one sentence, 24 times: rank <= its 6 tokens
    data.write_text("".join(json.dumps({"text": "the movie was really great"}) + "\n" for _ in range(24)))
    return root, data, [dead_feature_model(seed, root / f"dead{seed}") for seed in (1, 2)]


@pytest.mark.parametrize("ratio, solve_dtype, tolerance", [(1.0, "float64", 1e-12), (1.0, "float32", 1e-5),
                                                           (0.95, "float32", 1e-7)])
def test_singular_systems_reach_the_least_squares_optimum(ratio, solve_dtype, tolerance, singular_setup, cli,
                                                          tmp_path):
    root, data, models = singular_setup
    caches = root / "caches"
    if not caches.exists():
        for i, model in enumerate(models):  # float64 stats: Grams exact enough to define the optimum
            code, _, err = cli("stats", "--model", model, "--dataset", data, "--out", caches / f"c{i}", "--device",
                               "cpu", "--dtype", "float64", "--accumulate-dtype", "float64")
            assert code == 0, err
    with faults.trial("singular or ill-conditioned systems"):
        out = tmp_path / "merged"
        code, _, err = cli("merge", "--cache-dir", caches, "--out", out, "--device", "cpu",
                           "--reduce-non-diagonal-ratio", ratio, "--solve-dtype", solve_dtype)
        assert code == 0, err
        report = read_json(out / "merge_report.json")
        fallback = {name for name, layer in report["layers"].items() if layer["solver"] == "lu-ridge"}
        assert fallback and set(report["fallback_layers"]) >= fallback
        dims = {n: e["dim"] for n, e in read_json(caches / "c0" / "manifest.json")["grams"].items()}
        for name in fallback:
            layer = report["layers"][name]
            assert "condition_estimate" in layer and layer["rank"] < dims[layer["gram"]], name
        gaps = objective_gaps(caches, models, out, ratio, bounded=True)
        assert max(gaps.values()) <= tolerance and min(gaps.values()) >= -1e-12, gaps


def test_ill_conditioned_systems_are_redone_in_float64(cli, tmp_path, workspace):
    models = [outlier_feature_model(seed, tmp_path / f"outlier{seed}") for seed in (1, 2)]
    caches = tmp_path / "caches"
    for i, model in enumerate(models):
        code, _, err = cli("stats", "--model", model, "--dataset", workspace.text_task(i + 1), "--out", caches / f"c{i}",
                           "--device", "cpu", "--accumulate-dtype", "float64")
        assert code == 0, err
    with faults.trial("singular or ill-conditioned systems"):
        out = tmp_path / "merged"
        code, _, err = cli("merge", "--cache-dir", caches, "--out", out, "--device", "cpu")
        assert code == 0, err
        report = read_json(out / "merge_report.json")
        promoted = [n for n, layer in report["layers"].items() if layer["solver"] == "cholesky-float64"]
        assert promoted and set(promoted) <= set(report["fallback_layers"])
        assert all(report["layers"][n]["condition_estimate"] > 1e5 for n in promoted)
        gaps = objective_gaps(caches, models, out, 0.95)
        assert max(abs(g) for g in gaps.values()) <= 1e-6, gaps


# --- NaN and Inf --------------------------------------------------------------------------------

def test_nan_in_weights_stops_stats_before_the_forward_pass(workspace, cli, tmp_path):
    folder = tmp_path / "nan-model"
    shutil.copytree(workspace.model("bert", 1), folder)
    state = load_file(str(folder / "model.safetensors"))
    state["bert.encoder.layer.1.attention.self.value.weight"][3, 7] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with faults.trial("NaN or Inf in weights, activations or Grams"):
        code, _, err = cli("stats", "--model", folder, "--dataset", workspace.text_task(1), "--out", tmp_path / "a")
        assert code == 2 and "bert.encoder.layer.1.attention.self.value" in err and "NaN or Inf" in err, err
        assert not (tmp_path / "a").exists()


def test_float16_overflow_stops_stats_naming_the_layer(workspace, cli, tmp_path):
    """Weights that are fine in float32 overflow float16 activations: the first layer fed an Inf is named."""
    model = make_model("bert", seed=1)
    with torch.no_grad():  # each weight fits float16; the FFN's outputs (~1e5) do not
        model.bert.encoder.layer[0].attention.output.LayerNorm.weight.mul_(100.0)
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(1e4)
    folder = save_model(model, tmp_path / "overflow")
    with faults.trial("NaN or Inf in weights, activations or Grams"):
        code, _, err = cli("stats", "--model", folder, "--dataset", workspace.text_task(1), "--out", tmp_path / "a",
                           "--dtype", "float16", "--device", "cpu")
        assert code == 2 and "layer bert.encoder.layer.0.output.dense" in err and "NaN or Inf in its input" in err, err
        assert not (tmp_path / "a").exists()
    code, _, err = cli("stats", "--model", folder, "--dataset", workspace.text_task(1), "--out", tmp_path / "a",
                       "--device", "cpu")
    assert code == 0, err  # the same model in float32 is fine


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_gram_with_nan_or_inf_is_refused_by_merge(value, bert_caches, workspace, cli, tmp_path):
    import numpy as np
    import zarr

    from regmean_pipeline.cache.store import array_checksum

    cache = tmp_path / "caches" / "a"
    shutil.copytree(bert_caches["zarr"], cache)
    manifest = read_json(cache / "manifest.json")
    key = list(manifest["grams"])[-1]
    array = zarr.open_group(str(cache / "grams.zarr"), mode="r+")[key]
    values = array[...]
    values[np.random.default_rng(0).integers(len(values))] = value
    array[...] = values
    manifest["grams"][key]["checksum"] = array_checksum(key, manifest["grams"][key]["tokens"], values)
    (cache / "manifest.json").write_text(json.dumps(manifest))  # consistent checksum: only the values are wrong
    with faults.trial("NaN or Inf in weights, activations or Grams"):
        code, _, err = cli("merge", "--cache-dir", tmp_path / "caches", "--out", tmp_path / "m", "--device", "cpu")
        assert code == 2 and "NaN or Inf" in err and key in err, err
        assert not (tmp_path / "m").exists()
