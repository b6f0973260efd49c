"""Untrusted files: no pickle, no remote code, no path out of a folder, no allocation a file asks for."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from regmean_pipeline.cache.manifest import MAX_DIM
from regmean_pipeline.cache.store import StatsCache
from regmean_pipeline.cache.symmetric import packed_length
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.weights import SafetensorsCheckpoint
from tests import faults, processes
from tests.conftest import read_every_gram as read_all

ROOT = Path(__file__).resolve().parents[1]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# --- no pickle in the source -------------------------------------------------------------------

def pickle_risks(source: str, where: str) -> list[str]:
    """Ways a source file could unpickle or run a model's code: imports of pickle modules,
    torch.load without weights_only=True, numpy.load(allow_pickle=True), read_pickle,
    trust_remote_code=True hard-coded."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}:{node.lineno}: from {node.module} import")
            if node.module.split(".")[0] == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}:{node.lineno}: from {node.module} import load")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            base = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            true = lambda key: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True  # noqa: E731
            if name == "load" and base.split(".")[0] == "torch" and not true("weights_only"):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if name == "load" and base in ("np", "numpy") and true("allow_pickle"):
                found.append(f"{where}:{node.lineno}: numpy.load(allow_pickle=True)")
            if name in ("read_pickle", "loads") and base in PICKLE_MODULES | {"pd", "pandas"}:
                found.append(f"{where}:{node.lineno}: {base}.{name}")
            if true("trust_remote_code"):
                found.append(f"{where}:{node.lineno}: trust_remote_code=True hard-coded")
    return found


def project_sources() -> list[Path]:
    skip = {"tests", "build", "dist"}
    return [p for p in ROOT.rglob("*.py")
            if not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                       for part in p.relative_to(ROOT).parts[:-1])]


def test_the_scanner_catches_each_risk():
    risky = {
        "import pickle": 1, "import dill as d": 1, "from joblib import load": 1, "from torch import load": 1,
        "torch.load(f)": 1, "torch.load(f, weights_only=False)": 1, "torch.serialization.load(f)": 1,
        "numpy.load(f, allow_pickle=True)": 1, "pd.read_pickle(f)": 1, "pickle.loads(b)": 2,
        "AutoModel.from_pretrained(p, trust_remote_code=True)": 1,
        "torch.load(f, weights_only=True)": 0, "np.load(f)": 0, "json.loads(s)": 0,
        "AutoModel.from_pretrained(p, trust_remote_code=trust)": 0,
    }
    for source, expected in risky.items():
        if source == "pickle.loads(b)":
            source = "import pickle\npickle.loads(b)"
        assert len(pickle_risks(source, "x.py")) == expected, source


def test_no_pickle_and_no_hard_coded_remote_code_in_the_source():
    sources = project_sources()
    assert any(p.name == "weights.py" for p in sources) and any(p.parent.name == "stages" for p in sources)
    risks = [risk for path in sources for risk in pickle_risks(path.read_text(), str(path.relative_to(ROOT)))]
    assert risks == []


# --- pickle checkpoints ---------------------------------------------------------------------

class RunsCode:
    """Unpickling this calls os.system: what a hostile pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def pickle_only_model(workspace, tmp_path) -> Path:
    folder = tmp_path / "bin-model"
    shutil.copytree(workspace.model("bert", 1), folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_only_checkpoint_needs_allow_pickle(pickle_only_model, workspace, cli, tmp_path):
    args = ("stats", "--model", pickle_only_model, "--dataset", workspace.text_task(1), "--device", "cpu")
    code, _, err = cli(*args, "--out", tmp_path / "a")
    assert code == 2 and "only pickle weights" in err and "--allow-pickle" in err
    assert not (tmp_path / "a").exists()
    code, _, err = cli(*args, "--out", tmp_path / "b", "--allow-pickle")
    assert code == 0, err  # weights only: tensors, through torch.load(weights_only=True)


def test_hostile_pickle_is_refused_even_with_allow_pickle(pickle_only_model, workspace, cli, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"weight": RunsCode(marker)}, pickle_only_model / "pytorch_model.bin")
    with faults.trial("hostile file (pickle, remote code, path escape, huge array)"):
        code, _, err = cli("stats", "--model", pickle_only_model, "--dataset", workspace.text_task(1),
                           "--out", tmp_path / "a", "--allow-pickle")
        assert code == 2 and "pytorch_model.bin" in err and "weights_only" in err, err
        assert not marker.exists()
        with pytest.raises(pickle.UnpicklingError):  # the same file, the same guard, straight from torch
            torch.load(pickle_only_model / "pytorch_model.bin", weights_only=True)
        assert not marker.exists()


def test_remote_code_stays_off_unless_asked(workspace, cli, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = folder / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-model", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"}}))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    with faults.trial("hostile file (pickle, remote code, path escape, huge array)"):
        code, _, err = cli("stats", "--model", folder, "--dataset", workspace.text_task(1), "--out", tmp_path / "a")
        assert code == 2 and "--trust-remote-code" in err
        assert not marker.exists()


# --- paths that leave their folder ------------------------------------------------------------

@pytest.fixture
def caches(bert_caches) -> dict[str, Path]:
    return bert_caches


def rename_gram(cache: Path, new: str) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    old = next(iter(manifest["grams"]))
    manifest["grams"][new] = manifest["grams"].pop(old)
    for layer in manifest["layers"].values():
        if layer["gram"] == old:
            layer["gram"] = new
    (cache / "manifest.json").write_text(json.dumps(manifest))


def escape_gram_key(cache, outside):
    rename_gram(cache, "../../outside")
    return "invalid name"


def absolute_gram_key(cache, outside):
    rename_gram(cache, str(outside / "x"))
    return "invalid name"


def escape_layer_name(cache, outside):
    manifest = json.loads((cache / "manifest.json").read_text())
    name = next(iter(manifest["layers"]))
    manifest["layers"]["../" + name] = manifest["layers"].pop(name)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return "invalid name"


def gram_file_linked_outside(cache, outside):
    file = cache / ("grams.zarr" if (cache / "grams.zarr").exists() else "grams.safetensors")
    shutil.move(file, outside / file.name)
    file.symlink_to(outside / file.name)
    return "leads outside"


def zarr_array_linked_outside(cache, outside):
    key = next(iter(json.loads((cache / "manifest.json").read_text())["grams"]))
    shutil.move(cache / "grams.zarr" / key, outside / "array")
    (cache / "grams.zarr" / key).symlink_to(outside / "array")
    return "leads outside"


def zarr_chunk_linked_outside(cache, outside):
    key = next(iter(json.loads((cache / "manifest.json").read_text())["grams"]))
    chunk = cache / "grams.zarr" / key / "c" / "0"
    shutil.move(chunk, outside / "chunk")
    chunk.symlink_to(outside / "chunk")
    return "is a link"


ESCAPES = [("zarr", escape_gram_key), ("safetensors", absolute_gram_key), ("zarr", escape_layer_name),
           ("zarr", gram_file_linked_outside), ("safetensors", gram_file_linked_outside),
           ("zarr", zarr_array_linked_outside), ("zarr", zarr_chunk_linked_outside)]


@pytest.mark.parametrize("fmt, escape", ESCAPES, ids=[f"{f}-{e.__name__}" for f, e in ESCAPES])
def test_names_and_links_in_a_cache_cannot_leave_it(fmt, escape, caches, tmp_path):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    shutil.copytree(caches[fmt], cache)
    outside.mkdir()
    with faults.trial("hostile file (pickle, remote code, path escape, huge array)"):
        words = escape(cache, outside)
        with pytest.raises(RegMeanError, match=words):
            read_all(cache)


def test_shard_index_entries_cannot_leave_the_model_folder(workspace, tmp_path):
    source = workspace.model("bert", 1)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(source / "model.safetensors", outside)
    names = list(load_file(str(outside)))
    for entry, words in (("../outside.safetensors", "not a name inside"), (str(outside), "not a name inside"),
                         ("linked.safetensors", "leads outside")):
        folder = tmp_path / "model"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        if entry == "linked.safetensors":
            (folder / entry).symlink_to(outside)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: entry for n in names}}))
        with faults.trial("hostile file (pickle, remote code, path escape, huge array)"):
            with pytest.raises(RegMeanError, match=words):
                SafetensorsCheckpoint(folder)


def test_hub_snapshot_links_into_blobs_are_allowed(workspace, tmp_path):
    """The hub cache keeps files in blobs/ and links them from snapshots/REV/: that is not an escape."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(workspace.model("bert", 1) / "model.safetensors", repo / "blobs" / "0f0f")
    (snapshot / "model.safetensors").symlink_to(Path("..", "..", "blobs", "0f0f"))
    names = list(load_file(str(repo / "blobs" / "0f0f")))
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model.safetensors" for n in names}}))
    assert sorted(SafetensorsCheckpoint(snapshot).names()) == sorted(names)


def test_candidate_names_are_plain_names(workspace, caches, cli, tmp_path):
    code, _, err = cli("merge", "--cache", caches["zarr"] / "grams.zarr" / "..", "--out", tmp_path / "m")
    assert code == 2 and "candidate name '..'" in err, err
    from regmean_pipeline import RegMean
    from regmean_pipeline.testing import make_model

    with pytest.raises(RegMeanError, match="plain name"):
        RegMean(num_regmean_examples=2, batch_size=2).run({"../x": make_model("bert", 1)}, {"../x": [
            {"input_ids": torch.tensor([[2, 9, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}]})


# --- a file cannot make us allocate what it asks for ----------------------------------------

def hostile_huge_gram(folder: Path) -> None:
    """A cache whose manifest and zarr metadata agree on a MAX_DIM Gram (128 GiB) that is not on disk."""
    import zarr

    key = "huge"
    group = zarr.open_group(str(folder / "grams.zarr"), mode="w")
    group.create_array(key, shape=(packed_length(MAX_DIM),), dtype="float32", chunks=(1 << 23,), compressors=None,
                       fill_value=0)
    manifest = {
        "format": "regmean-stats", "version": 1, "model": {"reference": "x", "architecture": "X", "fingerprint": "f"},
        "dataset": {}, "examples": 1, "include_padding": False, "accumulate_dtype": "float32", "forward_dtype": "float32",
        "storage": "zarr", "layout": "packed-upper",
        "layers": {key: {"gram": key, "weight": "w", "in_features": MAX_DIM, "out_features": 1, "transposed": False}},
        "grams": {key: {"dim": MAX_DIM, "tokens": 1, "checksum": "sha256:" + "0" * 64}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def read_gram(folder: str, key: str) -> None:
    StatsCache(folder).read_packed(key)


def test_hostile_manifest_cannot_make_us_allocate(tmp_path):
    """Run in a child with 2 GiB of address space to spare: a 128 GiB allocation would fail there
    with MemoryError; the cache is refused before anything that large is allocated."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    hostile_huge_gram(folder)
    with faults.trial("hostile file (pickle, remote code, path escape, huge array)"):
        code, output = processes.call("tests.test_untrusted:read_gram", str(folder), "huge", log=tmp_path / "log",
                                      memory_headroom=2 << 30)
        assert code == 2 and "chunk files on disk" in output and "gram huge" in output, output
    # The same limit does stop a real allocation of that size, so the check above means something.
    code, output = processes.call("numpy:ones", packed_length(MAX_DIM), log=tmp_path / "log2", memory_headroom=2 << 30)
    assert code == 3 and "MemoryError" in output


def test_manifest_dims_must_match_the_weights_before_any_gram_is_read(caches, workspace, cli, tmp_path):
    """A manifest cannot ask for Grams larger than the model's layers: the plan refuses it first."""
    cache = tmp_path / "a"
    shutil.copytree(caches["safetensors"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    name, layer = next(iter(manifest["layers"].items()))
    for entry in manifest["layers"].values():
        if entry["gram"] == layer["gram"]:
            entry["in_features"] = 4096
    manifest["grams"][layer["gram"]]["dim"] = 4096
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with faults.trial("hostile file (pickle, remote code, path escape, huge array)"):
        code, _, err = cli("merge", "--cache", cache, "--out", tmp_path / "m", "--device", "cpu")
        assert code == 2 and name in err and "does not match the Gram's layer" in err, err
