"""`regmean plan`: sizes from the config alone, checked against real runs and against the published shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.sizing import estimate, human

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_plan_matches_the_cache_a_real_run_writes(kind, workspace, cli, tmp_path, capsys):
    model = workspace.model(kind, 1)
    code, _, err = cli("stats", "--model", model, "--dataset", workspace.text_task(1), "--out", tmp_path / "a",
                       "--num-examples", 8, "--device", "cpu", "--format", "safetensors")
    assert code == 0, err
    code, out, err = cli("plan", "--model", model, "--candidates", 3, "--json")
    assert code == 0, err
    planned = json.loads(out)
    cache = StatsCache(tmp_path / "a")
    stored = {key: cache.read_packed(key) for key in cache.manifest.grams}
    assert planned["grams"] == len(stored) and planned["linear_layers"] == len(cache.manifest.layers)
    assert planned["cache_bytes"] == sum(values.nbytes for values in stored.values())
    assert planned["accumulator_bytes"] == sum(4 * e.dim ** 2 for e in cache.manifest.grams.values())
    assert planned["output_bytes"] == (model / "model.safetensors").stat().st_size - _header_size(model / "model.safetensors")


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def llama_grams(name: str) -> tuple[dict, list[int]]:
    """The config and the input size of each Gram of a Llama: per block the attention input (q/k/v),
    o_proj's heads*head_dim, the MLP input (gate/up) and down_proj's intermediate size; lm_head unless tied."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    return config, [h, q, h, i] * layers + ([] if config["tie_word_embeddings"] else [h])


@pytest.mark.parametrize("name", ["llama_1b", "llama_7b", "llama_70b"])
def test_llama_configs_give_the_sizes_their_shapes_imply(name):
    """Counts and bytes written out from the config fields, independently of the meta-device trace."""
    config, dims = llama_grams(name)
    h, i, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", h // heads)
    q = heads * head_dim
    per_block = h * q + 2 * h * kv * head_dim + q * h + 3 * h * i + 2 * h
    parameters = vocab * h + layers * per_block + h + (0 if config["tie_word_embeddings"] else vocab * h)

    sizes = estimate(CONFIGS / f"{name}.json", candidates=4, gram_budget=(max(dims) ** 2) * 4 * 4)
    assert sizes.parameters == parameters
    assert sizes.weight_bytes == 2 * parameters  # bfloat16 / float16 checkpoints
    assert sizes.grams == len(dims)
    assert sizes.cache_bytes == sum(d * (d + 1) // 2 * 4 for d in dims)
    assert sizes.accumulator_bytes == sum(d * d * 4 for d in dims)
    assert sizes.largest_gram_bytes == max(dims) ** 2 * 4
    assert sizes.stats_passes >= 2
    # at least the largest single system, and everything bounded well below the weights themselves
    assert 2 * max(dims) ** 2 * 4 < sizes.merge_peak_bytes < sizes.weight_bytes


def test_plan_prints_a_table_and_names_bad_input(cli, tmp_path):
    code, out, err = cli("plan", "--model", CONFIGS / "llama_1b.json", "--candidates", 4)
    assert code == 0, err
    cache = sum(d * (d + 1) // 2 * 4 for d in llama_grams("llama_1b")[1])
    assert f"| Gram cache on disk | {human(cache)} | {human(4 * cache)} |" in out and "4 candidates" in out
    code, _, err = cli("plan", "--model", tmp_path / "nope.json")
    assert code == 2 and "no such file or folder" in err
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = cli("plan", "--model", tmp_path / "bad.json")
    assert code == 2 and "bad.json" in err
