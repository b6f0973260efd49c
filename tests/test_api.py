"""The in-process API runs the stages' code and gives the stages' result."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
import transformers
from safetensors.torch import load_file

from regmean_pipeline import RegMean
from tests.test_merge import load


def test_api_matches_the_cli(workspace, cli, tmp_path):
    models = {f"c{i}": workspace.model("bert", seed) for i, seed in enumerate((1, 2))}
    tasks = {f"c{i}": workspace.text_task(seed) for i, seed in enumerate((1, 2))}
    for name in models:
        code, _, err = cli("stats", "--model", models[name], "--dataset", tasks[name], "--out", tmp_path / "c" / name,
                           "--num-examples", 20, "--batch-size", 8, "--device", "cpu")
        assert code == 0, err
    code, _, err = cli("merge", "--cache-dir", tmp_path / "c", "--out", tmp_path / "m", "--device", "cpu",
                       "--exclude", r"classifier\..*")
    assert code == 0, err
    from_cli = load_file(str(tmp_path / "m" / "model.safetensors"))

    tokenizer = transformers.AutoTokenizer.from_pretrained(models["c0"])
    data = {name: datasets.load_dataset("json", data_files=str(path), split="train") for name, path in tasks.items()}
    algorithm = RegMean(num_regmean_examples=20, reduce_non_diagonal_ratio=0.95, batch_size=8, device="cpu",
                        exclude_param_names_regex=[r"classifier\..*"])
    merged = algorithm.run({name: load(path) for name, path in models.items()}, data, preprocessors=tokenizer)
    state = merged.state_dict()
    assert set(from_cli) <= set(state)
    for name, tensor in from_cli.items():
        assert torch.allclose(state[name], tensor, rtol=1e-6, atol=1e-7), name
    assert algorithm.report["layers"] and "classifier.weight" in algorithm.report["copied"]


def test_api_from_config_with_batches(workspace):
    tokenizer = transformers.AutoTokenizer.from_pretrained(workspace.model("gpt2", 1))
    models = [load(workspace.model("gpt2", seed)) for seed in (1, 2)]
    batches = [[tokenizer(["the movie was great", "bad plot"], padding=True, return_tensors="pt")] for _ in models]
    algorithm = RegMean.from_config(Path(__file__).resolve().parents[1] / "configs" / "gpt2_regmean.yaml", device="cpu")
    assert algorithm.solve.reduce_non_diagonal_ratio == 0.6
    merged = algorithm.run(models, [[dict(b) for b in bs] for bs in batches])
    assert isinstance(merged, transformers.GPT2ForSequenceClassification)
    assert merged is not models[0]
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(merged.state_dict()[c_attn], models[0].state_dict()[c_attn])
    assert algorithm.report["layers"]["transformer.h.0.attn.c_attn"]["solver"] == "cholesky"


def test_regmean_plusplus_api_matches_the_cli(workspace, cli, tmp_path):
    from regmean_pipeline import RegMeanPlusPlus

    models = {f"c{i}": workspace.model("bert", seed) for i, seed in enumerate((1, 2))}
    tasks = {f"c{i}": workspace.text_task(seed) for i, seed in enumerate((1, 2))}
    pairs = [arg for name in models for arg in ("--model", f"{name}={models[name]}", "--dataset", f"{name}={tasks[name]}")]
    config = Path(__file__).resolve().parents[1] / "configs" / "bert_regmean_plusplus.yaml"
    code, _, err = cli("merge", "--config", config, *pairs, "--out", tmp_path / "m", "--device", "cpu",
                       "--num-examples", 20, "--batch-size", 8)
    assert code == 0, err
    from_cli = load_file(str(tmp_path / "m" / "model.safetensors"))

    tokenizer = transformers.AutoTokenizer.from_pretrained(models["c0"])
    data = {name: datasets.load_dataset("json", data_files=str(path), split="train") for name, path in tasks.items()}
    algorithm = RegMeanPlusPlus.from_config(config, num_regmean_examples=20, batch_size=8, device="cpu")
    assert algorithm.method == "regmean++" and RegMean.from_config(config).method == "regmean++"
    loaded = {name: load(path) for name, path in models.items()}
    before = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in loaded.items()}
    merged = algorithm.run(loaded, data, preprocessors=tokenizer)
    state = merged.state_dict()
    for name, tensor in from_cli.items():
        assert torch.allclose(state[name], tensor, rtol=1e-6, atol=1e-7), name
    for name, model in loaded.items():  # the caller's models are read, never written
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items()), name
    assert [unit["unit"] for unit in algorithm.report["units"]] == ["prefix", "block 0", "block 1", "tail"]
    clip = RegMean.from_config(Path(__file__).resolve().parents[1] / "configs" / "clip_regmean_plusplus.yaml")
    assert clip.method == "regmean++" and clip.solve.reduce_non_diagonal_ratio == 0.95
