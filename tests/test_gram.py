"""Gram accumulation: exact sums, padding left out, shared inputs found by identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.measure.gram import GramAccumulator, collect_grams
from regmean_pipeline.testing import make_model, make_tokenizer
from tests.reference import capture_grams, linear_modules

TEXTS = ["the movie was great", "bad plot and dull music with a slow story", "why", "it works",
         "the camera is cheap but the battery is very bad and the screen broke"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def padded_batches(tokenizer, texts, batch_size=2):
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding="longest", return_tensors="pt")
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def single_examples(tokenizer, texts):
    return [{"input_ids": (e := tokenizer([t], return_tensors="pt"))["input_ids"],
             "attention_mask": e["attention_mask"]} for t in texts]


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2", "llama"])
def test_gram_equals_float64_xtx_of_unpadded_inputs(kind, tokenizer):
    """Each stored Gram is X^T X of the layer's real (non-pad) inputs: checked against a float64 capture
    that runs every example alone, so no padding exists in the reference at all."""
    model = make_model(kind, seed=3)
    stats = collect_grams(model, padded_batches(tokenizer, TEXTS), device="cpu", accumulate_dtype=torch.float64)
    reference = capture_grams(model, single_examples(tokenizer, TEXTS))
    assert set(stats.layers) == set(reference["grams"])
    for name, key in stats.layer_grams.items():
        expected = reference["grams"][name]
        got = stats.sums[key].numpy()
        # float32 forward of padded batches vs float64 forward of single examples
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), name
        assert stats.tokens[key] == reference["rows"][name], name


def test_float32_accumulation_matches_float64_on_same_forward(tokenizer):
    model = make_model("bert", seed=4)
    batches = list(padded_batches(tokenizer, TEXTS))
    f32 = collect_grams(model, batches, device="cpu", accumulate_dtype=torch.float32)
    f64 = collect_grams(model, batches, device="cpu", accumulate_dtype=torch.float64)
    for key in f64.sums:
        expected = f64.sums[key].numpy()
        assert np.linalg.norm(f32.sums[key].double().numpy() - expected) <= 1e-6 * np.linalg.norm(expected)


def test_padding_is_left_out_unless_asked(tokenizer):
    model = make_model("bert", seed=5)
    batches = list(padded_batches(tokenizer, TEXTS, batch_size=5))
    mask = batches[0]["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding for this test to mean anything"
    masked = collect_grams(model, batches, device="cpu")
    padded = collect_grams(model, batches, device="cpu", include_padding=True)
    key = masked.layer_grams["bert.encoder.layer.0.attention.self.query"]
    assert masked.tokens[key] == int(mask.sum())
    assert padded.tokens[key] == mask.numel()
    # The pooler sees one row per example either way.
    assert masked.tokens[masked.layer_grams["bert.pooler.dense"]] == len(TEXTS)
    # Including pads reproduces FusionBench's flattened x^T x.
    captured = {}
    def keep_input(module, args):
        captured["x"] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

    handle = dict(model.named_modules())["bert.encoder.layer.1.output.dense"].register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(**batches[0])
    handle.remove()
    x = captured["x"]
    got = padded.sums[padded.layer_grams["bert.encoder.layer.1.output.dense"]].double()
    assert torch.allclose(got, x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))


def test_shared_inputs_are_detected():
    tokenizer_free = {"input_ids": torch.tensor([[2, 7, 8, 9, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    bert = collect_grams(make_model("bert"), [tokenizer_free], device="cpu")
    q = bert.layer_grams["bert.encoder.layer.0.attention.self.query"]
    assert bert.layer_grams["bert.encoder.layer.0.attention.self.key"] == q
    assert bert.layer_grams["bert.encoder.layer.0.attention.self.value"] == q
    assert bert.layer_grams["bert.encoder.layer.0.attention.output.dense"] != q
    llama = collect_grams(make_model("llama"), [tokenizer_free], device="cpu")
    assert llama.layer_grams["model.layers.1.mlp.up_proj"] == llama.layer_grams["model.layers.1.mlp.gate_proj"]
    assert llama.layer_grams["model.layers.1.self_attn.v_proj"] == llama.layer_grams["model.layers.1.self_attn.q_proj"]
    assert llama.layer_grams["model.layers.1.mlp.down_proj"] == "model.layers.1.mlp.down_proj"
    assert len(llama.sums) == 2 * 4 + 1  # per block: qkv, o, gate+up, down; plus the score head
    # Every layer maps to exactly one stored Gram, and the GPT-2 Conv1D layers are flagged transposed.
    gpt2 = collect_grams(make_model("gpt2"), [tokenizer_free], device="cpu")
    assert gpt2.layers["transformer.h.0.attn.c_attn"].transposed
    assert not bert.layers["bert.encoder.layer.0.attention.self.query"].transposed
    assert len(set(gpt2.layer_grams.values())) == len(gpt2.layer_grams)


class _Recycled(nn.Module):
    """Two layers fed different temporaries; the first is freed before the second exists, so the
    allocator (and CPython's id()) may hand the second the same address and the same id."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)

    def forward(self, x):
        a = self.first(x * 2.0).sum()
        return a + self.second(x * 3.0).sum()


def test_reused_addresses_are_not_mistaken_for_sharing():
    model = _Recycled()
    x = torch.randn(4, 8)
    stats = collect_grams(model, [{"x": x}], device="cpu", accumulate_dtype=torch.float64)
    assert stats.layer_grams == {"first": "first", "second": "second"}
    assert torch.allclose(stats.sums["second"], (3 * x).double().T @ (3 * x).double())


class _Shifty(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.a(x) + self.b(x if self.calls == 1 else x + 1)


def test_sharing_that_changes_between_batches_is_an_error():
    with pytest.raises(RegMeanError, match="layer b"):
        collect_grams(_Shifty(), [{"x": torch.randn(2, 4)}, {"x": torch.randn(2, 4)}], device="cpu")


def test_non_finite_activations_name_the_layer():
    model = make_model("bert", seed=1)
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    batch = {"input_ids": torch.tensor([[2, 7, 8, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(RegMeanError, match="layer bert.encoder.layer.1.output.dense"):
        collect_grams(model, [batch], device="cpu")


def test_hooks_are_removed_afterwards():
    model = make_model("bert", seed=1)
    with GramAccumulator(model):
        pass
    assert all(not m._forward_pre_hooks for m in linear_modules(model).values())
