"""LLM candidates as users have them: chat data, LoRA adapters (made here by peft), encoder-decoders,
and language-model scores; numerics against the independent float64 reference (tests/reference.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.io.weights import open_weights
from regmean_pipeline.measure.data import DatasetSpec, SequenceCollator, load_examples
from regmean_pipeline.measure.gram import ROW_MASK_KEY
from regmean_pipeline.testing import PLAIN_CHAT_TEMPLATE, make_chat_tokenizer, write_chat_task
from tests.conftest import read_json
from tests.reference import capture_grams, regmean_reference, relative_error

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    """A LoRA adapter of ``base`` with random A and B (so it changes the model), saved by peft."""
    if not out.exists():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **config}
        peft.get_peft_model(model, peft.LoraConfig(**settings)).save_pretrained(out)
    return out


def merged_checkpoint(adapter: Path, out: Path) -> Path:
    """The adapter merged into its base by peft itself, saved as a full checkpoint (independent of ours)."""
    if not out.exists():
        config = json.loads((adapter / "adapter_config.json").read_text())
        base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out)
        make_chat_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def llm(workspace, tmp_path_factory):
    """A tiny Llama base, two adapters of it, a fully fine-tuned sibling, and three chat tasks."""
    root = tmp_path_factory.mktemp("llm")
    base = workspace.model("llama_causal", 1)
    tasks = {name: write_chat_task(root / name, name, n_train=12, n_test=6, seed=3)
             for name in ("sentiment", "topic", "question")}
    adapters = {name: make_adapter(base, root / f"adapter-{name}", seed) for name, seed in (("sentiment", 1), ("topic", 2))}
    return {"root": root, "base": base, "tasks": tasks, "adapters": adapters,
            "full": workspace.model("llama_causal", 2)}


def conversations(task: Path, split: str = "train") -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in (task / f"{split}.jsonl").read_text().splitlines()]


def stats(cli, model, dataset, out, *args):
    code, _, err = cli("stats", "--model", model, "--dataset", dataset, "--out", out, "--device", "cpu",
                       "--batch-size", 4, *args)
    assert code == 0, err
    return StatsCache(out)


def chat_rows(tokenizer, messages: list[dict], counted: bool) -> tuple[dict, list[bool] | None]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=counted)
    mask = [bool(m) for m in ids["assistant_masks"]] if counted else None
    return {"input_ids": torch.tensor([ids["input_ids"]])}, mask


def test_chat_tokens_are_apply_chat_template_and_response_tokens_the_assistants(llm, tmp_path):
    """Rows, unpadded, are apply_chat_template's ids (cut to max_length); the response rows are exactly the
    words of the assistant's message and its end token, with or without {% generation %} in the template."""
    task = llm["tasks"]["topic"] / "train.jsonl"
    rows = [{"messages": m, "_regmean_row": i} for i, m in enumerate(conversations(llm["tasks"]["topic"]))]
    for template in ("generation", "plain"):
        folder = tmp_path / template
        tokenizer = make_chat_tokenizer(folder, **({"template": PLAIN_CHAT_TEMPLATE} if template == "plain" else {}))
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        for max_length in (64, 9):
            spec = DatasetSpec(str(task), messages_column="messages", tokens="response", max_length=max_length)
            batch = SequenceCollator(tokenizer, spec, {"input_ids", "attention_mask"}, max_length,
                                     encoder_decoder=False)(rows)
            truncated = 0
            for i, row in enumerate(rows):
                real = batch["attention_mask"][i].bool()
                expected = tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
                truncated += len(expected) > max_length
                assert batch["input_ids"][i][real].tolist() == expected[:max_length]
                answer = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
                answer += [tokenizer.convert_tokens_to_ids("<|end|>")]
                assert batch["input_ids"][i][batch[ROW_MASK_KEY][i]].tolist() == expected[len(expected) - len(answer):][
                    :max(0, max_length - (len(expected) - len(answer)))]
            assert batch.get("_regmean_count_truncated", torch.tensor(0)).item() == truncated
            assert (max_length == 9) == (truncated > 0)


def test_prompt_and_response_columns_map_to_messages(llm, tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": "topic", "input": i, "output": o, "system": s}) + "\n"
                            for i, o, s in (("the movie", "movie the", "be good"), ("", "a", None))))
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["base"])
    spec = DatasetSpec(str(data), prompt_columns=["instruction", "input"], response_column="output",
                       system_column="system")
    rows = list(load_examples(spec, images=False))
    batch = SequenceCollator(tokenizer, spec, {"input_ids", "attention_mask"}, 64, encoder_decoder=False)(rows)
    expected = {
        "movie the": [{"role": "system", "content": "be good"}, {"role": "user", "content": "topic\n\nthe movie"},
                      {"role": "assistant", "content": "movie the"}],
        "a": [{"role": "user", "content": "topic"}, {"role": "assistant", "content": "a"}],
    }
    for i, row in enumerate(rows):
        ids = tokenizer.apply_chat_template(expected[row["output"]], tokenize=True)["input_ids"]
        assert batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() == ids


@pytest.mark.parametrize("tokens", ["all", "response"])
def test_chat_grams_equal_float64_reference(tokens, llm, cli, tmp_path):
    """Every Gram (and its row count) of a chat run, all tokens or the assistant's only, against float64."""
    task = llm["tasks"]["question"]
    cache = stats(cli, llm["base"], task / "train.jsonl", tmp_path / "cache", "--messages-column", "messages",
                  "--tokens", tokens)
    assert cache.manifest.dataset["tokens"] == tokens
    model = transformers.AutoModelForCausalLM.from_pretrained(llm["base"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["base"])
    examples, counted = zip(*(chat_rows(tokenizer, m, tokens == "response") for m in conversations(task)))
    reference = capture_grams(model, list(examples), counted=list(counted) if tokens == "response" else None)
    assistant_tokens = sum(sum(mask) for mask in counted) if tokens == "response" else None
    for name, layer in cache.manifest.layers.items():
        gram = cache.gram(layer.gram)
        assert relative_error(gram, reference["grams"][name]) < 1e-5, name
        assert cache.manifest.grams[layer.gram].tokens == reference["rows"][name]
        if assistant_tokens is not None:
            assert reference["rows"][name] == assistant_tokens


@pytest.mark.parametrize("kind, config", [
    ("llama_causal", {"target_modules": ["q_proj", "down_proj", "lm_head"], "use_rslora": True}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "modules_to_save": ["score"]}),
])
def test_adapter_weights_equal_peft_merge_and_unload(kind, config, workspace, tmp_path):
    """Every tensor (and rows of it) as LoraWeights reads it equals the model peft merges: rsLoRA's scale,
    a targeted LM head saved whole, GPT-2's transposed Conv1D weights, modules saved whole."""
    base = workspace.model(kind, 1)
    cls = getattr(transformers, json.loads((base / "config.json").read_text())["architectures"][0])
    torch.manual_seed(0)
    model = peft.get_peft_model(cls.from_pretrained(base), peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                                                          **config))
    if "modules_to_save" in config:
        with torch.no_grad():
            model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()
    weights = open_weights(tmp_path / "adapter")
    assert weights.changed()
    for name in weights.names():
        assert torch.allclose(weights.get(name), expected[name], atol=1e-6), name
        rows = weights.shape(name)[0]
        assert torch.allclose(weights.rows(name, 1, min(rows, 5)), expected[name][1:5], atol=1e-6), name


def test_adapter_stats_equal_stats_of_the_adapter_merged_by_peft(llm, cli, tmp_path):
    adapter = llm["adapters"]["sentiment"]
    full = merged_checkpoint(adapter, tmp_path / "merged-by-peft")
    args = ("--messages-column", "messages", "--tokens", "response")
    task = llm["tasks"]["sentiment"] / "train.jsonl"
    ours, theirs = stats(cli, adapter, task, tmp_path / "a", *args), stats(cli, full, task, tmp_path / "f", *args)
    assert ours.manifest.model["base_model"] == str(Path(llm["base"]).resolve())
    assert ours.manifest.grams.keys() == theirs.manifest.grams.keys()
    for key, entry in theirs.manifest.grams.items():
        assert ours.manifest.grams[key].tokens == entry.tokens
        assert relative_error(ours.gram(key), theirs.gram(key).double().numpy()) < 1e-5, key


def test_adapters_and_a_full_checkpoint_merge_as_float64_regmean(llm, cli, tmp_path):
    """Two LoRA adapters and a fully fine-tuned model of one architecture: the merged weights equal an
    independent float64 RegMean over the checkpoints peft merges, within 1e-4; the merged folder is a
    complete model with the chat template; task arithmetic takes adapters too."""
    candidates = {"sentiment": llm["adapters"]["sentiment"], "topic": llm["adapters"]["topic"], "question": llm["full"]}
    for name, model in candidates.items():
        stats(cli, model, llm["tasks"][name] / "train.jsonl", tmp_path / "caches" / name, "--messages-column", "messages")
    code, _, err = cli("merge", "--cache-dir", tmp_path / "caches", "--out", tmp_path / "merged", "--device", "cpu")
    assert code == 0, err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {"config.json", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}

    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["base"])
    full = {name: merged_checkpoint(model, tmp_path / f"full-{name}") if name != "question" else model
            for name, model in candidates.items()}
    models = [transformers.AutoModelForCausalLM.from_pretrained(full[name]).eval() for name in candidates]
    captured = [capture_grams(model, [chat_rows(tokenizer, m, False)[0] for m in conversations(llm["tasks"][name])])
                for model, name in zip(models, candidates)]
    expected = regmean_reference(models, captured, 0.95)
    assert set(merged) == set(expected)
    worst = max(relative_error(merged[name], expected[name]) for name in expected)
    assert worst < 1e-4, worst

    code, _, err = cli("merge", "--method", "task-arithmetic", "--pretrained", llm["base"], "--scaling", 0.5,
                       "--model", f"sentiment={candidates['sentiment']}", "--model", f"topic={candidates['topic']}",
                       "--out", tmp_path / "ta", "--device", "cpu")
    assert code == 0, err
    ta = load_file(str(tmp_path / "ta" / "model.safetensors"))
    base = models[0].__class__.from_pretrained(llm["base"]).state_dict()
    states = [m.state_dict() for m in models[:2]]
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        want = base[name] + 0.5 * sum(s[name] - base[name] for s in states)
        assert torch.allclose(ta[name], want, atol=1e-6), name


def test_a_cache_computed_on_another_base_is_refused(llm, cli, tmp_path):
    adapter = llm["adapters"]["topic"]
    stats(cli, adapter, llm["tasks"]["topic"] / "train.jsonl", tmp_path / "caches" / "c", "--messages-column",
          "messages", "--num-examples", 4)
    elsewhere = tmp_path / "same-adapter-other-base"
    shutil.copytree(adapter, elsewhere)
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(llm["full"])
    (elsewhere / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = cli("merge", "--cache-dir", tmp_path / "caches", "--model", f"c={elsewhere}",
                       "--out", tmp_path / "m", "--device", "cpu")
    assert code == 2 and "fingerprint mismatch" in err and len(err.strip().splitlines()) == 1, err


def test_base_model_option_and_a_missing_base(llm, cli, tmp_path):
    """An adapter whose recorded base is gone: stats names --base-model; given it, the cache records that
    base, and merge reads the adapter over it without being told again."""
    moved = tmp_path / "adapter"
    shutil.copytree(llm["adapters"]["topic"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    task = ("--dataset", llm["tasks"]["topic"] / "train.jsonl", "--messages-column", "messages", "--num-examples", 4)
    code, _, err = cli("stats", "--model", moved, *task, "--out", tmp_path / "caches" / "c", "--device", "cpu")
    assert code == 2 and "--base-model PATH" in err and len(err.strip().splitlines()) == 1, err
    cache = stats(cli, moved, *task[1:2], tmp_path / "caches" / "c", *task[2:], "--base-model", llm["base"])
    assert cache.manifest.model["base_model"] == str(Path(llm["base"]).resolve())
    code, _, err = cli("merge", "--cache-dir", tmp_path / "caches", "--out", tmp_path / "m", "--device", "cpu")
    assert code == 0, err
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))  # one candidate: RegMean gives it back
    adapted = open_weights(moved, base_model=str(llm["base"]))
    assert all(relative_error(merged[n], adapted.get(n).double().numpy()) < 1e-5 for n in merged)


@pytest.mark.parametrize("config, message", [
    ({"use_dora": True}, "DoRA (use_dora) is not supported"),
    ({"rank_pattern": {"q_proj": 2}}, "per-module ranks (rank_pattern) is not supported"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "LoRA on the embedding model.embed_tokens is not supported"),
])
def test_unsupported_adapters_are_refused_by_name(config, message, llm, cli, tmp_path):
    adapter = make_adapter(llm["base"], tmp_path / "adapter", 0, **config)
    code, _, err = cli("stats", "--model", adapter, "--dataset", llm["tasks"]["sentiment"] / "train.jsonl",
                       "--messages-column", "messages", "--out", tmp_path / "c", "--device", "cpu")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_chat_data_errors_are_one_line_naming_file_and_line(llm, cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"messages": m}) for m in conversations(llm["tasks"]["sentiment"])[:5]]
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "repeat a"}, {"content": "a"}]})
    bad.write_text("\n".join(lines) + "\n")
    base = ("--out", tmp_path / "c", "--device", "cpu")
    code, _, err = cli("stats", "--model", llm["base"], "--dataset", bad, "--messages-column", "messages", *base)
    assert code == 2 and f"{bad}: line 4: message 2 has no 'role'" in err, err

    plain = tmp_path / "no-template"
    shutil.copytree(llm["base"], plain)
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        (plain / name).unlink(missing_ok=True)
    make_chat_tokenizer(plain, template=None)
    code, _, err = cli("stats", "--model", plain, "--dataset", llm["tasks"]["sentiment"] / "train.jsonl",
                       "--messages-column", "messages", *base)
    assert code == 2 and "tokenizer_config.json: the tokenizer has no chat template" in err, err

    code, _, err = cli("stats", "--model", llm["base"], "--dataset", llm["tasks"]["sentiment"] / "train.jsonl",
                       "--tokens", "response", *base)
    assert code == 2 and "--tokens response: needs chat data" in err, err
    assert not (tmp_path / "c").exists()


def test_attention_implementation_is_passed_to_the_model(llm, cli, tmp_path):
    task = llm["tasks"]["sentiment"] / "train.jsonl"
    eager = stats(cli, llm["base"], task, tmp_path / "eager", "--messages-column", "messages",
                  "--attn-implementation", "eager")
    sdpa = stats(cli, llm["base"], task, tmp_path / "sdpa", "--messages-column", "messages",
                 "--attn-implementation", "sdpa")
    for key in eager.manifest.grams:
        assert relative_error(eager.gram(key), sdpa.gram(key).double().numpy()) < 1e-5
    code, _, err = cli("stats", "--model", llm["base"], "--dataset", task, "--messages-column", "messages",
                       "--attn-implementation", "no-such-kernel", "--out", tmp_path / "x", "--device", "cpu",
                       "--num-examples", 4)
    assert code == 2 and "cannot load the model" in err and len(err.strip().splitlines()) == 1, err


def write_seq2seq_task(path: Path, n: int = 10, seed: int = 0) -> Path:
    """Sources and targets of equal and unequal lengths, so decoder and encoder masks must not be mixed up."""
    rng = np.random.default_rng(seed)
    from regmean_pipeline.testing import WORDS

    with path.open("w") as f:
        for i in range(n):
            source = list(rng.choice(WORDS[:30], int(rng.integers(2, 8))))
            target = source[::-1] if i % 2 else source[: max(1, len(source) - 2)]
            f.write(json.dumps({"text": " ".join(source), "target": " ".join(target)}) + "\n")
    return path


def test_t5_decoder_and_cross_attention_grams_and_merge_equal_float64_reference(workspace, cli, tmp_path):
    """A tiny T5 fed its targets: encoder, decoder and cross-attention Grams, and the merge of two T5s."""
    models = [workspace.model("t5", seed) for seed in (1, 2)]
    tasks = [write_seq2seq_task(tmp_path / f"t{seed}.jsonl", seed=seed) for seed in (1, 2)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(models[0])
    loaded, captured = [], []
    for i, (folder, task) in enumerate(zip(models, tasks)):
        cache = stats(cli, folder, task, tmp_path / "caches" / f"c{i}", "--target-column", "target")
        model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
        rows = [json.loads(line) for line in task.read_text().splitlines()]
        examples = [{"input_ids": torch.tensor([tokenizer(r["text"])["input_ids"]]),
                     "labels": torch.tensor([tokenizer(r["target"])["input_ids"]])} for r in rows]
        reference = capture_grams(model, examples)
        kinds = set()
        for name, layer in cache.manifest.layers.items():
            assert cache.manifest.grams[layer.gram].tokens == reference["rows"][name], name
            assert relative_error(cache.gram(layer.gram), reference["grams"][name]) < 1e-5, name
            kinds.add(name.split(".")[0] + ("-cross" if "EncDecAttention" in name else ""))
        assert kinds == {"encoder", "decoder", "decoder-cross", "lm_head"}
        loaded.append(model)
        captured.append(reference)
    code, out, err = cli("plan", "--model", models[0], "--json")  # the meta-device trace runs the decoder too,
    assert code == 0, err  # so shared inputs are found (a failed trace would count one Gram per layer)
    planned = json.loads(out)  # and the lm_head this checkpoint stores apart from the embeddings is counted
    assert (planned["linear_layers"], planned["grams"]) == (len(cache.manifest.layers), len(cache.manifest.grams))
    assert planned["grams"] < planned["linear_layers"]
    code, _, err = cli("merge", "--cache-dir", tmp_path / "caches", "--out", tmp_path / "m", "--device", "cpu")
    assert code == 0, err
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    expected = regmean_reference(loaded, captured, 0.95)
    worst = max(relative_error(merged[name], expected[name]) for name in merged)
    assert worst < 1e-4, worst

    # Chat data feeds a T5 too: the conversation before the answer to the encoder, the answer to the decoder.
    chat = write_chat_task(tmp_path / "chat", "topic", n_train=6, n_test=2)
    cache = stats(cli, models[0], chat / "train.jsonl", tmp_path / "chat-cache", "--messages-column", "messages")
    answers = sum(len(tokenizer(m[-1]["content"])["input_ids"]) for m in conversations(chat))
    assert cache.manifest.grams[cache.manifest.layers["decoder.block.0.layer.0.SelfAttention.q"].gram].tokens == answers


def test_eval_scores_language_models_by_response_loss(llm, cli, tmp_path):
    """Mean response loss and perplexity per chat task, equal to the loss transformers computes with only
    the assistant's tokens as labels; a method may be one model folder for all tasks; scores are reused."""
    tasks = llm["tasks"]
    args = ["eval", "--task", tasks["sentiment"], "--task", tasks["topic"], "--method", f"base={llm['base']}",
            "--method", f"individual={llm['root']}/adapters", "--out", tmp_path / "eval", "--device", "cpu",
            "--reference", "base", "--reuse-scores"]
    (llm["root"] / "adapters").mkdir(exist_ok=True)
    for name in ("sentiment", "topic"):
        target = llm["root"] / "adapters" / name
        if not target.exists():
            shutil.copytree(llm["adapters"][name], target)
    code, out, err = cli(*args)
    assert code == 0, err
    results = read_json(tmp_path / "eval" / "results.json")
    assert [t["metric"] for t in results["tasks"]] == ["loss", "loss"]
    assert "| base |" in out and "+0.000" in out

    tokenizer = transformers.AutoTokenizer.from_pretrained(llm["base"])
    for label, folder in (("base", llm["base"]), ("individual", None)):
        for name in ("sentiment", "topic"):
            model_dir = folder or merged_checkpoint(llm["adapters"][name], tmp_path / f"full-{name}")
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
            total = count = 0
            for messages in conversations(tasks[name], "test"):
                encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                        return_assistant_tokens_mask=True)
                ids = torch.tensor([encoded["input_ids"]])
                labels = torch.where(torch.tensor([encoded["assistant_masks"]]).bool(), ids, -100)
                labels[0, 0] = -100
                n = int((labels[0, 1:] != -100).sum())
                with torch.no_grad():
                    total += model(input_ids=ids, labels=labels).loss.item() * n
                count += n
            scores = results["methods"][label]["per_task"][name]
            assert scores["tokens"] == count
            assert scores["loss"] == pytest.approx(total / count, rel=1e-5)
            assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert results["methods"]["base"]["average"] == pytest.approx(
        sum(results["methods"]["base"]["per_task"][t]["loss"] for t in ("sentiment", "topic")) / 2)

    code, _, err = cli(*args[:-1], "--overwrite", "--reuse-scores")
    assert code == 0, err
    assert read_json(tmp_path / "eval" / "results.json")["reused_scores"] == 4


def test_plan_reports_adapter_sizes(llm, cli):
    adapter = llm["adapters"]["sentiment"]
    code, out, err = cli("plan", "--model", adapter, "--candidates", 3, "--json")
    assert code == 0, err
    sizes = json.loads(out)
    code, out, err = cli("plan", "--model", llm["base"], "--candidates", 3, "--json")
    assert code == 0, err
    base = json.loads(out)
    assert sizes["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert sizes["base_model"] == str(Path(llm["base"]).resolve())
    for key in ("cache_bytes", "accumulator_bytes", "grams", "weight_bytes", "output_bytes"):
        assert sizes[key] == base[key], key
    code, out, err = cli("plan", "--model", adapter, "--candidates", 3)
    assert "LoRA adapter file" in out and "Grams and cache are the base model's" in out


def test_regmean_plusplus_takes_chat_data_and_adapters(llm, cli, tmp_path):
    """RegMean++ on two LoRA adapters and chat data equals RegMean++ on the same adapters merged into full
    checkpoints by peft (the adapter is read as W0 + scale B A, never written); --tokens response counts
    only the assistant's tokens, which changes the Grams and so the merge."""
    adapters = llm["adapters"]
    full = {name: merged_checkpoint(path, tmp_path / f"full-{name}") for name, path in adapters.items()}

    def merge(models, out, *args):
        pairs = [a for name, model in models.items()
                 for a in ("--model", f"{name}={model}", "--dataset", f"{name}={llm['tasks'][name] / 'train.jsonl'}")]
        code, _, err = cli("merge", "--method", "regmean++", *pairs, "--messages-column", "messages", "--out", out,
                           "--device", "cpu", "--batch-size", 4, "--solve-dtype", "float64", *args)
        assert code == 0, err
        return load_file(str(out / "model.safetensors"))

    from_adapters = merge(adapters, tmp_path / "adapters", "--tokens", "response")
    from_full = merge(full, tmp_path / "full", "--tokens", "response")
    assert from_adapters.keys() == from_full.keys()
    for name, tensor in from_full.items():
        assert relative_error(from_adapters[name], tensor.double().numpy()) < 1e-5, name
    every_token = merge(adapters, tmp_path / "all")
    query = "model.layers.1.self_attn.q_proj.weight"
    assert relative_error(every_token[query], from_adapters[query].double().numpy()) > 1e-4
    report = read_json(tmp_path / "adapters" / "merge_report.json")
    assert report["settings"]["tokens"] == "response" and report["settings"]["messages_column"] == "messages"
    assert (tmp_path / "adapters" / "config.json").is_file()  # the base's config, as for any adapter merge
