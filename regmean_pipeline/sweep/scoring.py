"""A merge's scores on the tasks' validation splits: each classification task by its own candidate's head on
the merged body (put together in memory, as ``--per-candidate`` would write it), each chat task by the
merged language model's response loss."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.weights import open_weights
from regmean_pipeline.measure.chat import check_messages
from regmean_pipeline.measure.lm_loss import response_loss
from regmean_pipeline.measure.models import load_model, load_preprocessor
from regmean_pipeline.tasks.evaluate import accuracy, load_classifier
from regmean_pipeline.tasks.task_folder import VALIDATION, ChatTask, Task

log = logging.getLogger(__name__)


def rows_of(task: Task, split: str):
    if isinstance(task, ChatTask):
        path = task.split_file(split)
        return [check_messages(value, f"{path}: line {number}") for number, value in enumerate(task.load(split), 1)]
    return task.load(split)


def with_merged_body(model: torch.nn.Module, merged: Path, excluded: Callable[[str], bool]) -> torch.nn.Module:
    """The candidate's model with every merged (not excluded) parameter taken from the merge's folder."""
    weights = open_weights(merged)
    own = model.state_dict()
    state = {name: weights.get(name) for name in weights.names() if not excluded(name) and name in own}
    model.load_state_dict(state, strict=False)
    return model


def score(task: Task, rows, *, model_folder: Path, merged: Path | None, excluded: Callable[[str], bool],
          device: torch.device, batch_size: int, max_length: int, progress: bool, desc: str) -> dict:
    """A model's scores on one task's rows: ``model_folder`` (a candidate) alone, or with ``merged``'s body;
    for a chat task the merged model itself (``merged``, else the candidate)."""
    if isinstance(task, ChatTask):
        folder = merged or model_folder
        model = load_model(folder, dtype=torch.float32, device=device)
        if not type(model).__name__.endswith("ForCausalLM"):
            raise RegMeanError(f"{folder}: {type(model).__name__} is not a causal language model; chat tasks score "
                               "those")
        return response_loss(model, load_preprocessor(folder, images=False), rows, batch_size=batch_size,
                             max_length=max_length, desc=desc, progress=progress)
    model, tokenizer = load_classifier(model_folder, task, device)
    if merged is not None:
        with_merged_body(model, merged, excluded)
    return accuracy(model, tokenizer, rows, batch_size=batch_size, max_length=max_length, desc=desc,
                    progress=progress)


def validation_rows(tasks: list[Task]) -> dict:
    return {task.name: rows_of(task, VALIDATION) for task in tasks}
