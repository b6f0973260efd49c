"""mergekit configs: the examples validate with mergekit's own MergeConfiguration, one file gives the same
tensors in mergekit and here, what cannot be honoured is refused in one line naming the key, and mergekit's
PATH+LORA works as a candidate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.weights import resolve_adapter_reference, split_adapter_reference
from regmean_pipeline.merge.mergekit_config import candidate_names, translate
from regmean_pipeline.testing import make_model, save_model
from tests import faults

mergekit_config = pytest.importorskip("mergekit.config")

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "configs" / "mergekit").glob("*.yaml"))
FAULT = "mergekit key we do not honour"
# mergekit-yaml's own entry point (mergekit.scripts.run_yaml.main) for every config, in one process: the
# import costs seconds, each tiny merge a fraction of one.
MERGEKIT_RUNNER = """
import json, sys
from mergekit.scripts.run_yaml import main
for config, out, extra in json.loads(sys.argv[1]):
    main([config, out, "--quiet", *extra], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base, three children (the base plus seeded noise) and a LoRA adapter of the base."""
    import peft

    root = tmp_path_factory.mktemp("mergekit-models")
    base = make_model("llama", seed=0)
    folders = {"base": save_model(base, root / "base")}
    for seed in (1, 2, 3):
        child = make_model("llama", seed=0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in child.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        folders[f"c{seed}"] = save_model(child, root / f"c{seed}")
    torch.manual_seed(4)  # from the saved base, so that adapter_config.json names it
    base = transformers.AutoModelForSequenceClassification.from_pretrained(folders["base"])
    adapter = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "lora")
    folders["lora"] = root / "lora"
    return folders


def _cases(m: dict[str, Path]) -> dict[str, dict]:
    """Configs covering every honoured method and parameter, with absolute paths. DARE runs at density 1.0
    here, so that no random mask is involved (mergekit's masks come from torch's RNG, ours from a seeded
    hash) while its rescale and combination are still compared."""
    base, c1, c2, c3 = (str(m[k]) for k in ("base", "c1", "c2", "c3"))

    def models(*items):
        return [{"model": path, **({"parameters": params} if params else {})} for path, params in items]

    return {
        "linear": {"merge_method": "linear", "base_model": base, "parameters": {"weight": 0.5},
                   "models": models((c1, {"weight": 2.0}), (c2, {"weight": 1.0}), (c3, None))},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                            "tokenizer_source": "base", "parameters": {"lambda": 0.8},
                            "models": models((c1, {"weight": 0.7}), (c2, {"weight": 0.4}))},
        "task_arithmetic_normalized": {"merge_method": "task_arithmetic", "base_model": base,
                                       "parameters": {"normalize": True, "weight": 0.5, "lambda": 1.5},
                                       "models": models((c1, {"weight": 2.0}), (c2, None), (base, None))},
        "ties": {"merge_method": "ties", "base_model": base, "parameters": {"lambda": 1.2, "density": 0.7},
                 "models": models((base, None), (c1, {"weight": 0.7, "density": 0.5}),
                                  (c2, {"weight": 0.3, "density": 0.8}), (c3, {"weight": 0.5}))},
        "ties_sum": {"merge_method": "ties", "base_model": base, "out_dtype": "float32",
                     "parameters": {"normalize": False, "weight": 0.6, "density": 0.4},
                     "models": models((c1, None), (c2, {"weight": 0.3}))},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "parameters": {"int8_mask": True},
                      "models": models((c1, {"weight": 0.6, "density": 1.0}), (c2, {"weight": 0.5}),
                                       (c3, {"weight": 0.2}))},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base,
                        "parameters": {"rescale": False, "normalize": True, "weight": 1.0, "lambda": 0.9},
                        "models": models((c1, None), (c2, {"weight": 3.0}))},
        "lora": {"merge_method": "task_arithmetic", "base_model": base,
                 "models": models((f"{base}+{m['lora']}", {"weight": 0.5}), (c1, {"weight": 0.5}))},
    }


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each case's config file and mergekit's merged model folder, made offline by mergekit itself."""
    root = tmp_path_factory.mktemp("mergekit-runs")
    runs, outputs = [], {}
    for name, config in _cases(models).items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        outputs[name] = (path, root / f"mergekit-{name}")
        runs.append([str(path), str(outputs[name][1]), ["--lora-merge-cache", str(root / "lora-cache")]])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", MERGEKIT_RUNNER, json.dumps(runs)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return outputs


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_with_mergekit_and_translate(example):
    data = yaml.safe_load(example.read_text())
    mergekit_config.MergeConfiguration.model_validate(data)
    options = translate(data, str(example))
    assert options["models"] and options["method"]


@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "task_arithmetic_normalized", "ties", "ties_sum",
                                  "dare_ties", "dare_linear", "lora"])
def test_same_file_gives_mergekits_tensors(case, mergekit_outputs, cli, tmp_path):
    """mergekit computes in float32, this tool in float64: equal to rounding."""
    config, theirs = mergekit_outputs[case]
    code, _, err = cli("merge", "--config", config, "--out", tmp_path / "ours")
    assert code == 0, err
    ours, expected = load_file(tmp_path / "ours" / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype, name
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def _refusals(m: dict[str, Path]) -> list[tuple[str, dict, str]]:
    """(what, the config's changes to a plain ties config, the key its one-line error names)."""
    base = str(m["base"])
    return [
        ("slices", {"models": None, "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}]}]}, "'slices'"),
        ("modules", {"modules": {"decoder": {"models": [{"model": base}]}}}, "'modules'"),
        ("gradient", {"parameters": {"weight": 0.5, "density": [0.2, 0.8]}}, "'density'"),
        ("filter", {"parameters": {"density": 0.5, "weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]}},
         "'weight'"),
        ("tokenizer union", {"tokenizer": {"source": "union"}}, "'tokenizer'"),
        ("tokenizer_source union", {"tokenizer_source": "union"}, "'tokenizer_source'"),
        ("chat_template", {"chat_template": "chatml"}, "'chat_template'"),
        ("dtype", {"dtype": "bfloat16"}, "'dtype'"),
        ("out_dtype", {"out_dtype": "float16"}, "'out_dtype'"),
        ("unknown parameter", {"parameters": {"weight": 0.5, "gamma": 0.01}}, "'gamma'"),
        ("per-model lambda", {"models": [{"model": str(m["c1"]), "parameters": {"weight": 1, "lambda": 2}}]},
         "'lambda'"),
        ("other method", {"merge_method": "slerp"}, "'merge_method'"),
        ("linear without normalize", {"merge_method": "linear", "parameters": {"weight": 1, "normalize": False}},
         "'normalize'"),
        ("missing weight", {"parameters": {}}, "'weight'"),
        ("ties rescale", {"parameters": {"weight": 1.0, "density": 0.5, "rescale": True}}, "'rescale'"),
        ("unknown key", {"merge_mthod_typo": 1}, "'merge_mthod_typo'"),
    ]


@pytest.mark.parametrize("index", range(16))
def test_keys_not_honoured_are_refused_in_one_line(index, models, cli, tmp_path):
    what, changes, key = _refusals(models)[index]
    config = {"merge_method": "ties", "base_model": str(models["base"]), "parameters": {"weight": 0.5},
              "models": [{"model": str(models["c1"])}, {"model": str(models["c2"])}]}
    config = {k: v for k, v in {**config, **changes}.items() if v is not None}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with faults.trial(FAULT):
        code, _, err = cli("merge", "--config", path, "--out", tmp_path / "out")
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], (what, err)
        assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_names_and_adapter_references(models, tmp_path):
    assert candidate_names(["./a/math", "org/math", "base+./adapters/chat", "./b/math/"]) == \
        ["math", "math-2", "chat", "math-3"]
    assert split_adapter_reference("base+lora") == ("lora", "base")
    assert split_adapter_reference("plain") == ("plain", None)
    assert split_adapter_reference("a+b+c") == ("a+b+c", None)
    odd = tmp_path / "with+plus"
    odd.mkdir()
    assert split_adapter_reference(str(odd)) == (str(odd), None)  # an existing folder is never split
    folder, base = resolve_adapter_reference(f"{models['base']}+{models['lora']}")
    assert folder == models["lora"].resolve() and base == str(models["base"])
    with pytest.raises(RegMeanError, match="no LoRA adapter"):
        resolve_adapter_reference(f"{models['base']}+{models['c1']}")


def test_adapter_over_a_base_as_a_model_flag(models, cli, tmp_path):
    """--model NAME=BASE+ADAPTER reads the adapter over that base (its adapter_config.json names another)."""
    config = json.loads((models["lora"] / "adapter_config.json").read_text())
    moved = tmp_path / "lora"
    moved.mkdir()
    for file in models["lora"].iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere"}))
    merged = {}
    for name, reference in (("flag", f"{models['base']}+{moved}"), ("config", models["lora"]), ("moved", moved)):
        code, _, err = cli("merge", "--method", "average", "--model", f"a={reference}", "--model",
                           f"b={models['c1']}", "--out", tmp_path / name)
        merged[name] = (code, err)
    assert merged["flag"][0] == 0 and merged["config"][0] == 0, merged
    assert merged["moved"][0] == 2 and "/nowhere" in merged["moved"][1]  # without BASE+, its config's base
    flag, config = (load_file(tmp_path / name / "model.safetensors") for name in ("flag", "config"))
    assert flag.keys() == config.keys() and all(torch.equal(flag[name], config[name]) for name in flag)


def test_regmean_configs_take_this_tools_keys_under_parameters():
    """regmean/regmean++/fisher in mergekit's layout: models by folder name, `weight` per model as the
    coefficient, this tool's keys under `parameters`; base_model is --base only and never a candidate."""
    data = {"merge_method": "regmean++", "base_model": "m/base",
            "models": [{"model": "m/base"}, {"model": "m/sst2", "parameters": {"weight": 2}}, {"model": "n/sst2"}],
            "parameters": {"weight": 0.5, "reduce_non_diagonal_ratio": 0.9, "num_regmean_examples": 16,
                           "datasets": {"sst2": "d/sst2.jsonl", "sst2-2": "d/other.jsonl"}}}
    options = translate(data, "c.yaml")
    assert options == {"method": "regmean++", "models": {"sst2": "m/sst2", "sst2-2": "n/sst2"},
                       "coefficients": {"sst2": 2.0, "sst2-2": 0.5}, "base": "m/base",
                       "reduce_non_diagonal_ratio": 0.9, "num_examples": 16,
                       "datasets": {"sst2": "d/sst2.jsonl", "sst2-2": "d/other.jsonl"}}
    for parameters, key in (({"models": {}}, "'models'"), ({"density": [0.1, 0.2]}, "'density'"),
                            ({"no_such_key": 1}, "'no_such_key'")):
        with pytest.raises(RegMeanError, match=key):
            translate({**data, "parameters": parameters}, "c.yaml")
    with pytest.raises(RegMeanError, match="'density'.*only 'weight'"):
        translate({**data, "models": [{"model": "m/a", "parameters": {"density": 0.5}}]}, "c.yaml")
