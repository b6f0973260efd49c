"""README.md model cards of merged models, built with huggingface_hub's ModelCard.

The metadata is what the hub reads (base models, tags, library, pipeline tag, and the accuracy
``regmean eval`` measured, as model-index); the body gives the merge's settings as a config that
``regmean merge --config`` reads back to make the same bytes, the candidates with their fingerprints
and data, the layers the solver's fallback handled, and the accuracy table. Everything comes from the
merge report, so a new method needs nothing here but config keys for its settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from regmean_pipeline.config import config_of, option_keys
from regmean_pipeline.io.atomic import replace_file
from regmean_pipeline.io.weights import is_hub_id
from regmean_pipeline.merge.methods.registry import METHODS, config_keys

log = logging.getLogger(__name__)

TOOL = "regmean-pipeline"
CARD_NAME = "README.md"
ACCURACY_BEGIN = "<!-- regmean-pipeline: accuracy (regmean eval rewrites this part) -->"
ACCURACY_END = "<!-- regmean-pipeline: end of accuracy -->"
RUN_ONLY = frozenset({"device", "ranks"})  # report settings that say where a merge ran, not what it made
FALLBACK_ROWS = 50  # longer lists stay in merge_report.json
# (pipeline tag, transformers' auto-class table listing the architectures with that head): most specific
# first, since a class may sit in several tables (BartForConditionalGeneration: seq2seq and masked LM).
HEAD_TABLES = (
    ("text-classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("token-classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("question-answering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("text2text-generation", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("automatic-speech-recognition", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("automatic-speech-recognition", "MODEL_FOR_CTC_MAPPING_NAMES"),
    ("image-text-to-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("text-generation", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("fill-mask", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("zero-shot-image-classification", "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("audio-classification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    ("object-detection", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES"),
    ("image-segmentation", "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES"),
)

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## How it was merged

Merged by `regmean merge` ({{ tool }}) with {{ method }}.
{% if chosen_by %}
{{ chosen_by }}
{% endif %}
To make the same model again, save this block as `merge.yaml` and run
`regmean merge --config merge.yaml --out OUT` in the folder the merge ran in (paths are as they were
given then; the candidates and caches must hold the same files: the fingerprints below).

```yaml
{{ config }}```

## Candidates

| Candidate | Weights | Fingerprint | Coefficient | Data | Split | Columns | Examples | Seed | Max length |
|---|---|---|---|---|---|---|---|---|---|
{% for row in candidates %}| {{ row | join(" | ") }} |
{% endfor %}{% if fallback is not none %}
## Fallback layers

{{ fallback }}
{% endif %}
## Accuracy

""" + ACCURACY_BEGIN + """
{{ accuracy }}
""" + ACCURACY_END + "\n"


# Class-name endings that name the head: the tag without importing transformers' model tables (their
# import costs about a second). Other names (ForConditionalGeneration, a bare ...Model) are looked up in
# those tables. Two endings are shared with other modalities, told apart by the model's own files
# (``folder_hints``): an audio classifier is a ForSequenceClassification with a feature extractor, a
# multimodal causal LM has a vision config. None: an ending shared by several heads (XLM's causal, Flaubert's
# masked LM head), looked up.
HEAD_SUFFIXES = (
    ("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"), ("Seq2SeqLM", "text2text-generation"),
    ("ForCausalLM", "text-generation"), ("WithLMHeadModel", None), ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"), ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"), ("ForCTC", "automatic-speech-recognition"),
    ("ForObjectDetection", "object-detection"),
)


def auto_table(name: str) -> Mapping[str, Any]:
    """One of transformers' auto-class tables (model type -> class name or names) by its name."""
    from transformers.models.auto import modeling_auto

    return dict(getattr(modeling_auto, name, {}))


def pipeline_tag_of(architecture: str | None, *, audio: bool = False, multimodal: bool = False) -> str | None:
    """The hub's pipeline tag for a model class: its head decides (None when it is unknown). ``audio``: the
    model takes audio features; ``multimodal``: its config has a vision tower (``folder_hints``)."""
    if not architecture:
        return None
    named = next((tag for suffix, tag in HEAD_SUFFIXES if architecture.endswith(suffix)), None)
    if named is not None:
        if audio and named == "text-classification":
            return "audio-classification"
        return "image-text-to-text" if multimodal and named == "text-generation" else named
    bare = architecture.endswith(("Model", "ModelWithProjection"))
    if bare and ("Vision" in architecture or "Text" in architecture):
        return "image-feature-extraction" if "Vision" in architecture else "feature-extraction"

    def listed(table: str) -> bool:
        return any(architecture in ((value,) if isinstance(value, str) else value)
                   for value in auto_table(table).values())

    for tag, table in HEAD_TABLES:
        if listed(table):
            return tag
    if bare or listed("MODEL_MAPPING_NAMES"):
        return "image-feature-extraction" if listed("MODEL_FOR_IMAGE_MAPPING_NAMES") else "feature-extraction"
    return None


def folder_hints(folder: Path) -> dict[str, bool]:
    """What a model folder says of its inputs: audio features (a feature extractor, no tokenizer or image
    processor) or a vision tower beside a language model."""
    config, preprocessor = _json_object(Path(folder) / "config.json"), _json_object(Path(folder) / "preprocessor_config.json")
    audio = "feature_extractor_type" in preprocessor and "image_processor_type" not in preprocessor \
        and not (Path(folder) / "tokenizer_config.json").exists()
    return {"audio": audio, "multimodal": "vision_config" in config}


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def architecture_in(folder: Path) -> str | None:
    """The first class of config.json's ``architectures``, if the folder says."""
    architectures = _json_object(Path(folder) / "config.json").get("architectures")
    return architectures[0] if isinstance(architectures, list) and architectures else None


def rerun_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The report's settings as config keys: everything that decides the merged bytes, nothing about
    where the merge ran (device, processes)."""
    keys = config_keys()
    known = option_keys(keys)
    kept = {option: value for option, value in settings.items() if option not in RUN_ONLY}
    missing = sorted(option for option in kept if option not in known)
    if missing:  # a setting no config key can give back: warn rather than fail a finished merge
        log.warning("model card: settings %s have no config key; its config block will not give them back", missing)
    return config_of({option: value for option, value in kept.items() if option not in missing}, keys)


def build_card(report: dict[str, Any], *, model_name: str, pipeline_tag: str | None,
               candidate: str | None = None) -> ModelCard:
    """The card of a merge output (``candidate`` None) or of one candidate's per-candidate model.

    It describes the model, not the run: no date or timing (merge_report.json has them), so a merge made
    again with the same inputs writes the same card."""
    settings = report["settings"]
    candidates = report["candidates"]
    base_models = _unique(c["reference"] for c in candidates if c.get("reference") and is_hub_id(c["reference"]))
    datasets = _unique(c["dataset"]["path"] for c in candidates
                       if isinstance(c.get("dataset"), dict) and is_hub_id(str(c["dataset"].get("path", ""))))
    data = ModelCardData(base_model=base_models or None, datasets=datasets or None, library_name="transformers",
                         pipeline_tag=pipeline_tag, tags=_unique(["merge", settings["method"], TOOL]),
                         model_name=model_name)
    if base_models:
        data.base_model_relation = "merge"
    config = rerun_config(settings)
    where = f"merged on {settings.get('device', 'an unrecorded device')}"
    if settings.get("ranks", 1) > 1:
        where += f" by {settings['ranks']} processes"
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=model_name, summary=_summary(report, candidate),
        tool=report.get("tool", TOOL),
        method=METHODS[settings["method"]].title if settings["method"] in METHODS else f"the {settings['method']} method",
        config=f"# {where}; another device type may round differently\n"
               + yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
        candidates=[_candidate_row(c) for c in candidates],
        fallback=_fallback(report), accuracy=_accuracy_table([]), chosen_by=report.get("chosen_by"),
    )


def write_card(folder: Path, report: dict[str, Any], *, model_name: str, candidate: str | None = None) -> Path:
    """Build the card of the model in ``folder`` (its head from config.json) and write folder/README.md."""
    card = build_card(report, model_name=model_name, pipeline_tag=pipeline_tag_of(architecture_in(folder), **folder_hints(folder)),
                      candidate=candidate)
    path = Path(folder) / CARD_NAME
    replace_file(path, str(card))
    return path


def record_accuracy(folder: Path, *, task: str, scores: dict[str, Any], key: dict[str, Any]) -> bool:
    """Add (or replace) a test score in the card of ``folder`` if this tool made the card; False otherwise.

    The score goes to the card's model-index (the hub's place for results) and to its accuracy table;
    the rest of the card stays as it was. A score under other eval settings gets a row of its own.
    """
    path = Path(folder) / CARD_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return False
    if ACCURACY_BEGIN not in text or ACCURACY_END not in text:
        return False  # no card, or not one of ours: left alone
    card = ModelCard(text)
    # plain JSON values: the key holds str subclasses (torch's version) that YAML would tag as Python objects
    settings = json.loads(json.dumps({name: key[name] for name in ("max_length", "batch_size", "device", "torch")
                                      if name in key}))
    if "accuracy" in scores:  # a classifier's test accuracy
        metric, value, counted = "accuracy", scores["accuracy"], {"examples": scores["total"]}
    else:  # a language model's mean response loss (regmean eval on a chat task)
        metric, value, counted = "loss", scores["loss"], {"tokens": scores["tokens"]}
    result = EvalResult(task_type=card.data.pipeline_tag or "text-classification", dataset_type=task,
                        dataset_name=task, dataset_split="test", dataset_revision=key.get("task"),
                        dataset_args=counted, metric_type=metric, metric_value=value, metric_args=settings)
    results = [r for r in card.data.eval_results or [] if _row_key(r) != _row_key(result)] + [result]
    card.data.eval_results = sorted(results, key=lambda r: (r.dataset_name, repr(r.metric_args)))
    card.data.model_name = card.data.model_name or Path(folder).resolve().name
    head, rest = card.text.split(ACCURACY_BEGIN, 1)
    card.text = f"{head}{ACCURACY_BEGIN}\n{_accuracy_table(card.data.eval_results)}\n{ACCURACY_END}" \
                f"{rest.split(ACCURACY_END, 1)[1]}"
    replace_file(path, str(card))
    return True


def _summary(report: dict[str, Any], candidate: str | None) -> str:
    names = ", ".join(f"**{c['name']}**" for c in report["candidates"])
    merged = f"A merge of {len(report['candidates'])} fine-tuned models ({names})."
    if candidate is None:
        return merged + " Parameters kept out of the merge come from the first candidate (or the base model)."
    return (f"{merged} This copy carries candidate **{candidate}**'s own parameters where the merge kept them out "
            f"(its task head), with its config and tokenizer; the other candidates' copies are its siblings in "
            f"the merge's `per_candidate/` folder.")


def _candidate_row(candidate: dict[str, Any]) -> list[str]:
    dataset = candidate.get("dataset") if isinstance(candidate.get("dataset"), dict) else {}
    cells = [candidate["name"], candidate.get("reference") or candidate.get("weights", ""),
             f"`{candidate['fingerprint']}`" if candidate.get("fingerprint") else "",
             candidate.get("coefficient", 1.0)]
    if dataset:
        columns = [dataset.get(key) for key in ("text_column", "text_pair_column", "image_column")]
        cells += [dataset.get("path"), dataset.get("split"), ", ".join(c for c in columns if c) or "default",
                  candidate.get("examples"), dataset.get("seed"), dataset.get("max_length") or "model's limit"]
    else:
        cells += ["none (no Grams: a dataless method)", "", "", "", "", ""]
    return [_cell(cell) for cell in cells]


def _fallback(report: dict[str, Any]) -> str | None:
    """None when no layer was solved (dataless methods): there is no solver to fall back from."""
    layers = report.get("layers") or {}
    if not layers:
        return None
    names = report.get("fallback_layers") or []
    if not names:
        return f"None: every one of the {len(layers)} solved layers had a well-conditioned system (Cholesky)."
    lines = [f"{len(names)} of {len(layers)} solved layers needed the solver's fallback (an ill-conditioned or "
             "singular Gram sum):", "", "| Layer | Solver | Condition estimate | Rank |", "|---|---|---|---|"]
    for name in names[:FALLBACK_ROWS]:
        entry = layers.get(name, {})
        condition = entry.get("condition_estimate")
        lines.append(f"| {_cell(name)} | {_cell(entry.get('solver', ''))} | "
                     f"{'singular' if condition is None else f'{condition:.3g}'} | {_cell(entry.get('rank', ''))} |")
    if len(names) > FALLBACK_ROWS:
        lines += ["", f"...and {len(names) - FALLBACK_ROWS} more, listed in the merge's merge_report.json."]
    return "\n".join(lines)


def _accuracy_table(results: list[EvalResult]) -> str:
    if not results:
        return ("Not scored yet: `regmean eval` writes the test accuracy here (and in the metadata) when it "
                "scores this folder.")
    lines = ["Scored by `regmean eval`:", "",
             "| Task | Accuracy | Correct / total | Test data | Max length | Batch size | Device | torch |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        total = (result.dataset_args or {}).get("examples")
        args = result.metric_args or {}
        if result.metric_type == "loss":  # a language model: mean response loss, over so many tokens
            score, correct = f"loss {result.metric_value:.4f}", f"{(result.dataset_args or {}).get('tokens')} tokens"
        else:
            score = f"{100 * result.metric_value:.2f}%"
            correct = f"{round(result.metric_value * total)} / {total}" if isinstance(total, int) else ""
        cells = [result.dataset_name, score, correct,
                 f"`{result.dataset_revision}`" if result.dataset_revision else "", args.get("max_length", ""),
                 args.get("batch_size", ""), args.get("device", ""), args.get("torch", "")]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _row_key(result: EvalResult) -> tuple:
    return result.dataset_name, result.dataset_split, result.metric_type, repr(sorted((result.metric_args or {}).items()))


def _cell(value: Any) -> str:
    """A markdown table cell: no line breaks, no bare pipes."""
    return ("" if value is None else str(value)).replace("\n", " ").replace("|", "\\|")


def _unique(values) -> list:
    return list(dict.fromkeys(values))
