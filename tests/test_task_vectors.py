"""TIES, DARE and DARE-TIES against independent float64 implementations, and the pieces they stand on:
the exact streaming selection, the counter-based drop masks, and merges that do not depend on chunking.

The references hold every task vector in memory: the global trim keeps |delta| >= the k-th smallest
magnitude over the whole model with k = d - int(d * density) (FusionBench's ``topk_values_mask``), the
tensor trim the k = max(1, int(density * numel)) largest of each tensor (mergekit's ``magnitude``), both
selecting on float32 magnitudes as those tools do; the sign is elected on the coefficient-weighted sum
(+ for a zero sum) and the agreeing values are summed, averaged over their coefficients, or the largest.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from regmean_pipeline.merge.methods.task_vectors import keep_mask, kth_largest, stream_key
from regmean_pipeline.testing import make_model, save_model
from tests.faults import trial

HEAD = r"classifier\..*"


def test_kth_largest_is_exact_over_chunks_with_ties_and_zeros():
    """By the two counting passes (several chunks) and directly (one chunk), against a sort."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(50_000, generator=generator).abs()
    values[::7] = 0.0
    values[1::11] = values[5]  # many ties
    values[3] = float("inf")
    ordered = torch.sort(values, descending=True).values
    for chunks in (list(values.split(4093)), [values]):
        for rank in (1, 2, 17, 9_999, 25_000, 43_000, 49_999, 50_000):
            assert kth_largest(lambda: iter(chunks), rank) == float(ordered[rank - 1]), rank


def test_drop_masks_are_philox_draws_chunk_independent_and_keep_the_density():
    """Element i is kept when the i-th double of numpy's Philox stream under the key is below the density,
    whatever chunk it is drawn in."""
    key = stream_key(7, "alpha", "encoder.layer.0.weight")
    whole = keep_mask(key, 0, 100_000, 0.3)
    pieces = torch.cat([keep_mask(key, start, min(977, 100_000 - start), 0.3) for start in range(0, 100_000, 977)])
    assert torch.equal(whole, pieces)
    draws = np.random.Generator(np.random.Philox(key=np.array(key, dtype=np.uint64))).random(100_000)
    assert torch.equal(whole, torch.from_numpy(draws < 0.3))
    rate, spread = float(whole.double().mean()), math.sqrt(0.3 * 0.7 / 100_000)
    assert abs(rate - 0.3) < 5 * spread
    other = keep_mask(stream_key(7, "beta", "encoder.layer.0.weight"), 0, 100_000, 0.3)
    assert 0.4 < float((whole ^ other).double().mean()) < 0.44  # independent draws: 2 p (1 - p) = 0.42
    assert torch.equal(keep_mask(key, 10, 5, 0.3), whole[10:15])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-vectors")
    base = save_model(make_model("bert", seed=0, architectures=["BertModel"]), root / "base")
    models = {}
    for seed, name in enumerate(("alpha", "beta", "gamma"), start=1):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02 * seed)
        models[name] = save_model(model, root / name)
    return base, models


def loaded(family):
    base, models = family
    pretrained = {f"bert.{k}": v for k, v in load_file(str(base / "model.safetensors")).items()}
    states = {name: load_file(str(folder / "model.safetensors")) for name, folder in models.items()}
    names = [n for n in states["alpha"] if not n.startswith("classifier.") and states["alpha"][n].is_floating_point()]
    return pretrained, states, names


def reference(family, *, coefficients, scaling, trim=None, scope="global", elect=False, merge_func="sum",
              drop=None, rescale="inverse", seed=0, densities=None):
    pretrained, states, names = loaded(family)
    candidates = list(states)
    deltas = {c: {n: states[c][n].double() - pretrained[n].double() for n in names} for c in candidates}
    if drop is not None:
        for c in candidates:
            density = (densities or {}).get(c, drop)
            for n in names:
                keep = keep_mask(stream_key(seed, c, n), 0, deltas[c][n].numel(), density).reshape(deltas[c][n].shape)
                kept = deltas[c][n] * keep
                if rescale == "inverse":
                    kept = kept / density
                elif rescale == "l1":
                    before, after = float(deltas[c][n].abs().sum()), float(kept.abs().sum())
                    kept = kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
                deltas[c][n] = kept
    if trim is not None:
        for c in candidates:
            density = (densities or {}).get(c, trim) if drop is None else trim
            magnitudes = {n: deltas[c][n].float().abs() for n in names}
            if scope == "global":
                flat = torch.cat([m.flatten() for m in magnitudes.values()])
                k = flat.numel() - int(flat.numel() * density)
                threshold = torch.kthvalue(flat, k).values
                deltas[c] = {n: deltas[c][n] * (magnitudes[n] >= threshold) for n in names}
            else:
                for n in names:
                    flat = magnitudes[n].flatten()
                    k = max(1, int(density * flat.numel()))
                    keep = torch.zeros(flat.numel(), dtype=torch.bool)
                    keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
                    deltas[c][n] = deltas[c][n] * keep.reshape(magnitudes[n].shape)
    merged = {}
    weights = torch.tensor([coefficients.get(c, 1.0) for c in candidates], dtype=torch.float64)
    for n in names:
        stacked = torch.stack([deltas[c][n] for c in candidates]) * weights.reshape(-1, *[1] * deltas["alpha"][n].dim())
        if not elect:
            total = stacked.sum(0)
        else:
            sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
            agree = torch.sign(stacked) == sign
            chosen = stacked * agree
            if merge_func == "sum":
                total = chosen.sum(0)
            elif merge_func == "max":
                total = chosen.abs().max(0).values * sign
            else:
                divisor = (weights.reshape(-1, *[1] * sign.dim()) * agree).sum(0)
                total = chosen.sum(0) / torch.where(divisor == 0, 1.0, divisor)
        merged[n] = pretrained[n].double() + scaling * total
    return merged


def run_merge(cli, family, out, *args):
    base, models = family
    code, _, err = cli("merge", *[f"--model={n}={f}" for n, f in models.items()], "--pretrained", base,
                       "--exclude", HEAD, "--out", out, "--device", "cpu", *args)
    assert code == 0, err
    return load_file(str(out / "model.safetensors"))


def assert_matches(ours, expected):
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name].double(), tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("scope, merge_func", [("global", "sum"), ("tensor", "mean"), ("global", "max")])
def test_ties_equals_its_float64_reference(family, cli, tmp_path, scope, merge_func):
    ours = run_merge(cli, family, tmp_path / "m", "--method", "ties", "--trim", scope, "--merge-func", merge_func,
                     "--density", "0.3", "--scaling", "0.7", "--coefficient", "beta=2", "--batch-memory", "64KiB")
    assert_matches(ours, reference(family, coefficients={"beta": 2.0}, scaling=0.7, trim=0.3, scope=scope,
                                   elect=True, merge_func=merge_func))


def test_per_candidate_densities(family, cli, tmp_path):
    ours = run_merge(cli, family, tmp_path / "m", "--method", "ties", "--trim", "tensor", "--merge-func", "mean",
                     "--density", "0.5", "--candidate-density", "gamma=0.1", "--scaling", "1")
    assert_matches(ours, reference(family, coefficients={}, scaling=1.0, trim=0.5, scope="tensor", elect=True,
                                   merge_func="mean", densities={"gamma": 0.1}))


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
def test_dare_equals_its_float64_reference_and_ignores_chunking(family, cli, tmp_path, rescale):
    args = ("--method", "dare", "--density", "0.4", "--rescale", rescale, "--seed", "3", "--scaling", "0.5")
    ours = run_merge(cli, family, tmp_path / "m", *args)
    assert_matches(ours, reference(family, coefficients={}, scaling=0.5, drop=0.4, rescale=rescale, seed=3))
    chunked = run_merge(cli, family, tmp_path / "chunked", *args, "--batch-memory", "32KiB")
    assert all(torch.equal(chunked[n], ours[n]) for n in ours)
    again = run_merge(cli, family, tmp_path / "other-seed", *args[:-4], "--seed", "4", "--scaling", "0.5")
    assert not torch.equal(again["bert.encoder.layer.0.attention.self.query.weight"],
                           ours["bert.encoder.layer.0.attention.self.query.weight"])


def test_dare_ties_drops_then_trims_and_elects(family, cli, tmp_path):
    ours = run_merge(cli, family, tmp_path / "m", "--method", "dare-ties", "--density", "0.6", "--trim-density",
                     "0.5", "--seed", "1", "--scaling", "0.5", "--merge-func", "sum")
    assert_matches(ours, reference(family, coefficients={}, scaling=0.5, drop=0.6, trim=0.5, scope="global",
                                   elect=True, merge_func="sum", seed=1))


def test_task_arithmetic_is_the_scaled_sum_of_task_vectors(family, cli, tmp_path):
    ours = run_merge(cli, family, tmp_path / "m", "--method", "task-arithmetic", "--scaling", "0.4",
                     "--coefficient", "alpha=0.5")
    assert_matches(ours, reference(family, coefficients={"alpha": 0.5}, scaling=0.4))


@pytest.mark.parametrize("args, message", [
    (("--method", "ties", "--density", "0"), "--density: must lie in (0, 1], got 0.0"),
    (("--method", "dare", "--density", "1.5"), "--density: must lie in (0, 1], got 1.5"),
    (("--method", "ties", "--candidate-density", "alpha=0"), "--candidate-density alpha: must lie in (0, 1]"),
    (("--method", "ties", "--trim", "layer"), "--trim: 'layer' is not one of global, tensor"),
    (("--method", "dare", "--merge-func", "mean"), "--merge-func: only --method ties, dare-ties use it (not dare)"),
])
def test_bad_method_parameters_are_one_line_each(family, cli, tmp_path, args, message):
    base, models = family
    with trial("bad merge parameters (out of range, another method's)"):
        code, _, err = cli("merge", *[f"--model={n}={f}" for n, f in models.items()], "--pretrained", base,
                           *args, "--out", tmp_path / "x")
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_an_adapter_candidate_merges_like_its_merged_weights(tmp_path, cli):
    """Task vectors of LoRA adapters: the adapter's base plus its update, read lazily, as a full model would be."""
    peft = pytest.importorskip("peft")
    base = make_model("llama_causal", seed=0)
    base_dir = save_model(base, tmp_path / "base")
    adapters = {}
    for seed, name in ((1, "a"), (2, "b")):
        model = peft.get_peft_model(make_model("llama_causal", seed=0),
                                    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        model.save_pretrained(str(tmp_path / name))
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                                             str(base_dir)}))
        full = model.merge_and_unload()
        save_model(full, tmp_path / f"{name}-full")
        adapters[name] = tmp_path / name
    for kind, folders in (("adapters", adapters), ("full", {n: tmp_path / f"{n}-full" for n in adapters})):
        code, _, err = cli("merge", "--method", "ties", *[f"--model={n}={f}" for n, f in folders.items()],
                           "--pretrained", base_dir, "--density", "0.5",
                           "--out", tmp_path / kind, "--device", "cpu")
        assert code == 0, err
    ours, full = load_file(str(tmp_path / "adapters" / "model.safetensors")), \
        load_file(str(tmp_path / "full" / "model.safetensors"))
    for name, tensor in full.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert np.isfinite(ours["model.layers.0.self_attn.q_proj.weight"].numpy()).all()
