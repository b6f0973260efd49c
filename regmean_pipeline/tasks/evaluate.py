"""Accuracy of a sequence classifier on a labelled split.

Texts are run in order of length (so batches pad little, which matters on a CPU) and the
predictions are put back in the data's order.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from regmean_pipeline.errors import RegMeanError


@torch.inference_mode()
def predict(model: torch.nn.Module, tokenizer, texts: list[str], *, batch_size: int = 64, max_length: int = 64,
            desc: str = "predict", progress: bool = True) -> torch.Tensor:
    """The arg-max label of every text, in the order given."""
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    predictions = torch.empty(len(texts), dtype=torch.long)
    with tqdm(total=len(texts), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            encoded = tokenizer([texts[i] for i in batch], padding="longest", truncation=True,
                                max_length=max_length, return_tensors="pt").to(device)
            predictions[batch] = model(**encoded).logits.argmax(-1).cpu()
            bar.update(len(batch))
    return predictions


def accuracy(model: torch.nn.Module, tokenizer, data, **kwargs) -> dict:
    """{'accuracy', 'correct', 'total'} of the model on a dataset with 'text' and 'label' columns."""
    columns = data.to_dict()
    predicted = predict(model, tokenizer, columns["text"], **kwargs)
    correct = int((predicted == torch.tensor(columns["label"])).sum())
    return {"accuracy": correct / len(data), "correct": correct, "total": len(data)}


def load_classifier(folder: Path, task, device: torch.device):
    """A complete model folder, through AutoModelForSequenceClassification, checked against the task's labels."""
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise RegMeanError(f"{folder}: cannot load as a sequence classifier ({str(exc).splitlines()[0]})") from None
    if model.config.num_labels != task.num_labels:
        raise RegMeanError(f"{folder}: has {model.config.num_labels} labels but task {task.name} ({task.folder}) has "
                           f"{task.num_labels}")
    return model.to(device).eval(), tokenizer
