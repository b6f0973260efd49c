"""The merge: RegMean's closed form against an independent float64 reference, and its identities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.conftest import read_json
from tests.reference import capture_grams, regmean_reference, relative_error


def texts_of(path):
    return [json.loads(line)["text"] for line in open(path)]


def load(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()


def merged_state(folder):
    return load_file(str(folder / "model.safetensors"))


def make_caches(cli, tmp_path, models, tasks, *stats_args, name="caches"):
    caches = tmp_path / name
    for i, (model, task) in enumerate(zip(models, tasks)):
        code, _, err = cli("stats", "--model", model, "--dataset", task, "--out", caches / f"c{i}",
                           "--num-examples", 1000, "--batch-size", 5, "--device", "cpu", *stats_args)
        assert code == 0, err
    return caches


def merge(cli, caches, out, *args):
    code, _, err = cli("merge", "--cache-dir", caches, "--out", out, "--device", "cpu", *args)
    assert code == 0, err
    return out


def reference_for(models, tasks, ratio, exclude=()):
    tokenizer = transformers.AutoTokenizer.from_pretrained(models[0])
    loaded = [load(m) for m in models]
    captured = []
    for model, task in zip(loaded, tasks):
        examples = [dict(tokenizer([t], return_tensors="pt")) for t in texts_of(task)]
        examples = [{k: v for k, v in e.items() if k in ("input_ids", "attention_mask")} for e in examples]
        captured.append(capture_grams(model, examples))
    return regmean_reference(loaded, captured, ratio, exclude)


@pytest.mark.parametrize("kind, ratio", [("bert", 0.95), ("gpt2", 0.6), ("llama", 0.95), ("roberta", 0.9)])
def test_merge_equals_float64_closed_form(kind, ratio, workspace, cli, tmp_path):
    """Relative Frobenius error of every merged tensor against the float64 reference.

    Outputs are stored in the checkpoints' float32, so 6e-8 (half an ulp) is the floor. A float64 run
    reaches it; float32 Grams with a float64 solve stay under 1e-5; all-float32 stays under 1e-4, its
    error growing with the conditioning of the few-row pooler/classifier Grams (condition ~1e3 here).
    """
    models = [workspace.model(kind, seed) for seed in (1, 2, 3)]
    tasks = [workspace.text_task(seed) for seed in (1, 2, 3)]
    expected = reference_for(models, tasks, ratio)
    ratio_flag = ("--reduce-non-diagonal-ratio", ratio)
    caches64 = make_caches(cli, tmp_path, models, tasks, "--dtype", "float64", "--accumulate-dtype", "float64",
                           name="caches64")
    caches32 = make_caches(cli, tmp_path, models, tasks, name="caches32")
    results = {
        "float64": merged_state(merge(cli, caches64, tmp_path / "m64", *ratio_flag, "--solve-dtype", "float64")),
        "float64 solve": merged_state(merge(cli, caches32, tmp_path / "m32s64", *ratio_flag, "--solve-dtype", "float64")),
        "float32": merged_state(merge(cli, caches32, tmp_path / "m32", *ratio_flag)),
    }
    worst = {}
    for label, state in results.items():
        assert set(state) == set(expected)
        worst[label] = max(relative_error(state[n], expected[n]) for n in expected)
    assert worst["float64"] < 1e-7, worst
    assert worst["float64 solve"] < 1e-5, worst
    assert worst["float32"] < 1e-4, worst


def test_identities_copies_single_and_diagonal_average(workspace, cli, tmp_path):
    bert = [workspace.model("bert", seed) for seed in (1, 2)]
    tasks = [workspace.text_task(seed) for seed in (1, 2, 3)]

    # K copies of one model (on different data, with unequal coefficients) merge back to that model, bit for
    # bit in every tensor: the solved ones and the averaged ones (embeddings, biases, LayerNorms).
    stored = merged_state(bert[0])
    copies = make_caches(cli, tmp_path, [bert[0]] * 3, tasks, name="copies")
    state = merged_state(merge(cli, copies, tmp_path / "copies-merged", "--coefficient", "c1=2",
                               "--coefficient", "c2=0.3"))
    report = read_json(tmp_path / "copies-merged" / "merge_report.json")
    assert report["totals"]["layers_solved"] > 0 and report["totals"]["averaged"] > 0
    assert state.keys() == stored.keys()
    for name, tensor in state.items():
        assert tensor.dtype == stored[name].dtype and tensor.numpy().tobytes() == stored[name].numpy().tobytes(), name

    # K = 1 gives the model back, bit for bit.
    single = make_caches(cli, tmp_path, [bert[0]], tasks[:1], name="single")
    state = merged_state(merge(cli, single, tmp_path / "single-merged"))
    for name, tensor in state.items():
        assert tensor.numpy().tobytes() == stored[name].numpy().tobytes(), name

    # a = 0: each input feature's weights are averaged with weights proportional to its mean square.
    pair = make_caches(cli, tmp_path, bert, tasks[:2], "--accumulate-dtype", "float64", name="pair")
    state = merged_state(merge(cli, pair, tmp_path / "diag", "--reduce-non-diagonal-ratio", 0, "--solve-dtype", "float64"))
    from regmean_pipeline.cache.store import StatsCache

    caches = [StatsCache(pair / "c0"), StatsCache(pair / "c1")]
    weights = [load(m).state_dict() for m in bert]
    for layer, entry in caches[0].manifest.layers.items():
        mean_squares = [np.diag(c.gram(entry.gram).numpy()) / c.manifest.grams[entry.gram].tokens for c in caches]
        w_t = [w[entry.weight].double().numpy().T for w in weights]
        expected = sum(m[:, None] * w for m, w in zip(mean_squares, w_t)) / sum(mean_squares)[:, None]
        assert relative_error(state[entry.weight].T, expected) < 1e-6, layer


def test_zarr_and_safetensors_caches_give_the_same_merge(workspace, cli, tmp_path):
    models = [workspace.model("llama", seed) for seed in (1, 2)]
    tasks = [workspace.text_task(seed) for seed in (1, 2)]
    zarr_caches = make_caches(cli, tmp_path, models, tasks, "--format", "zarr", name="z")
    st_caches = make_caches(cli, tmp_path, models, tasks, "--format", "safetensors", name="s")
    assert (zarr_caches / "c0" / "grams.zarr").is_dir() and (st_caches / "c0" / "grams.safetensors").is_file()
    a = merged_state(merge(cli, zarr_caches, tmp_path / "a"))
    b = merged_state(merge(cli, st_caches, tmp_path / "b"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "roberta"])
def test_merged_folder_loads_and_runs(kind, workspace, cli, tmp_path):
    models = [workspace.model(kind, seed) for seed in (1, 2)]
    caches = make_caches(cli, tmp_path, models, [workspace.text_task(s) for s in (1, 2)])
    out = merge(cli, caches, tmp_path / "merged", "--max-shard-size", "20KB")
    index = read_json(out / "model.safetensors.index.json")  # small shards force the sharded layout
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["the movie was great", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    report = read_json(out / "merge_report.json")
    assert report["totals"]["layers_solved"] == len(report["layers"]) > 0
    assert all(layer["solver"] == "cholesky" and layer["residual"] < 1e-6 for layer in report["layers"].values())


def test_heads_with_different_label_counts_must_be_excluded(workspace, cli, tmp_path):
    models = [workspace.model("bert", 1), workspace.model("bert", 2, num_labels=6)]
    caches = make_caches(cli, tmp_path, models, [workspace.text_task(1), workspace.text_task(2, labels=6)])
    code, _, err = cli("merge", "--cache-dir", caches, "--out", tmp_path / "m", "--device", "cpu")
    assert code == 2 and "parameter classifier." in err and "--exclude" in err
    assert not (tmp_path / "m").exists()
    out = merge(cli, caches, tmp_path / "m", "--exclude", r"classifier\..*", "--base", models[1])
    state, head = merged_state(out), load(models[1]).state_dict()
    assert torch.equal(state["classifier.weight"], head["classifier.weight"])
    assert read_json(out / "config.json")["id2label"].keys() == {str(i) for i in range(6)}
    assert "classifier.weight" in read_json(out / "merge_report.json")["copied"]


def test_coefficients_and_token_weighting(workspace, cli, tmp_path):
    models = [workspace.model("bert", seed) for seed in (1, 2)]
    tasks = [workspace.text_task(1, n=24), workspace.text_task(2, n=48)]
    caches = make_caches(cli, tmp_path, models, tasks, "--accumulate-dtype", "float64")
    states = [load(m).state_dict() for m in models]
    out = merge(cli, caches, tmp_path / "coef", "--coefficient", "c0=3", "--solve-dtype", "float64")
    state = merged_state(out)
    expected = (3 * states[0]["bert.embeddings.LayerNorm.weight"] + states[1]["bert.embeddings.LayerNorm.weight"]) / 4
    assert torch.allclose(state["bert.embeddings.LayerNorm.weight"], expected, rtol=1e-6)
    # A coefficient c scales a candidate's Gram: equivalent to `tokens` weighting when c = tokens share.
    from regmean_pipeline.cache.store import StatsCache

    key = "bert.encoder.layer.0.attention.self.query"
    t0, t1 = (StatsCache(caches / c).manifest.grams[key].tokens for c in ("c0", "c1"))
    by_tokens = merged_state(merge(cli, caches, tmp_path / "tok", "--gram-weighting", "tokens", "--solve-dtype", "float64"))
    by_coef = merged_state(merge(cli, caches, tmp_path / "c", "--coefficient", f"c0={t0}", "--coefficient", f"c1={t1}",
                                 "--solve-dtype", "float64"))
    assert relative_error(by_tokens[key + ".weight"], by_coef[key + ".weight"].double().numpy()) < 1e-6


def test_tied_lm_head_is_averaged_with_its_embedding(workspace, cli, tmp_path):
    models = [workspace.model("gpt2", seed, architectures=["GPT2LMHeadModel"]) for seed in (1, 2)]
    caches = make_caches(cli, tmp_path, models, [workspace.text_task(s) for s in (1, 2)])
    manifest = read_json(caches / "c0" / "manifest.json")
    assert "lm_head" not in manifest["layers"]
    out = merge(cli, caches, tmp_path / "lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    expected = sum(load(m).transformer.wte.weight for m in models) / 2
    assert torch.allclose(model.transformer.wte.weight, expected)


def test_clip_vision_tower_on_images(workspace, cli, tmp_path):
    models = [workspace.model("clip_vision", seed) for seed in (1, 2)]
    caches = tmp_path / "caches"
    for i, model in enumerate(models):
        code, _, err = cli("stats", "--model", model, "--dataset", workspace.image_task(i), "--image-column", "image",
                           "--out", caches / f"c{i}", "--batch-size", 4, "--device", "cpu")
        assert code == 0, err
    manifest = read_json(caches / "c0" / "manifest.json")
    # CLIP attention: q, k and v share one input Gram; 12 images x (16 patches + 1 class token) rows
    q = manifest["layers"]["vision_model.encoder.layers.0.self_attn.q_proj"]["gram"]
    assert manifest["layers"]["vision_model.encoder.layers.0.self_attn.v_proj"]["gram"] == q
    assert manifest["grams"][q]["tokens"] == 12 * 17
    out = merge(cli, caches, tmp_path / "merged")
    merged = transformers.CLIPVisionModelWithProjection.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(merged(pixel_values=torch.randn(1, 3, 32, 32)).image_embeds).all()
