"""Score models per task: every method is a folder holding one model folder per task (the candidates
themselves, or a merge's per-candidate export: merged body plus that task's own head), or one model
folder used for every task (a merged language model). Classification tasks are scored by accuracy,
chat tasks by the mean loss of the responses (a causal language model, or a LoRA adapter of one).

With ``reuse_scores``, a model whose files, test data, settings and torch are those of a score in
OUT's earlier results.json or in the candidate's finetune.json is not scored again (see
regmean_pipeline.tasks.score_reuse); every score records its key either way."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from regmean_pipeline import __version__
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.adapters import ADAPTER_CONFIG
from regmean_pipeline.io.atomic import check_target, staged_directory
from regmean_pipeline.io.model_folder import write_json
from regmean_pipeline.measure.chat import check_messages
from regmean_pipeline.measure.lm_loss import response_loss
from regmean_pipeline.measure.models import load_model, load_preprocessor, resolve_device
from regmean_pipeline.merge.model_card import record_accuracy
from regmean_pipeline.tasks.evaluate import accuracy, load_classifier
from regmean_pipeline.tasks.results import format_table, metric_averages, plot_scores
from regmean_pipeline.tasks.score_reuse import ScoreBook, score_key
from regmean_pipeline.tasks.task_folder import ChatTask, load_task

log = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TABLE_NAME = "results.md"
CHART_NAME = "accuracy.png"


@dataclass
class EvalOptions:
    tasks: list[str]  # task folders
    methods: dict[str, str]  # label -> folder with one model folder per task name
    out: str
    reference: str | None = "individual"  # the method others are compared with, when present
    batch_size: int = 64
    max_length: int = 64
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True
    title: str = "Test accuracy per task"
    reuse_scores: bool = False  # look scores of unchanged models up instead of recomputing them


def is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / ADAPTER_CONFIG).is_file()


def model_for(root: str | Path, task: str) -> Path | None:
    """The method's model for a task (by name): ROOT/TASK, else ROOT itself when it is one model for all tasks."""
    own = Path(root) / task
    return own if is_model_folder(own) else Path(root) if is_model_folder(Path(root)) else None


def load_test_set(task):
    if isinstance(task, ChatTask):
        path = task.split_file("test")
        return [check_messages(value, f"{path}: line {number}") for number, value in enumerate(task.load("test"), 1)]
    return task.load("test")


def language_model_scores(folder: Path, conversations: list, device: torch.device, options: EvalOptions,
                          desc: str) -> dict:
    """The mean response loss and perplexity of a causal language model (or a LoRA adapter of one)."""
    model = load_model(folder, dtype=torch.float32, device=device)
    if getattr(model.config, "is_encoder_decoder", False) or not type(model).__name__.endswith("ForCausalLM"):
        raise RegMeanError(f"{folder}: {type(model).__name__} is not a causal language model; chat tasks score those")
    tokenizer = load_preprocessor(folder, images=False)
    return response_loss(model, tokenizer, conversations, batch_size=options.batch_size,
                         max_length=options.max_length, desc=desc, progress=options.progress)


def run_eval(options: EvalOptions) -> dict:
    started = time.perf_counter()
    out = Path(options.out)
    check_target(out, overwrite=options.overwrite)
    if not options.tasks or not options.methods:
        raise RegMeanError("eval: give at least one --task and one --method LABEL=FOLDER")
    tasks = [load_task(folder, kinds=("classification", ChatTask.kind)) for folder in options.tasks]
    for label, root in options.methods.items():  # every folder checked before any scoring
        for task in tasks:
            if model_for(root, task.name) is None:
                raise RegMeanError(f"--method {label}={root}: no model folder {Path(root) / task.name} for task "
                                   f"{task.name}, and {root} is not one model folder for all tasks "
                                   "(`regmean merge --per-candidate` writes one per task to OUT/per_candidate)")
    reference = options.reference if options.reference in options.methods else None
    device = resolve_device(options.device)
    test_sets = {task.name: load_test_set(task) for task in tasks}
    checksums = {task.name: task.checksum() for task in tasks}
    book = ScoreBook()
    if options.reuse_scores:
        book.read_eval_results(out / RESULTS_NAME)
        for root in options.methods.values():
            for task in tasks:
                book.read_finetune_record(Path(root) / task.name / "finetune.json")
    reused = 0
    methods = {}
    task_entries = [{"name": t.name, "folder": str(t.folder), "kind": t.kind, "metric": t.metric,
                     "test_examples": len(test_sets[t.name])} for t in tasks]
    with tqdm(total=len(tasks) * len(options.methods), desc="eval", unit="model", disable=not options.progress) as bar:
        for label, root in options.methods.items():
            per_task = {}
            for task in tasks:
                bar.set_postfix_str(f"{label}/{task.name}")
                folder = model_for(root, task.name)
                key = score_key(folder, checksums[task.name], max_length=options.max_length,
                                batch_size=options.batch_size, device=device)
                scores = book.find(key) if options.reuse_scores else None
                if scores is not None:
                    reused += 1
                    scores["reused"] = True
                elif isinstance(task, ChatTask):
                    scores = language_model_scores(folder, test_sets[task.name], device, options,
                                                   desc=f"{label}/{task.name}")
                else:
                    model, tokenizer = load_classifier(folder, task, device)
                    scores = accuracy(model, tokenizer, test_sets[task.name], batch_size=options.batch_size,
                                      max_length=options.max_length, desc=f"{label}/{task.name}",
                                      progress=options.progress)
                    del model
                per_task[task.name] = {**scores, "key": key}
                bar.update()
            averages = metric_averages(per_task, task_entries)
            methods[label] = {"folder": str(root), "per_task": per_task, "averages": averages,
                              "average": next(iter(averages.values())) if len(averages) == 1 else None}
            log.info("eval %s: %s", label, ", ".join(f"average {m} {v:.4f}" for m, v in averages.items()))
    if options.reuse_scores:
        log.info("eval: %d of %d scores reused (those models' files are unchanged since they were scored)",
                 reused, len(tasks) * len(options.methods))
    results = {
        "format": "regmean-eval", "version": 1, "tool": f"regmean-pipeline {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "device": str(device)},
        "tasks": task_entries,
        "reference": reference, "methods": methods,
        "settings": {"batch_size": options.batch_size, "max_length": options.max_length},
        "reused_scores": reused,
    }
    with staged_directory(out, overwrite=options.overwrite) as stage:
        (stage / TABLE_NAME).write_text(format_table(results) + "\n")
        plot_scores(results, stage / CHART_NAME, title=options.title)
        results["seconds"] = time.perf_counter() - started
        write_json(stage / RESULTS_NAME, results)
    update_model_cards(results)
    return results


def update_model_cards(results: dict) -> None:
    """Each scored model whose README.md is a card of a regmean merge gets its score in that card (rewritten
    in one step); any other README.md, e.g. a fine-tuned candidate's, is left as it is."""
    updated = set()
    for method in results["methods"].values():
        for task, scores in method["per_task"].items():
            folder = model_for(method["folder"], task) or Path(method["folder"]) / task
            try:
                if record_accuracy(folder, task=task, scores=scores, key=scores["key"]):
                    updated.add(str(folder))
            except (OSError, ValueError, yaml.YAMLError) as exc:  # the scores are published; such a card stays as it was
                log.warning("%s: model card not updated (%s)", folder / "README.md",
                            (str(exc).splitlines() or [type(exc).__name__])[0])
    if updated:
        log.info("eval: accuracy recorded in the model cards of %d models", len(updated))
