"""The Fisher statistic and Fisher merging against independent float64 references.

The reference Fisher takes one example at a time, cut to its own length (so no padding and no mask
exists), with plain autograd: for a classifier the expected Fisher sum_y p(y|x) (d log p(y|x))^2, for a
causal LM the squared gradient of its counted tokens' log-likelihood; the batch estimator is the square of
the gradient of sum sqrt(p) log p over the batch (FusionBench's formula). Fisher merging is checked
against its formula in float64, with FusionBench's floor and normalisation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.measure.fisher import FisherAccumulator
from regmean_pipeline.testing import make_model, save_model
from tests.conftest import read_json
from tests.faults import trial

HEAD = r"classifier\..*|score\..*"


def batch_of(model, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids of the given lengths, right-padded with the model's pad id, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), model.config.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, 60, (length,), generator=generator)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reference_fisher(model, batch, kind: str, counted: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One example at a time, at its own length, in float64."""
    model = model.double()
    parameters = dict(model.named_parameters())
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in parameters.items()}
    for row in range(len(batch["input_ids"])):
        length = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row:row + 1, :length]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        if kind == "classifier":
            log_probs = torch.log_softmax(logits[0], -1)
            for label in range(log_probs.shape[0]):
                grads = torch.autograd.grad(log_probs[label], list(parameters.values()), retain_graph=True,
                                            allow_unused=True)
                for (name, _), grad in zip(parameters.items(), grads):
                    if grad is not None:
                        total[name] += log_probs[label].exp().detach() * grad ** 2
        else:
            weights = torch.ones(length - 1, dtype=torch.float64) if counted is None else \
                counted[row, 1:length].double()
            picked = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            grads = torch.autograd.grad((picked * weights).sum(), list(parameters.values()), allow_unused=True)
            for (name, _), grad in zip(parameters.items(), grads):
                if grad is not None:
                    total[name] += grad ** 2
    model.float()
    return total


def assert_close_fisher(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float = 1e-9):
    """Each parameter's Fisher to ``rtol`` of its largest entry (float64 throughout: 1e-9; float32: 1e-3, the
    squares of small gradients of a float32 backward)."""
    for name, expected in reference.items():
        got = ours[name].double()
        scale = float(expected.abs().max()) or 1.0
        assert float((got - expected).abs().max()) <= rtol * scale + 1e-12, name


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("whole_model_vmap", [False, True])
def test_per_example_classifier_fisher_equals_one_example_at_a_time(kind, whole_model_vmap):
    """Bidirectional (BERT) and causal (GPT-2, Llama) classifiers, batches with padding; by the per-module
    hooks and by the fallback, vmap over the whole model."""
    reference = reference_fisher(make_model(kind, seed=3), batch_of(make_model(kind), [7, 4, 6, 2], seed=1),
                                 "classifier")
    second = reference_fisher(make_model(kind, seed=3), batch_of(make_model(kind), [3, 5], seed=2), "classifier")
    expected = {name: reference[name] + second[name] for name in reference}
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        model = make_model(kind, seed=3).to(dtype)
        accumulator = FisherAccumulator(model, memory=1 << 16, accumulate_dtype=dtype)  # one example per chunk
        accumulator._whole_model_vmap = whole_model_vmap
        accumulator.add(batch_of(model, [7, 4, 6, 2], seed=1))
        accumulator.add(batch_of(model, [3, 5], seed=2))
        stats = accumulator.result()
        assert stats.examples == 6 and accumulator._whole_model_vmap == whole_model_vmap
        assert_close_fisher(stats.sums, expected, rtol)


@pytest.mark.parametrize("kind", ["bert", "llama", "llama_causal"])
@pytest.mark.parametrize("estimator", ["per-example", "batch"])
def test_grams_read_from_the_fishers_forward_equal_a_gram_pass(kind, estimator):
    """With the Fisher, the Gram hooks read the Fisher's own forward (one forward per batch): the sums,
    token counts and examples are those of a Gram-only pass, bit for bit."""
    from regmean_pipeline.measure.gram import collect_grams

    model = make_model(kind, seed=5)
    batches = [batch_of(model, [7, 4, 6, 2], seed=1), batch_of(model, [3, 5], seed=2)]
    alone = collect_grams(model, batches, device="cpu")
    fisher = FisherAccumulator(model, estimator=estimator)
    both = collect_grams(model, batches, device="cpu", fisher=fisher)
    assert both.examples == alone.examples == fisher.examples == 6 and both.tokens == alone.tokens
    assert set(both.sums) == set(alone.sums) and both.layer_grams == alone.layer_grams
    for key in alone.sums:
        assert torch.equal(both.sums[key], alone.sums[key]), key


def test_grams_count_a_batch_once_when_the_fisher_falls_back_to_vmap(monkeypatch):
    """A batch-shared input is found after the hooks' forward, which the Grams already read: the vmap
    forward that follows must not add the batch again."""
    from regmean_pipeline.measure.gram import collect_grams
    from regmean_pipeline.measure.per_example import BatchSharedInput

    model = make_model("bert", seed=5)
    batches = [batch_of(model, [7, 4, 6, 2], seed=1), batch_of(model, [3, 5], seed=2)]
    alone = collect_grams(model, batches, device="cpu")
    by_hooks = FisherAccumulator._add_by_hooks

    def hooks_then_shared(self, *args):
        by_hooks(self, *args)
        raise BatchSharedInput("a module on an input the batch shares")

    monkeypatch.setattr(FisherAccumulator, "_add_by_hooks", hooks_then_shared)
    fisher = FisherAccumulator(model, estimator="per-example")
    both = collect_grams(model, batches, device="cpu", fisher=fisher)
    assert fisher._whole_model_vmap and both.examples == alone.examples == 6 and both.tokens == alone.tokens
    for key in alone.sums:
        assert torch.equal(both.sums[key], alone.sums[key]), key


def test_per_example_lm_fisher_counts_only_the_counted_tokens():
    model = make_model("llama_causal", seed=4).double()
    batch = batch_of(model, [9, 5, 7], seed=3)
    counted = batch["attention_mask"].clone()
    counted[:, :3] = 0  # the prompt: not counted (--tokens response)
    accumulator = FisherAccumulator(model, accumulate_dtype=torch.float64)
    accumulator.add(batch, counted)
    assert_close_fisher(accumulator.result().sums, reference_fisher(make_model("llama_causal", seed=4), batch, "lm",
                                                                    counted))


def test_the_batch_estimator_squares_one_gradient_per_batch():
    model = make_model("bert", seed=5).double()
    batch = batch_of(model, [6, 6, 6], seed=4)  # no padding: the batch's own forward is the reference's
    accumulator = FisherAccumulator(model, estimator="batch", accumulate_dtype=torch.float64)
    accumulator.add(batch)
    double = make_model("bert", seed=5).double()
    log_probs = torch.log_softmax(double(**batch).logits, -1)
    objective = (log_probs.detach().exp().sqrt() * log_probs).sum()
    grads = torch.autograd.grad(objective, list(double.parameters()))
    reference = {name: grad ** 2 for (name, _), grad in zip(double.named_parameters(), grads)}
    assert_close_fisher(accumulator.result().sums, reference)


def test_a_model_without_an_output_distribution_is_refused_with_one_line():
    import transformers

    from regmean_pipeline.errors import RegMeanError

    model = transformers.BertModel(make_model("bert").config).eval()
    with pytest.raises(RegMeanError, match="BertModel returns no logits"):
        FisherAccumulator(model).add(batch_of(model, [3, 3]))
    t5 = make_model("t5")
    with pytest.raises(RegMeanError, match="encoder-decoder models are not supported"):
        FisherAccumulator(t5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, workspace):
    """Two tiny BERT classifiers, each with a Gram + Fisher cache over its own data."""
    from stages.stats import StatsOptions, run_stats

    root = tmp_path_factory.mktemp("fisher")
    models = {name: save_model(make_model("bert", seed=seed), root / name) for name, seed in (("a", 1), ("b", 2))}
    for seed, name in enumerate(models, start=1):
        run_stats(StatsOptions(model=str(models[name]), dataset=str(workspace.text_task(seed, n=20)),
                               out=str(root / "caches" / name), device="cpu", progress=False,
                               statistics="gram,fisher", batch_size=8))
    return root, models


def test_grams_measured_with_the_fisher_equal_grams_alone(pair, workspace, tmp_path):
    from stages.stats import StatsOptions, run_stats

    root, models = pair
    run_stats(StatsOptions(model=str(models["a"]), dataset=str(workspace.text_task(1, n=20)),
                           out=str(tmp_path / "alone"), device="cpu", progress=False, batch_size=8))
    both, alone = StatsCache(root / "caches" / "a"), StatsCache(tmp_path / "alone")
    assert both.manifest.statistics == ["gram", "fisher"] and alone.manifest.statistics == ["gram"]
    assert read_json(tmp_path / "alone" / "manifest.json")["version"] == 1  # Grams-only caches keep version 1
    assert read_json(root / "caches" / "a" / "manifest.json")["version"] == 2
    for key in alone.manifest.grams:
        assert np.array_equal(both.read_packed(key), alone.read_packed(key)), key
    assert set(both.manifest.fisher) == {n for n, _ in make_model("bert").named_parameters()}
    assert all(entry.examples == 20 for entry in both.manifest.fisher.values())


def test_fisher_merge_equals_its_formula_in_float64(pair, cli, tmp_path):
    root, models = pair
    for normalize in (True, False):
        out = tmp_path / f"merged-{normalize}"
        code, _, err = cli("merge", "--method", "fisher", "--cache-dir", root / "caches", "--exclude", HEAD,
                           "--coefficient", "b=2", "--out", out, "--device", "cpu",
                           "--normalize-fisher-weight" if normalize else "--no-normalize-fisher-weight")
        assert code == 0, err
        caches = [StatsCache(root / "caches" / name) for name in ("a", "b")]
        states = [load_file(str(models[name] / "model.safetensors")) for name in ("a", "b")]
        merged = load_file(str(out / "model.safetensors"))
        names = [n for n in merged if not n.startswith("classifier.")]
        fishers = [{n: c.fisher(n).double() / c.manifest.fisher[n].examples for n in names} for c in caches]
        factors = [1.0, 2.0]
        if normalize:
            norms = [math.sqrt(sum(float(f[n].square().sum()) for n in names)) for f in fishers]
            inverse = [1 / (norm + 1e-6) for norm in norms]
            factors = [c * i / sum(inverse) for c, i in zip(factors, inverse)]
        for name in names:
            weights = [factor * (f[name] + 1e-6) for factor, f in zip(factors, fishers)]
            expected = sum(w * s[name].double() for w, s in zip(weights, states)) / sum(weights)
            torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-7)
        report = read_json(out / "merge_report.json")
        assert report["settings"]["method"] == "fisher" and report["method_report"]["fisher"]["without_fisher"] == []


def test_a_fisher_merge_over_gram_only_caches_names_the_candidate_and_the_command(workspace, cli, tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        code, _, err = cli("stats", "--model", workspace.model("bert", seed), "--dataset", workspace.text_task(seed),
                           "--out", tmp_path / "caches" / name, "--device", "cpu")
        assert code == 0, err
    with trial("mismatched candidates (found before heavy work)"):
        code, _, err = cli("merge", "--method", "fisher", "--cache-dir", tmp_path / "caches", "--out", tmp_path / "m")
        assert code == 2 and "candidate a" in err and "--statistics gram,fisher" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_a_fisher_cache_with_nan_is_refused_with_one_line(pair, cli, tmp_path):
    import json
    import shutil

    from regmean_pipeline.cache.store import array_checksum

    root, _ = pair
    shutil.copytree(root / "caches", tmp_path / "caches")
    folder = tmp_path / "caches" / "b"
    manifest = json.loads((folder / "manifest.json").read_text())
    name = next(iter(manifest["fisher"]))
    import zarr

    array = zarr.open_group(str(folder / "fisher.zarr"), mode="a")[name]
    values = array[...]
    values[0] = np.nan
    array[...] = values
    manifest["fisher"][name]["checksum"] = array_checksum(name, manifest["fisher"][name]["examples"], values)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with trial("NaN or Inf in weights, activations or Grams"):
        code, _, err = cli("merge", "--method", "fisher", "--cache-dir", tmp_path / "caches", "--out", tmp_path / "m")
        assert code == 2 and "NaN or Inf" in err and name in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "m").exists()


def fisher_of(folder) -> dict[str, np.ndarray]:
    cache = StatsCache(folder)
    return {name: cache.read("fisher", name).astype(np.float64) for name in cache.manifest.fisher}


def assert_same_fisher(folder, reference, rtol: float) -> None:
    """Every array within ``rtol`` (Frobenius), relative to its own norm or, for arrays that are zero but
    for rounding (a key bias: softmax does not see it), to the largest array's."""
    ours, theirs = fisher_of(folder), fisher_of(reference)
    assert ours.keys() == theirs.keys()
    assert StatsCache(folder).manifest.examples == StatsCache(reference).manifest.examples
    scale = max(np.linalg.norm(values) for values in theirs.values())
    for name, values in theirs.items():
        assert np.linalg.norm(ours[name] - values) <= rtol * max(np.linalg.norm(values), 1e-6 * scale), name


FISHER_STATS = ("--statistics", "gram,fisher", "--num-examples", 24, "--batch-size", 5, "--device", "cpu",
                "--format", "safetensors")


@pytest.fixture(scope="module")
def whole(workspace, tmp_path_factory):
    from tests.test_scale import run_command

    out = tmp_path_factory.mktemp("fisher-whole") / "a"
    run_command(["stats", "--model", workspace.model("bert", 1), "--dataset", workspace.text_task(1, n=30),
                 "--out", out, *FISHER_STATS])
    return out


def test_fisher_shards_combine_and_torchrun_ranks_sum_to_the_whole(workspace, whole, tmp_path):
    """Sums over disjoint shares of the examples add up, like Grams (float32 sums in another order: 1e-6)."""
    from tests.test_scale import run_command

    common = ["--model", workspace.model("bert", 1), "--dataset", workspace.text_task(1, n=30), *FISHER_STATS]
    for index in range(2):
        run_command(["stats", *common, "--out", tmp_path / "sharded", "--shard", f"{index}/2"])
    run_command(["combine", tmp_path / "sharded", "--out", tmp_path / "combined"])
    assert_same_fisher(tmp_path / "combined", whole, 1e-6)
    run_command(["stats", *common, "--out", tmp_path / "ranks"], torchrun=2)
    assert_same_fisher(tmp_path / "ranks", whole, 1e-6)


def test_an_interrupted_fisher_run_resumes_to_the_same_cache(workspace, whole, tmp_path, monkeypatch):
    from regmean_pipeline.measure import fisher as fisher_module
    from stages.stats import StatsOptions, run_stats

    options = dict(model=str(workspace.model("bert", 1)), dataset=str(workspace.text_task(1, n=30)),
                   out=str(tmp_path / "a"), statistics="gram,fisher", num_examples=24, batch_size=5, device="cpu",
                   format="safetensors", progress=False, checkpoint_every=1)
    calls = {"n": 0}
    original = fisher_module.FisherAccumulator.add

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fisher_module.FisherAccumulator, "add", failing)
    with pytest.raises(KeyboardInterrupt):
        run_stats(StatsOptions(**options))
    resumed = {"n": 0}

    def counting(self, *args, **kwargs):
        resumed["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fisher_module.FisherAccumulator, "add", counting)
    run_stats(StatsOptions(**options, resume=True))
    # 5 batches of 5 and 4: the checkpoint after the second, so the resumed run adds the last three
    assert resumed["n"] == 3 and StatsCache(tmp_path / "a").manifest.examples == 24
    # ``whole`` ran in a process of one thread, this one with two: the products round differently, hence 1e-6
    assert_same_fisher(tmp_path / "a", whole, 1e-6)


def test_plan_sizes_the_fisher_cache(workspace, cli, whole):
    """`regmean plan --statistics gram,fisher`: one float per parameter more than the Grams, as written."""
    import json

    code, printed, err = cli("plan", "--model", workspace.model("bert", 1), "--statistics", "gram,fisher", "--json")
    assert code == 0, err
    sizes = json.loads(printed)
    cache = StatsCache(whole)
    on_disk = sum(4 * entry.length for entry in cache.manifest.fisher.values())
    assert sizes["fisher_cache_bytes"] == on_disk
