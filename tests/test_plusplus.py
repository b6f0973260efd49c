"""RegMean++ (`regmean merge --method regmean++`) against an independent float64 reference, its identities,
its memory paths and its bad input."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.conftest import read_json
from tests.reference import regmean_plusplus_reference, relative_error

# The stack and the prefix of each tiny architecture, written out here independently of the tool's
# generic discovery (which the reference comparison therefore also checks).
STACKS = {
    "bert": ("bert.encoder.layer", ("bert.embeddings.",)),
    "roberta": ("roberta.encoder.layer", ("roberta.embeddings.",)),
    "gpt2": ("transformer.h", ("transformer.wte.", "transformer.wpe.")),
    "llama": ("model.layers", ("model.embed_tokens.",)),
    "clip_vision": ("vision_model.encoder.layers", ("vision_model.embeddings.", "vision_model.pre_layrnorm.")),
}
RATIOS = {"bert": 0.95, "roberta": 0.9, "gpt2": 0.6, "llama": 0.95, "clip_vision": 0.95}


def load(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()


def merged_state(folder):
    return load_file(str(folder / "model.safetensors"))


def candidates(workspace, kind: str, seeds=(1, 2, 3)):
    models = [workspace.model(kind, seed) for seed in seeds]
    data = [workspace.image_task(seed) if kind == "clip_vision" else workspace.text_task(seed) for seed in seeds]
    return models, data


def plusplus(cli, out, models, data, *args, names=None):
    names = names or [f"c{i}" for i in range(len(models))]
    pairs = []
    for name, model, dataset in zip(names, models, data):
        pairs += ["--model", f"{name}={model}", "--dataset", f"{name}={dataset}"]
    code, _, err = cli("merge", "--method", "regmean++", *pairs, "--out", out, "--device", "cpu",
                       "--num-examples", 1000, "--batch-size", 5, *args)
    assert code == 0, err
    return out


def reference_examples(kind: str, model_folder, data) -> list[dict]:
    """Each example alone (no padding), as the tool's own preprocessing would feed it."""
    if kind == "clip_vision":
        processor = transformers.AutoImageProcessor.from_pretrained(model_folder)
        images = datasets.load_from_disk(str(data))["image"]
        return [dict(processor(images=[image.convert("RGB")], return_tensors="pt")) for image in images]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder)
    texts = [json.loads(line)["text"] for line in open(data)]
    return [{k: v for k, v in tokenizer([text], return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
            for text in texts]


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2", "llama", "clip_vision"])
def test_plusplus_equals_float64_reference(kind, workspace, cli, tmp_path):
    """Every merged tensor against the float64 RegMean++ reference (relative Frobenius error): 1e-7 with
    float64 forward passes, Grams and solves (the float32 storage of the outputs is the floor, ~6e-8);
    1e-4 all in float32."""
    models, data = candidates(workspace, kind)
    extra = ("--image-column", "image") if kind == "clip_vision" else ()
    ratio = ("--reduce-non-diagonal-ratio", RATIOS[kind])
    stack, prefix = STACKS[kind]
    expected = regmean_plusplus_reference([load(m) for m in models],
                                          [reference_examples(kind, m, d) for m, d in zip(models, data)],
                                          RATIOS[kind], stack=stack, prefix=prefix)
    runs = {
        "float64": plusplus(cli, tmp_path / "m64", models, data, *extra, *ratio, "--dtype", "float64",
                            "--accumulate-dtype", "float64", "--solve-dtype", "float64"),
        "float32": plusplus(cli, tmp_path / "m32", models, data, *extra, *ratio),
    }
    worst = {}
    for label, out in runs.items():
        state = merged_state(out)
        assert set(state) == set(expected)
        worst[label] = max(relative_error(state[name], expected[name]) for name in expected)
    print(kind, worst)
    assert worst["float64"] < 1e-7, worst
    assert worst["float32"] < 1e-4, worst
    report = read_json(runs["float32"] / "merge_report.json")
    assert report["settings"]["method"] == "regmean++" and report["stack"]["path"] == stack
    assert [unit["unit"] for unit in report["units"]] == ["prefix", "block 0", "block 1", "tail"]
    assert all(unit["seconds"] > 0 for unit in report["units"])
    assert report["layers"] and all(entry["solver"] == "cholesky" for entry in report["layers"].values())


def test_plusplus_is_not_regmean(workspace, cli, tmp_path):
    """Both average the embeddings; RegMean++ measures every block on the merged model's hidden states
    rather than on each candidate's own, so its blocks come out differently."""
    models, data = candidates(workspace, "bert")
    out = plusplus(cli, tmp_path / "pp", models, data, "--solve-dtype", "float64")
    caches = tmp_path / "caches"
    for i, (model, dataset) in enumerate(zip(models, data)):
        code, _, err = cli("stats", "--model", model, "--dataset", dataset, "--out", caches / f"c{i}",
                           "--num-examples", 1000, "--batch-size", 5, "--device", "cpu")
        assert code == 0, err
    code, _, err = cli("merge", "--cache-dir", caches, "--out", tmp_path / "rm", "--device", "cpu",
                       "--solve-dtype", "float64")
    assert code == 0, err
    ours, theirs = merged_state(out), merged_state(tmp_path / "rm")
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert relative_error(ours[embeddings], theirs[embeddings].double().numpy()) < 1e-6
    for block in (0, 1):
        name = f"bert.encoder.layer.{block}.attention.self.query.weight"
        assert relative_error(ours[name], theirs[name].double().numpy()) > 1e-3, name


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_copies_and_a_single_candidate_come_back_bit_for_bit(kind, workspace, cli, tmp_path):
    models, data = candidates(workspace, kind)
    original = load_file(str(models[0] / "model.safetensors"))
    copies = merged_state(plusplus(cli, tmp_path / "copies", [models[0]] * 3, data))
    single = merged_state(plusplus(cli, tmp_path / "single", models[:1], data[:1]))
    for state in (copies, single):
        assert state.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(state[name], tensor), name


def test_spilled_activations_give_the_same_merge(workspace, cli, tmp_path):
    models, data = candidates(workspace, "llama")
    in_memory = plusplus(cli, tmp_path / "memory", models, data)
    spilled = plusplus(cli, tmp_path / "spilled", models, data, "--activation-memory", "4KB",
                       "--spill-dir", tmp_path / "spill")
    a, b = merged_state(in_memory), merged_state(spilled)
    assert all(torch.equal(a[name], b[name]) for name in a)
    usage = read_json(spilled / "merge_report.json")["activations"]
    assert usage["spill_writes"] > 0 and usage["peak_spilled_bytes"] > 0 and usage["peak_memory_bytes"] <= 4000
    assert read_json(in_memory / "merge_report.json")["activations"]["spill_writes"] == 0
    assert not any((tmp_path / "spill").iterdir())  # spill files are removed at the end


def test_excluded_heads_per_candidate_export_and_coefficients(workspace, cli, tmp_path):
    models = [workspace.model("bert", 1), workspace.model("bert", 2, num_labels=6)]
    data = [workspace.text_task(1), workspace.text_task(2, labels=6)]
    code, _, err = cli("merge", "--method", "regmean++", "--model", f"a={models[0]}", "--model", f"b={models[1]}",
                       "--dataset", f"a={data[0]}", "--dataset", f"b={data[1]}", "--out", tmp_path / "no",
                       "--device", "cpu")
    assert code == 2 and "parameter classifier." in err and "--exclude" in err
    assert not (tmp_path / "no").exists()
    out = plusplus(cli, tmp_path / "m", models, data, "--exclude", r"classifier\..*", "--per-candidate",
                   "--coefficient", "a=3", names=["a", "b"])
    state, heads = merged_state(out), [load(m).state_dict() for m in models]
    assert torch.equal(state["classifier.weight"], heads[0]["classifier.weight"])
    expected = (3 * heads[0]["bert.embeddings.LayerNorm.weight"] + heads[1]["bert.embeddings.LayerNorm.weight"]) / 4
    assert torch.allclose(state["bert.embeddings.LayerNorm.weight"], expected, rtol=1e-6)
    b = transformers.AutoModelForSequenceClassification.from_pretrained(out / "per_candidate" / "b")
    assert b.config.num_labels == 6 and torch.equal(b.classifier.weight, heads[1]["classifier.weight"])
    assert torch.equal(b.bert.encoder.layer[1].output.dense.weight,
                       state["bert.encoder.layer.1.output.dense.weight"])


def bad(cli, tmp_path, *args):
    out = tmp_path / "out"
    code, _, err = cli("merge", "--out", out, "--device", "cpu", *args)
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1, err
    assert not out.exists()
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(workspace, cli, tmp_path):
    bert, data = workspace.model("bert", 1), workspace.text_task(1)
    gpt2 = workspace.model("gpt2", 1)
    pp = ("--method", "regmean++")
    assert "--dataset b=...: no --model b=PATH" in bad(cli, tmp_path, *pp, "--model", f"a={bert}",
                                                       "--dataset", f"a={data}", "--dataset", f"b={data}")
    assert "--model b=...: no --dataset b=PATH" in bad(cli, tmp_path, *pp, "--model", f"a={bert}",
                                                       "--model", f"b={bert}", "--dataset", f"a={data}")
    assert "architecture GPT2ForSequenceClassification" in bad(
        cli, tmp_path, *pp, "--model", f"a={bert}", "--model", f"b={gpt2}", "--dataset", f"a={data}",
        "--dataset", f"b={data}")
    assert "reads no caches" in bad(cli, tmp_path, *pp, "--cache-dir", tmp_path, "--model", f"a={bert}",
                                    "--dataset", f"a={data}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert f"dataset {empty}: empty" in bad(cli, tmp_path, *pp, "--model", f"a={bert}", "--dataset", f"a={empty}")
    assert "only --method regmean++ reads data" in bad(cli, tmp_path, "--model", f"a={bert}", "--method", "average",
                                                       "--dataset", f"a={data}")


def test_plan_sizes_equal_what_a_run_holds(workspace, cli, tmp_path):
    """`regmean plan --method regmean++` from the config alone: with every text truncated to --max-length
    (so every batch is that long), the hidden states it predicts are exactly those the run held, and its
    per-block Gram bytes are those of the Grams the run solved."""
    models, data = candidates(workspace, "llama")
    out = plusplus(cli, tmp_path / "m", models, data, "--max-length", 4)
    code, printed, err = cli("plan", "--model", models[0], "--method", "regmean++", "--candidates", 3,
                             "--num-examples", 24, "--max-length", 4, "--json")
    assert code == 0, err
    sizes = json.loads(printed)
    report = read_json(out / "merge_report.json")
    assert sizes["activation_bytes"] == report["activations"]["peak_memory_bytes"] == 3 * 24 * 4 * 32 * 4
    assert sizes["spill_bytes"] == 0 and sizes["blocks"] == 2 and sizes["stack"] == "model.layers"
    dims = {entry["gram"]: 0 for entry in report["layers"].values() if entry["gram"].startswith("model.layers.0.")}
    config = transformers.AutoConfig.from_pretrained(models[0])
    for key in dims:
        dims[key] = config.intermediate_size if key.endswith("down_proj") else config.hidden_size
    assert sizes["block_gram_bytes"] == 3 * sum(4 * d * d for d in dims.values())
    code, printed, _ = cli("plan", "--model", models[0], "--method", "regmean++", "--candidates", 3,
                           "--num-examples", 24, "--max-length", 4, "--activation-memory", "4KB")
    assert code == 0 and "spilled to disk" in printed and "RegMean++: 2 blocks in model.layers" in printed
