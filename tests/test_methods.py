"""The contract every registered merge method keeps, checked for each one the registry lists (a new method
is picked up with no edit here): K copies of one model come back bit for bit, and so does one model
alone, under the method's identity parameters; its model card's config block remakes the same bytes;
another method's parameters are refused by name; the CLI and config keys come from its dataclass."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from regmean_pipeline.merge.methods.base import flag_of
from regmean_pipeline.merge.methods.registry import METHODS, config_keys, parameter_index
from regmean_pipeline.testing import make_model, save_model
from tests.test_model_card import config_block

HEAD = r"classifier\..*"


@pytest.fixture(scope="module")
def family(tmp_path_factory, workspace):
    """A pretrained body, two task models moved apart from it by seeded noise, a copy of the first, and
    each one's Gram and Fisher cache and data."""
    from stages.stats import StatsOptions, run_stats

    root = tmp_path_factory.mktemp("methods")
    base = save_model(make_model("bert", seed=0, architectures=["BertModel"]), root / "base")
    models = {}
    for seed, name in enumerate(("alpha", "beta"), start=1):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.02)
        models[name] = save_model(model, root / name)
    models["alpha2"] = Path(shutil.copytree(models["alpha"], root / "alpha2"))
    data = {name: workspace.text_task(seed=1 if name.startswith("alpha") else 2, n=16) for name in models}
    for name in models:
        run_stats(StatsOptions(model=str(models[name]), dataset=str(data[name]), out=str(root / "caches" / name),
                               device="cpu", progress=False, statistics="gram,fisher", num_examples=16))
    return root, base, models, data


def inputs(method, family, names: list[str]) -> list[str]:
    """The CLI arguments that give the method its candidates and what it needs."""
    root, base, models, data = family
    needs = METHODS[method].needs
    args = []
    if needs.data:
        for name in names:
            args += ["--model", f"{name}={models[name]}", "--dataset", f"{name}={data[name]}"]
    elif needs.statistic:
        args += [arg for name in names for arg in ("--cache", root / "caches" / name)]
    else:
        args += [f"--model={name}={models[name]}" for name in names]
    if needs.pretrained:
        args += ["--pretrained", base]
    return args


def flags(params: dict) -> list[str]:
    fields = parameter_index()
    args = []
    for name, value in params.items():
        flag = flag_of(fields[name].field)
        if isinstance(value, bool):
            args.append(flag.split("/")[0 if value else 1])
        else:
            args += [flag, str(value)]
    return args


def merged(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", list(METHODS))
def test_copies_and_a_single_model_come_back_bit_for_bit(method, family, cli, tmp_path):
    _, _, models, _ = family
    own = merged(models["alpha"])
    for names in (["alpha", "alpha2"], ["alpha"]):
        out = tmp_path / "-".join(names)
        identity = METHODS[method].identity(len(names))
        code, _, err = cli("merge", "--method", method, *inputs(method, family, names), *flags(identity),
                           "--exclude", HEAD, "--out", out, "--device", "cpu")
        assert code == 0, err
        for name, tensor in merged(out).items():
            assert tensor.numpy().tobytes() == own[name].numpy().tobytes(), (method, names, name)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_cards_config_block_remakes_the_same_bytes(method, family, cli, tmp_path, monkeypatch):
    """With every parameter away from its default where it can be, so that each is shown to come back."""
    out = tmp_path / "first"
    varied = varied_params(method)
    code, _, err = cli("merge", "--method", method, *inputs(method, family, ["alpha", "beta"]), *flags(varied),
                       "--exclude", HEAD, "--out", out, "--device", "cpu")
    assert code == 0, err
    block = yaml.safe_load(config_block(out / "README.md"))
    assert block["method"] == method
    for name, value in varied.items():
        if dataclasses.fields(METHODS[method].params) and METHODS[method].fields()[name].metadata.get("record", True):
            key = next(k for k, (_, option) in config_keys().items() if option == name)
            assert block[key] == value, name
    (tmp_path / "again.yaml").write_text(config_block(out / "README.md"))
    code, _, err = cli("merge", "--config", tmp_path / "again.yaml", "--out", tmp_path / "again", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def varied_params(method: str) -> dict:
    """Some value other than the default for each recorded scalar parameter (data options excepted)."""
    varied = {}
    for name, field in METHODS[method].fields().items():
        default = field.default
        if not field.metadata.get("record", True) or field.metadata.get("panel", "").startswith("Data"):
            continue
        choices = field.metadata.get("choices")
        if choices:
            varied[name] = next(c for c in choices if c != default)
        elif isinstance(default, bool):
            varied[name] = not default
        elif isinstance(default, float):
            high = field.metadata.get("high")
            varied[name] = round(default * 0.5 if high is not None and default * 1.5 > high else default * 1.5, 6) \
                or 0.5
    if method == "regmean++":
        varied["num_examples"] = 8
    return varied


@pytest.mark.parametrize("method", list(METHODS))
def test_another_methods_parameter_is_refused_by_name(method, family, cli, tmp_path):
    index = parameter_index()
    foreign = next(name for name, info in index.items() if method not in info.owners and
                   not isinstance(info.field.default, bool) and info.field.metadata.get("choices") is None
                   and info.field.type in ("float", "int"))
    flag = flag_of(index[foreign].field)
    code, _, err = cli("merge", "--method", method, *inputs(method, family, ["alpha", "beta"]), flag, "1",
                       "--out", tmp_path / "x", "--device", "cpu")
    assert code == 2 and flag in err and f"not {method}" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_every_parameter_has_a_flag_and_a_config_key():
    keys = config_keys()
    options = {option for _, option in keys.values()}
    for method in METHODS.values():
        for name, field in method.fields().items():
            assert name in options, (method.name, name)
            assert field.metadata.get("help"), (method.name, name)
    from typer.testing import CliRunner

    from stages.cli import app

    shown = CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "300"}).stdout
    for info in parameter_index().values():
        assert flag_of(info.field).split("/")[0] in shown
    for name in METHODS:
        assert name in shown
