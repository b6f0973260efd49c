"""Model cards of merge outputs: hub metadata, a config block that remakes the merge bit for bit, and the
accuracy `regmean eval` adds without changing the model's score key."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from huggingface_hub import ModelCard

from regmean_pipeline.config import load_config, option_keys
from regmean_pipeline.merge import model_card
from regmean_pipeline.merge.methods.registry import config_keys
from regmean_pipeline.merge.model_card import (
    ACCURACY_BEGIN,
    HEAD_TABLES,
    RUN_ONLY,
    build_card,
    pipeline_tag_of,
    record_accuracy,
)
from regmean_pipeline.tasks.score_reuse import model_digest
from regmean_pipeline.testing import make_model, save_model, write_classification_task
from tests.conftest import read_json

HEAD = r"classifier\..*"
TASKS = {"alpha": ["no", "yes"], "beta": ["x", "y", "z"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A working directory as a user has it: a pretrained body, two task models fine-tuned from it (bodies
    moved apart by seeded noise), their task folders and stats caches, all named by relative paths."""
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        save_model(make_model("bert", seed=0, architectures=["BertModel"]), root / "base")
        for seed, (name, labels) in enumerate(TASKS.items(), start=1):
            write_classification_task(root / "tasks" / name, labels, n_train=24, n_test=20, seed=seed)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(str(root / "base"),
                                                                                     num_labels=len(labels))
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)
            save_model(model, root / "candidates" / name)
            run(["stats", "--model", f"candidates/{name}", "--dataset", f"tasks/{name}/train.jsonl",
                 "--out", f"caches/{name}", "--device", "cpu"])
        run(["merge", "--cache-dir", "caches", "--exclude", HEAD, "--per-candidate", "--out", "merged",
             "--device", "cpu"])
    return root


def run(args: list) -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args] + ["--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr


def config_block(card_path: Path) -> str:
    """The card's ```yaml block, as a user would copy it."""
    blocks = re.findall(r"```yaml\n(.*?)```", ModelCard.load(card_path).text, flags=re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a merge output but its report (which holds the date and timings); cards included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "merge_report.json"}


def test_cards_of_a_merge_and_its_per_candidate_models_load_with_their_metadata(project):
    report = read_json(project / "merged" / "merge_report.json")
    manifests = {name: read_json(project / "caches" / name / "manifest.json") for name in TASKS}
    for folder, own in [(project / "merged", None)] + [(project / "merged" / "per_candidate" / n, n) for n in TASKS]:
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "transformers"
        assert card.data.tags == ["merge", "regmean", "regmean-pipeline"]
        assert card.data.pipeline_tag == "text-classification"
        assert card.data.base_model is None  # local folders are no hub ids; the table names them
        assert card.data.eval_results is None
        for name, manifest in manifests.items():
            row = next(line for line in card.text.splitlines() if line.startswith(f"| {name} |"))
            assert manifest["model"]["fingerprint"] in row and manifest["model"]["reference"] in row
            assert f"| {manifest['dataset']['path']} | train | text | {manifest['examples']} | 0 |" in row
        assert ("carries candidate **" + own + "**") in card.text if own else "carries candidate" not in card.text
        assert "None: every one of the" in card.text and report["fallback_layers"] == []
    assert not (project / "candidates" / "alpha" / "README.md").exists()


def test_base_models_and_datasets_that_are_hub_ids_go_to_the_metadata(project):
    report = read_json(project / "merged" / "merge_report.json")
    for candidate in report["candidates"]:
        candidate["reference"] = f"some-org/{candidate['name']}"
        candidate["dataset"]["path"] = f"some-org/{candidate['name']}-data"
    report["candidates"][1]["dataset"]["path"] = "/data/local.jsonl"
    card = build_card(report, model_name="m", pipeline_tag="text-classification")
    assert card.data.base_model == ["some-org/alpha", "some-org/beta"]
    assert card.data.base_model_relation == "merge"
    assert card.data.datasets == ["some-org/alpha-data"]
    assert ModelCard(str(card)).data.base_model == ["some-org/alpha", "some-org/beta"]


def test_fallback_layers_are_listed(project):
    report = read_json(project / "merged" / "merge_report.json")
    name = sorted(report["layers"])[0]
    report["layers"][name].update(solver="lu-ridge", condition_estimate=None, rank=3)
    report["fallback_layers"] = [name]
    text = build_card(report, model_name="m", pipeline_tag=None).text
    assert f"| {name} | lu-ridge | singular | 3 |" in text
    assert f"1 of {len(report['layers'])} solved layers needed the solver's fallback" in text


def test_the_config_block_remakes_the_merge_bit_for_bit(project, cli, monkeypatch):
    monkeypatch.chdir(project)
    block = config_block(project / "merged" / "README.md")
    assert block == config_block(project / "merged" / "per_candidate" / "beta" / "README.md")
    config = yaml.safe_load(block)
    assert config["method"] == "regmean" and config["cache_dir"] == "caches" and config["per_candidate"] is True
    assert config["exclude_param_names_regex"] == [HEAD] and "device" not in config
    report = read_json(project / "merged" / "merge_report.json")
    assert set(report["settings"]) - RUN_ONLY <= set(option_keys(config_keys()))  # every setting can be given back
    Path("rerun.yaml").write_text(block)
    assert load_config("rerun.yaml", config_keys())["reduce_non_diagonal_ratio"] == 0.95
    code, _, err = cli("merge", "--config", "rerun.yaml", "--out", "again/merged", "--device", "cpu")
    assert code == 0, err  # an output of the same name, so that the cards' titles agree too
    first, second = files(project / "merged"), files(project / "again" / "merged")
    assert "model.safetensors" in first and "per_candidate/beta/model.safetensors" in first
    assert "README.md" in first and "per_candidate/beta/README.md" in first  # the same card, too
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
    assert read_json(project / "again" / "merged" / "merge_report.json")["settings"] == report["settings"]


def test_a_task_arithmetic_card_round_trips(project, cli, monkeypatch):
    monkeypatch.chdir(project)
    code, _, err = cli("merge", "--method", "task-arithmetic", "--pretrained", "base", "--scaling", 0.4,
                       "--model", "alpha=candidates/alpha", "--model", "beta=candidates/beta",
                       "--coefficient", "beta=0.5", "--exclude", HEAD, "--out", "ta", "--device", "cpu")
    assert code == 0, err
    card = ModelCard.load(project / "ta" / "README.md")
    assert card.data.tags == ["merge", "task-arithmetic", "regmean-pipeline"]
    assert "Fallback layers" not in card.text  # nothing is solved, so nothing falls back
    block = config_block(project / "ta" / "README.md")
    config = yaml.safe_load(block)
    assert config["models"] == {"alpha": "candidates/alpha", "beta": "candidates/beta"}
    assert config["pretrained"] == "base" and config["scaling"] == 0.4 and config["coefficients"] == {"beta": 0.5}
    report = read_json(project / "ta" / "merge_report.json")
    assert set(report["settings"]) - RUN_ONLY <= set(option_keys(config_keys()))
    for candidate in report["candidates"]:  # no cache, yet a fingerprint: the same one stats records
        manifest = read_json(project / "caches" / candidate["name"] / "manifest.json")
        assert candidate["fingerprint"] == manifest["model"]["fingerprint"]
        assert candidate["fingerprint"] in card.text
    Path("ta.yaml").write_text(block)
    code, _, err = cli("merge", "--config", "ta.yaml", "--out", "again/ta", "--device", "cpu")
    assert code == 0, err
    assert files(project / "ta") == files(project / "again" / "ta")
    code, _, err = cli("merge", "--config", "ta.yaml", "--scaling", 0.6, "--coefficient", "beta=1",
                       "--out", "ta-flags", "--device", "cpu")
    assert code == 0, err  # flags win over the file, a coefficient name by name
    settings = read_json(project / "ta-flags" / "merge_report.json")["settings"]
    assert settings["scaling"] == 0.6 and settings["coefficients"] == {"beta": 1.0}
    assert files(project / "ta-flags")["model.safetensors"] != files(project / "ta")["model.safetensors"]


def test_a_regmean_plusplus_card_round_trips(project, cli, monkeypatch):
    """RegMean++ reads its data while it merges: its card's block holds the datasets and data options,
    and remakes the merge (and the per-candidate models and cards) bit for bit."""
    monkeypatch.chdir(project)
    pairs = [arg for name in TASKS for arg in ("--model", f"{name}=candidates/{name}",
                                                "--dataset", f"{name}=tasks/{name}/train.jsonl")]
    code, _, err = cli("merge", "--method", "regmean++", *pairs, "--exclude", HEAD, "--per-candidate",
                       "--num-examples", 16, "--batch-size", 4, "--max-length", 12, "--out", "pp", "--device", "cpu")
    assert code == 0, err
    card = ModelCard.load(project / "pp" / "README.md")
    assert card.data.tags == ["merge", "regmean++", "regmean-pipeline"] and "RegMean++" in card.text
    config = yaml.safe_load(config_block(project / "pp" / "README.md"))
    assert config["method"] == "regmean++" and config["datasets"]["beta"] == "tasks/beta/train.jsonl"
    assert config["num_regmean_examples"] == 16 and config["max_length"] == 12 and config["batch_size"] == 4
    report = read_json(project / "pp" / "merge_report.json")
    assert set(report["settings"]) - RUN_ONLY <= set(option_keys(config_keys()))
    assert [c["examples"] for c in report["candidates"]] == [16, 16]
    Path("pp.yaml").write_text(config_block(project / "pp" / "README.md"))
    code, _, err = cli("merge", "--config", "pp.yaml", "--out", "again/pp", "--device", "cpu")
    assert code == 0, err
    assert files(project / "pp") == files(project / "again" / "pp")


def test_eval_adds_the_accuracy_to_our_cards_only_and_keeps_the_score_key(project, cli, tmp_path):
    merged = tmp_path / "regmean"  # a copy: the module's merge stays as it was made
    shutil.copytree(project / "merged" / "per_candidate", merged)
    alpha_card = merged / "alpha" / "README.md"
    alpha_card.chmod(0o640)
    before = alpha_card.read_text()
    digest = model_digest(merged / "alpha")
    candidates = tmp_path / "candidates"
    shutil.copytree(project / "candidates", candidates)
    foreign = "---\nlicense: mit\n---\n# Someone's own card\n"
    (candidates / "alpha" / "README.md").write_text(foreign)

    def evaluate(out, *args):
        code, _, err = cli("eval", *[f"--task={project / 'tasks' / n}" for n in TASKS], "--device", "cpu",
                           "--method", f"regmean={merged}", "--method", f"individual={candidates}", "--out", out,
                           *args)
        assert code == 0, err
        return read_json(out / "results.json")

    results = evaluate(tmp_path / "eval")
    assert (candidates / "alpha" / "README.md").read_text() == foreign
    assert not (candidates / "beta" / "README.md").exists()
    for name in TASKS:
        scores = results["methods"]["regmean"]["per_task"][name]
        card = ModelCard.load(merged / name / "README.md")
        [result] = card.data.eval_results
        assert (result.dataset_name, result.metric_type, result.metric_value) == (name, "accuracy", scores["accuracy"])
        assert result.task_type == "text-classification" and result.dataset_revision == scores["key"]["task"]
        row = f"| {name} | {100 * scores['accuracy']:.2f}% | {scores['correct']} / {scores['total']} |"
        assert row in card.text
    after = alpha_card.read_text()
    assert after.split(ACCURACY_BEGIN)[0].split("---", 2)[2] == before.split(ACCURACY_BEGIN)[0].split("---", 2)[2]
    assert alpha_card.stat().st_mode & 0o777 == 0o640  # rewritten in one step, keeping its permissions
    assert not [p for p in (merged / "alpha").iterdir() if p.name.startswith(".")]  # no temporary file left
    assert model_digest(merged / "alpha") == digest == results["methods"]["regmean"]["per_task"]["alpha"]["key"]["model"]

    again = evaluate(tmp_path / "eval", "--reuse-scores", "--overwrite")
    assert again["reused_scores"] == 4  # the card update changed no key
    assert alpha_card.read_text() == after  # the same scores again: the same card
    evaluate(tmp_path / "other", "--max-length", 16)
    rows = ModelCard.load(alpha_card).data.eval_results
    assert sorted(r.metric_args["max_length"] for r in rows) == [16, 64]  # other settings: a row of their own


def test_a_card_that_cannot_be_parsed_is_left_as_it_is(tmp_path, caplog):
    folder = tmp_path / "model"
    folder.mkdir()
    broken = f"---\ntags: [unclosed\n---\n{ACCURACY_BEGIN}\n<!-- regmean-pipeline: end of accuracy -->\n"
    (folder / "README.md").write_text(broken)
    from stages.evaluate import update_model_cards

    key = {"task": "sha256:x", "max_length": 64, "batch_size": 8, "device": "cpu", "torch": "2"}
    update_model_cards({"methods": {"m": {"folder": str(tmp_path), "per_task": {
        "model": {"accuracy": 0.5, "correct": 1, "total": 2, "key": key}}}}})
    assert (folder / "README.md").read_text() == broken
    assert "model card not updated" in caplog.text
    assert record_accuracy(tmp_path / "missing", task="t", scores={}, key=key) is False


@pytest.mark.parametrize("architecture, tag", [
    ("BertForSequenceClassification", "text-classification"),
    ("LlamaForCausalLM", "text-generation"),
    ("GPT2LMHeadModel", "text-generation"),
    ("BertForTokenClassification", "token-classification"),
    ("BertForQuestionAnswering", "question-answering"),
    ("RobertaForMaskedLM", "fill-mask"),
    ("ViTForImageClassification", "image-classification"),
    ("T5ForConditionalGeneration", "text2text-generation"),
    ("BartForConditionalGeneration", "text2text-generation"),  # also a masked LM to transformers
    ("WhisperForConditionalGeneration", "automatic-speech-recognition"),
    ("BertModel", "feature-extraction"),
    ("CLIPTextModel", "feature-extraction"),
    ("CLIPVisionModel", "image-feature-extraction"),
    ("CLIPVisionModelWithProjection", "image-feature-extraction"),
    ("ViTModel", "image-feature-extraction"),
    ("MyOwnForSequenceClassification", "text-classification"),  # a model's own code: by the class name
    ("MyOwnSeq2SeqLM", "text2text-generation"),
    ("MyOwnThing", None),
    (None, None),
])
def test_pipeline_tag_follows_the_head(architecture, tag):
    assert pipeline_tag_of(architecture) == tag


def test_pipeline_tag_lookup_imports_the_model_tables_only_for_ambiguous_names():
    """Heads named by their class's ending are tagged without importing transformers' model tables (about a
    second); a bare ...Model or a ForConditionalGeneration is looked up in them, with their answer."""
    code = ("import sys; from regmean_pipeline.merge.model_card import pipeline_tag_of; "
            "tags = [pipeline_tag_of(a) for a in ('BertForSequenceClassification', 'CLIPVisionModel', "
            "'LlamaForCausalLM')]; imported = 'transformers.models.auto.modeling_auto' in sys.modules; "
            "tags.append(pipeline_tag_of('ViTModel')); "
            "print(tags, imported, 'transformers.models.auto.modeling_auto' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ("['text-classification', 'image-feature-extraction', 'text-generation', "
                                   "'image-feature-extraction'] False True")


def test_the_tags_by_class_name_agree_with_transformers_tables():
    """Every class the installed transformers lists under a head, whose name ends in one of the suffixes, is
    tagged as its first table says, given what its folder says of its inputs (audio, a vision tower)."""
    from transformers.models.auto import modeling_auto

    first: dict[str, str] = {}
    for tag, table in HEAD_TABLES:
        for value in getattr(modeling_auto, table).values():
            for architecture in (value,) if isinstance(value, str) else value:
                first.setdefault(architecture, tag)
    named = {a: tag for a, tag in first.items()
             if next((t for suffix, t in model_card.HEAD_SUFFIXES if a.endswith(suffix)), None) is not None}
    assert len(named) > 500
    for architecture, tag in named.items():
        hints = {"audio": tag == "audio-classification", "multimodal": tag == "image-text-to-text"}
        assert pipeline_tag_of(architecture, **hints) == tag, architecture


def test_folder_hints_tell_audio_and_multimodal_models_apart(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Wav2Vec2ForSequenceClassification"]}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"feature_extractor_type": "Wav2Vec2FeatureExtractor"}))
    assert model_card.folder_hints(tmp_path) == {"audio": True, "multimodal": False}
    (tmp_path / "tokenizer_config.json").write_text("{}")  # a text model with a feature extractor too: not audio
    assert model_card.folder_hints(tmp_path) == {"audio": False, "multimodal": False}
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {}, "text_config": {}}))
    assert model_card.folder_hints(tmp_path)["multimodal"]


@pytest.mark.parametrize("config, message", [
    ("method: regmean\nmodles: {a: x}\n", "unknown key 'modles'"),
    ("models: [a, b]\n", "key 'models' must be a mapping, got ['a', 'b']"),
    ("models: {a: 3}\n", "key 'models' must map candidate names to str, got a: 3"),
    ("coefficients: {a: two}\n", "key 'coefficients' must map candidate names to float or int, got a: 'two'"),
    ("coefficients: {a: true}\n", "key 'coefficients' must map candidate names to float or int, got a: True"),
    ("coefficients: {1: 2.0}\n", "key 'coefficients': candidate names must be strings, got 1"),
    ("caches: [caches/a, 3]\n", "key 'caches' must be a list of str, got the item 3"),
    ("caches: caches/a\n", "key 'caches' must be a list, got 'caches/a'"),
    ("per_candidate: 'yes'\n", "key 'per_candidate' must be bool, got 'yes'"),
    ("scaling: true\n", "key 'scaling' must be float or int, got True"),
    ("method: 3\n", "key 'method' must be str, got 3"),
])
def test_bad_config_keys_fail_with_one_line(config, message, cli, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config)
    code, _, err = cli("merge", "--config", path, "--out", tmp_path / "out")
    assert code == 2 and message in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_python_api_reads_a_card_config_and_refuses_another_method(project):
    from regmean_pipeline.api import RegMean
    from regmean_pipeline.errors import RegMeanError

    config = yaml.safe_load(config_block(project / "merged" / "README.md"))
    merger = RegMean.from_config(config)  # the merge-only keys (cache_dir, per_candidate, ...) are not its business
    assert merger.settings.exclude == [HEAD] and merger.solve.reduce_non_diagonal_ratio == 0.95
    with pytest.raises(RegMeanError, match="method 'task-arithmetic'"):
        RegMean.from_config({**config, "method": "task-arithmetic"})
