"""Bad task data: a clear one-line error, or a documented skip counted in the log (real processes)."""

from __future__ import annotations

import io
import json

import pytest

from regmean_pipeline.testing import write_image_task
from tests import faults, processes
from tests.conftest import read_json

FAULT = "bad task data"


def stats(workspace, tmp_path, data, *args, kind="bert"):
    """`regmean stats` in its own process: (exit code, output, output), the shape the cli fixture returns."""
    code, output = processes.run("stats", "--model", workspace.model(kind, 1), "--dataset", data, "--out",
                                 tmp_path / "a", "--device", "cpu", "--quiet", *args, log=tmp_path / "log")
    return code, output, output


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def refused(workspace, tmp_path, data, *words, args=()):
    with faults.trial(FAULT):
        code, _, err = stats(workspace, tmp_path, data, *args)
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err
        assert "Traceback" not in err and not (tmp_path / "a").exists()


def test_empty_dataset(workspace, tmp_path):
    refused(workspace, tmp_path, write_lines(tmp_path / "blank.jsonl", [b"", b"   ", b""]), "blank.jsonl",
            "empty file")


def test_missing_column(workspace, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps({"review": "good"}).encode()] * 3)
    refused(workspace, tmp_path, data, "d.jsonl", "--text-column", "review")  # names the columns there are
    refused(workspace, tmp_path, data, "no column 'text'", args=("--text-column", "text"))


def test_invalid_utf8_line_is_named(workspace, tmp_path):
    lines = [json.dumps({"text": "good movie"}).encode(), b'{"text": "bad \xff\xfe bytes"}',
             json.dumps({"text": "fine"}).encode()]
    refused(workspace, tmp_path, write_lines(tmp_path / "d.jsonl", lines), "d.jsonl",
            "line 2 is not valid UTF-8", "0xff")


def test_invalid_json_line_is_named(workspace, tmp_path):
    lines = [json.dumps({"text": "good"}).encode()] * 3 + [b'{"text": "unterminated'] + [b'{"text": "x"}']
    refused(workspace, tmp_path, write_lines(tmp_path / "d.jsonl", lines), "d.jsonl",
            "line 4 is not valid JSON")


def test_empty_and_missing_texts_are_skipped_and_counted(workspace, tmp_path):
    rows = [{"text": "the movie was great"}] * 5 + [{"text": ""}, {"text": "   "}, {"text": None}, {"label": 1}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r).encode() for r in rows])
    with faults.trial(FAULT):
        code, _, err = stats(workspace, tmp_path, data, "--batch-size", 2)
        assert code == 0, err
        assert "4 examples skipped: empty or missing text" in err
        assert read_json(tmp_path / "a" / "manifest.json")["examples"] == 5


def test_only_empty_texts(workspace, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": t}).encode() for t in ("", " ", "\t")])
    refused(workspace, tmp_path, data, "d.jsonl", "no usable examples")


def test_texts_far_over_max_length_are_truncated_and_counted(workspace, tmp_path):
    rows = [{"text": "good " * 200_000}, {"text": "bad movie"}, {"text": "great " * 100}]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r).encode() for r in rows])
    with faults.trial(FAULT):
        code, _, err = stats(workspace, tmp_path, data, "--max-length", 16)
        assert code == 0, err
        assert "2 examples truncated to max_length tokens" in err
        manifest = read_json(tmp_path / "a" / "manifest.json")
        tokens = manifest["grams"]["bert.encoder.layer.0.attention.self.query"]["tokens"]
        assert tokens == 16 + 4 + 16  # [CLS] bad movie [SEP] untouched, the others cut to 16


@pytest.mark.parametrize("bad", [1, 12])
def test_images_that_fail_to_decode(bad, workspace, tmp_path):
    """One corrupt image is skipped and counted; a dataset of nothing but corrupt images is an error."""
    import datasets
    from PIL import Image

    good = write_image_task(tmp_path / "good", n=12, seed=1)
    rows = datasets.load_from_disk(str(good)).cast_column("image", datasets.Image(decode=False)).to_list()
    for row in rows[:bad]:
        row["image"] = {"bytes": b"\x89PNG\r\n\x1a\n-- not really a png --", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "bad"))
    if bad < len(rows):
        assert Image.open(io.BytesIO(rows[-1]["image"]["bytes"])).size == (40, 40)  # the rest are fine
    with faults.trial(FAULT):
        code, _, err = stats(workspace, tmp_path, tmp_path / "bad", "--image-column", "image", "--batch-size", 4,
                             kind="clip_vision")
        if bad < len(rows):
            assert code == 0, err
            assert f"{bad} examples skipped: image cannot be decoded" in err
            assert read_json(tmp_path / "a" / "manifest.json")["examples"] == len(rows) - bad
        else:
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert code == 2 and len(lines) == 1 and "no usable examples" in lines[0], err
