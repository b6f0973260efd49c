"""The shipped tasks load through datasets as documented, and evaluation scores what the model predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.tasks.evaluate import accuracy, predict
from regmean_pipeline.tasks.task_folder import discover_tasks, load_task
from regmean_pipeline.testing import make_model, make_tokenizer, write_classification_task

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "sentcls"


def test_shipped_tasks_load_with_their_documented_sizes_and_labels():
    tasks = discover_tasks(SHIPPED)
    assert [t.name for t in tasks] == ["cr", "mpqa", "sst2", "subj", "trec"]
    for task in tasks:
        info = json.loads((task.folder / "labels.json").read_text())
        assert list(task.label_names) == info["labels"]
        for split in ("train", "test"):
            data = task.load(split)
            assert data.column_names == ["text", "label"]
            assert len(data) == info[split], (task.name, split)
            columns = data.to_dict()
            labels = set(columns["label"])
            assert labels == set(range(task.num_labels)), (task.name, split, labels)  # every class occurs
            assert all(isinstance(text, str) for text in columns["text"])
            assert sum(not text for text in columns["text"]) <= 4  # a few empty lines, as in the source
    assert {t.name: t.num_labels for t in tasks}["trec"] == 6


def test_task_errors_name_the_file(tmp_path):
    folder = write_classification_task(tmp_path / "toy", ["no", "yes"], n_train=8, n_test=4)
    with (folder / "test.jsonl").open("a") as f:
        f.write(json.dumps({"text": "out of range", "label": 2}) + "\n")
    task = load_task(folder)
    with pytest.raises(RegMeanError, match=r"test\.jsonl: line 5: label 2"):
        task.load("test")
    (folder / "labels.json").write_text("{}")
    with pytest.raises(RegMeanError, match=r"labels\.json"):
        load_task(folder)
    with pytest.raises(RegMeanError, match="no such folder"):
        load_task(tmp_path / "missing")


def test_checksum_changes_with_the_data(tmp_path):
    folder = write_classification_task(tmp_path / "toy", ["no", "yes"], n_train=8, n_test=4)
    before = load_task(folder).checksum()
    assert load_task(folder).checksum() == before
    with (folder / "train.jsonl").open("a") as f:
        f.write(json.dumps({"text": "more", "label": 1}) + "\n")
    assert load_task(folder).checksum() != before


@pytest.fixture
def tiny_classifier(tmp_path):
    """A tiny random classifier initialised wide enough that its predictions vary from text to text."""
    return make_model("bert", seed=3, num_labels=3, initializer_range=0.5).eval(), make_tokenizer(tmp_path / "tok")


def test_predict_matches_one_at_a_time_forward_passes(tiny_classifier, tmp_path):
    """Length-sorted padded batches give each text the prediction of its own unpadded pass, in order."""
    model, tokenizer = tiny_classifier
    task = load_task(write_classification_task(tmp_path / "t", ["a", "b", "c"], n_train=4, n_test=40, seed=5))
    texts = task.load("test").to_dict()["text"]
    with torch.inference_mode():
        expected = torch.stack([model(**tokenizer(text, return_tensors="pt")).logits[0].argmax() for text in texts])
    got = predict(model, tokenizer, texts, batch_size=7, progress=False)
    assert got.tolist() == expected.tolist()
    assert len(set(got.tolist())) > 1  # a constant predictor would make this test weak


def test_accuracy_of_a_model_with_known_predictions(tiny_classifier, tmp_path):
    """A head with zero weights and a bias on label 2 predicts 2 everywhere: accuracy = share of label 2."""
    model, tokenizer = tiny_classifier
    data = load_task(write_classification_task(tmp_path / "t", ["a", "b", "c"], n_train=4, n_test=50, seed=9)).load("test")
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    labels = data.to_dict()["label"]
    result = accuracy(model, tokenizer, data, batch_size=8, progress=False)
    assert result == {"accuracy": labels.count(2) / 50, "correct": labels.count(2), "total": 50}
    assert 0 < result["correct"] < 50
