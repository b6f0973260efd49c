"""One GPU session: every GPU check of the project in one run, with one output folder.

    python -m bench.gpu_session OUT            # on the GPU machine (well under 8 minutes on one H200)
    python -m bench.gpu_session OUT --small    # tiny sizes: the whole thing on a CPU in about 2 minutes
    make gpu-check                             # the same, OUT=outputs/gpu-session (GPU_ARGS=--small on a CPU)
    python -m bench.gpu_session --fetch-wheels # once, where pip works: the packages the GPU machine lacks -> .whl/

First it installs the wheels in .whl/ that this Python lacks (the GPU machine has no package index; `make
gpu-wheels` fetches them), then checks the environment, printing one line per missing package or feature
(exit 3 when a required one is missing), and prints the device. Then it runs each part in its own process,
with a time budget and under one deadline, continuing after a part fails or runs out of time:

  gpu_check    tests/gpu_check.py: stats with a device map across GPU and CPU and with device_map=auto, a
               merge solved on the GPU (each against the CPU), nccl data-parallel stats and the layer-parallel
               merge when there are two GPUs
  plusplus     `regmean merge --method regmean++` on a Llama (causal LM), on the GPU and on the CPU, compared
  methods      `regmean stats --statistics gram,fisher` (the Fisher's per-example gradients: torch.func vmap)
               on the GPU and on the CPU, compared; then `regmean merge --method ties|dare|fisher|regmean`
  reliability  tests/gpu_reliability_check.py: stats SIGKILLed and resumed on the GPU, a float16 overflow
               named by layer, singular systems merged on the GPU to the least-squares optimum
  bench_gpu    `python -m bench.gpu` at full size (a 1.1B Llama: stats and Gram rates, merge, batched solves)
  sweep        optional: `regmean sweep --help`, once stages/sweep.py exists (skipped before)

CUDA-only checks say "skipped: no CUDA device" on a CPU. The GPU machine's Python has neither zarr nor
datasets: every cache here is safetensors and nothing imports zarr; without datasets (wheels not carried, or
not working there) the parts that read data files through the CLI fall back to tokenized in-memory batches
(plusplus, the Fisher of methods) or are skipped (reliability, the fisher and regmean merges).

OUT gets four files (the device tool brings back at most eight): summary.md (environment, device, one row per
part with its status, each part's figures and tables, the log tail of each failure), session.json, session.log
(what this printed) and parts.tar.gz (every part's log and result files). Exit status: 0 when every part that
ran passed, 1 when one failed or timed out, 3 when a required package is missing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the code paths of the session import: missing one of these stops the session before any part runs.
REQUIRED = ("torch", "transformers", "safetensors", "accelerate", "tokenizers", "typer", "tqdm", "numpy", "yaml",
            "jinja2", "huggingface_hub", "fsspec", "filelock")
# Missing one of these changes what runs; each says what.
OPTIONAL = {
    "datasets": "the CLI cannot read data files: reliability and the fisher/regmean merges are skipped, plusplus "
                "and the Fisher run on in-memory batches (bring it: `make gpu-wheels`, carry .whl)",
    "zarr": "not needed here (every cache is safetensors); only `regmean stats --format zarr` needs it",
    "pytest": "reliability reuses the test suite's helpers: skipped",
}
# The GPU machine lacks these (datasets needs the other two; pyarrow, pandas, xxhash, aiohttp are there).
WHEELS = ("datasets", "dill", "multiprocess")
GPU_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")
WHEEL_DIR = ROOT / ".whl"
WHEEL_SITE = Path(tempfile.gettempdir()) / "regmean-gpu-session-site"
MAX_LOG_BYTES = 2 << 20  # a part's log beyond this keeps its head and tail in the archive
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "TQDM_MININTERVAL": "5"}


# ---------------------------------------------------------------------------------------------------------------
# Environment


@dataclass
class Environment:
    lines: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    missing_required: list[str] = field(default_factory=list)
    missing_optional: dict[str, str] = field(default_factory=dict)
    cuda: bool = False
    gpus: int = 0
    device: str = "cpu"
    device_line: str = ""

    def has(self, name: str) -> bool:
        return name not in self.missing_optional and name not in self.missing_required


def _reason(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:200]


def _import(name: str) -> tuple[object | None, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a package that breaks while importing
        return None, _reason(exc)


def _version(module: object, name: str) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
    return str(version)


def _datasets_works() -> str | None:
    """Why datasets cannot load a JSON Lines file as `regmean stats` does (None: it can)."""
    try:
        import datasets

        datasets.disable_progress_bars()
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "probe.jsonl"
            path.write_text('{"text": "a b"}\n{"text": "c"}\n')
            loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=f"{scratch}/cache")
            if len(loaded) != 2:
                return f"loaded {len(loaded)} rows of 2"
    except Exception as exc:
        return _reason(exc)
    return None


def check_environment(device: str | None) -> Environment:
    env = Environment()
    for name in REQUIRED:
        module, why = _import(name)
        if module is None:
            env.missing_required.append(name)
            env.lines.append(f"env: MISSING (required) {name}: {why}")
        else:
            env.versions[name] = _version(module, name)
    for name, consequence in OPTIONAL.items():
        module, why = _import(name)
        if module is None:
            env.missing_optional[name] = why
            env.lines.append(f"env: missing {name} ({why}): {consequence}")
            continue
        env.versions[name] = _version(module, name)
        if name == "datasets" and (why := _datasets_works()) is not None:
            env.missing_optional[name] = f"imports but cannot load a JSON Lines file ({why})"
            env.lines.append(f"env: missing datasets (it imports but cannot load a JSON Lines file: {why}): "
                             f"{consequence}")
    if "torch" in env.missing_required:
        env.device_line = "device: unknown (no torch)"
        return env
    import torch

    env.cuda = torch.cuda.is_available()
    env.gpus = torch.cuda.device_count() if env.cuda else 0
    env.device = device or ("cuda" if env.cuda else "cpu")
    if not env.cuda:
        env.lines.append("env: no CUDA device: the CUDA-only checks are skipped (the rest runs on the CPU)")
        if env.device.startswith("cuda"):
            env.missing_required.append("cuda")
            env.lines.append(f"env: MISSING (required) CUDA: --device {env.device} asked for it")
    else:
        import torch.distributed

        try:  # the device works, not only shows up
            probe = torch.ones(64, 64, device="cuda")
            torch.cuda.synchronize()
            assert float((probe @ probe)[0, 0]) == 64.0
        except Exception as exc:
            env.missing_required.append("cuda")
            env.lines.append(f"env: MISSING (required) a working CUDA device: {_reason(exc)}")
        if env.gpus < 2:
            env.lines.append(f"env: {env.gpus} GPU: the nccl checks (data-parallel stats, layer-parallel merge) "
                             "need two; skipped")
        elif not torch.distributed.is_nccl_available():
            env.lines.append("env: no nccl in this torch: the nccl checks will fail")
        if not torch.cuda.is_bf16_supported():
            env.lines.append("env: no bfloat16 on this GPU: bench_gpu's bf16 forward will fail")
    if not (hasattr(torch, "func") and hasattr(torch.func, "vmap")):
        env.missing_required.append("torch.func")
        env.lines.append(f"env: MISSING (required) torch.func.vmap (the per-example Fisher); torch {torch.__version__}")
    env.device_line = device_line(torch)
    if not env.missing_required and not env.missing_optional:
        env.lines.insert(0, "env: every package is there")
    return env


def device_line(torch) -> str:
    cpus = os.cpu_count()
    if not torch.cuda.is_available():
        return f"device: cpu (no CUDA device), {cpus} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    names = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        names.append(f"cuda:{index} {properties.name} ({properties.total_memory / 2**30:.0f} GiB, "
                     f"{properties.multi_processor_count} SMs, cc {properties.major}.{properties.minor})")
    return (f"device: {'; '.join(names)}; CUDA {torch.version.cuda}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {cpus} CPUs")


# ---------------------------------------------------------------------------------------------------------------
# Wheels: fetched where pip works, installed on the GPU machine


def _exclude_file() -> Path | None:
    try:
        found = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return (ROOT / found).resolve()
    except (OSError, subprocess.CalledProcessError):
        return ROOT / ".git" / "info" / "exclude" if (ROOT / ".git").is_dir() else None


def fetch_wheels(folder: Path = WHEEL_DIR) -> int:
    """Download the wheels of WHEELS (this environment's versions) for the GPU machine's Python, and keep the
    folder out of git (.git/info/exclude), so that it travels only when a run names it in carry."""
    exclude = _exclude_file()
    if exclude is not None and folder.resolve().parent == ROOT:
        line = f"/{folder.name}/"
        text = exclude.read_text() if exclude.exists() else ""
        if line not in text.splitlines():
            exclude.parent.mkdir(parents=True, exist_ok=True)
            exclude.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")
            print(f"added {line} to {exclude}")
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", GPU_PYTHON, "--implementation", "cp",
               *[arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)], "-d", str(folder), *pins]
    print(" ".join(command))
    code = subprocess.run(command).returncode
    wheels = sorted(folder.glob("*.whl"))
    print(f"{folder}: {', '.join(w.name for w in wheels)} ({sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB)")
    return code


def _distribution(wheel: Path) -> str:
    return wheel.name.split("-")[0]


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_wheels(folder: Path | None = None, site: Path | None = None) -> list[str]:
    """pip install --no-index the wheels in ``folder`` whose package this Python lacks, into ``site`` (put first
    on sys.path here and on PYTHONPATH for the parts). Returns the lines to print."""
    folder, site = folder or WHEEL_DIR, site or WHEEL_SITE
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    needed = [w for w in wheels if not _installed(_distribution(w))]
    if site.is_dir() and str(site) not in sys.path and any(site.iterdir()):
        sys.path.insert(0, str(site))  # installed by an earlier session on this machine
    if not needed:
        return [f"wheels: {len(wheels)} in {folder}, none needed"] if wheels else []
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", str(site), *map(str, needed)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return [f"wheels: pip install of {', '.join(w.name for w in needed)} failed: "
                f"{(result.stderr.strip().splitlines() or ['?'])[-1]}"]
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return [f"wheels: installed {', '.join(w.name for w in needed)} into {site}"]


# ---------------------------------------------------------------------------------------------------------------
# The parts that run in this module (each in its own process: python -m bench.gpu_session --part NAME ...)


def relative(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cli(*args) -> None:
    """One `regmean` command, run in this process through the typer app (parsing, checks, logging: the real
    command). Raises when it exits non-zero."""
    from stages.cli import app

    argv = [str(a) for a in args]
    print(f"$ regmean {' '.join(argv)}", flush=True)
    code = app(argv, prog_name="regmean", standalone_mode=False)
    if code not in (None, 0):
        raise RuntimeError(f"regmean {argv[0]} exited {code} (its error is in the log above)")


def timed_cli(*args) -> float:
    import torch

    started = time.perf_counter()
    cli(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(time.perf_counter() - started, 2)


def load_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise RuntimeError(f"{folder}: no safetensors written")
    return tensors


def all_finite(tensors: dict) -> bool:
    import torch

    return all(bool(torch.isfinite(t.float()).all()) for t in tensors.values() if t.is_floating_point())


def family(root: Path, kind: str, overrides: dict, names: list[str], examples: int) -> tuple[Path, dict, dict]:
    """A base model, one seeded perturbation of it per name (stand-in fine-tunes), and each one's text data."""
    import torch

    from regmean_pipeline.testing import make_model, save_model, write_text_task

    base = make_model(kind, seed=0, **overrides)
    base_folder = save_model(base, root / "models" / "base")
    models, data = {}, {}
    for seed, name in enumerate(names, start=1):
        candidate = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in candidate.parameters():
                if parameter.numel() > 1:
                    parameter.add_(0.02 * parameter.std() * torch.randn(parameter.shape, generator=generator))
        models[name] = save_model(candidate, root / "models" / name)
        data[name] = write_text_task(root / "data" / f"{name}.jsonl", n=examples, seed=seed)
    return base_folder, models, data


def tokenized(folder: Path, data: Path, examples: int, batch_size: int) -> list[dict]:
    """The data file's texts as model-ready batches, without datasets."""
    from regmean_pipeline.measure.models import load_preprocessor

    texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()][:examples]
    tokenizer = load_preprocessor(folder, images=False)
    return [dict(tokenizer(texts[i:i + batch_size], padding="longest", truncation=True, max_length=64,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


# Sizes: (model overrides, examples). Full: big enough that the GPU does real work, small enough for a CPU
# reference on the GPU machine's 16 cores in seconds.
MEDIUM = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4}


def part_plusplus(folder: Path, device: str, small: bool, in_memory: bool) -> dict:
    """RegMean++ on `device` and on the CPU, the merged weights compared."""
    import torch

    examples = 24 if small else 128
    names = ["alpha", "beta"]
    _, models, data = family(folder, "llama_causal", {} if small else MEDIUM, names, examples)
    devices = [device] + (["cpu"] if device != "cpu" else [])
    result: dict = {"path": "in-memory batches (no datasets)" if in_memory else "regmean merge --method regmean++",
                    "examples": examples, "merge_seconds": {}}
    merged = {}
    for where in devices:
        started = time.perf_counter()
        if in_memory:
            merged[where] = blockwise_in_memory(models, data, examples, where)
        else:
            out = folder / f"merged_{where.replace(':', '')}"
            cli("merge", "--method", "regmean++",
                *[a for n in names for a in ("--model", f"{n}={models[n]}", "--dataset", f"{n}={data[n]}")],
                "--num-examples", examples, "--batch-size", 16, "--max-length", 64, "--device", where, "--out", out,
                "--overwrite")
            merged[where] = load_folder(out)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result["merge_seconds"][where] = round(time.perf_counter() - started, 2)
    first = merged[device]
    result["tensors"] = len(first)
    result["finite"] = all_finite(first)
    result["moved_from_alpha"] = max(relative(first[k], t) for k, t in load_folder(models["alpha"]).items()
                                     if k in first and t.is_floating_point())
    ok = result["finite"] and result["moved_from_alpha"] > 0
    if device != "cpu":
        result["gpu_vs_cpu"] = max(relative(first[k], merged["cpu"][k]) for k in merged["cpu"])
        ok &= set(first) == set(merged["cpu"]) and result["gpu_vs_cpu"] < 1e-3
    else:
        result["gpu_vs_cpu"] = "skipped: no CUDA device"
    result["ok"] = bool(ok)
    return result


def blockwise_in_memory(models: dict, data: dict, examples: int, device: str) -> dict:
    """RegMean++ through its runner, on tokenized batches (what regmean_pipeline.api does, without datasets)."""
    import torch
    import transformers

    from regmean_pipeline.io.weights import StateDictWeights
    from regmean_pipeline.merge.plan import MergeSettings, SolveSettings
    from regmean_pipeline.plusplus.runner import BlockwiseCandidate, BlockwiseMerge, BlockwiseSettings

    candidates = []
    for name, folder in models.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        candidates.append(BlockwiseCandidate(name, model.config,
                                             StateDictWeights({k: v.detach() for k, v in model.state_dict().items()}),
                                             1.0, tokenized(folder, data[name], examples, 16)))
    settings = BlockwiseSettings(MergeSettings([], solve=SolveSettings(), statistic=None, method="regmean++"),
                                 torch.float32, torch.float32, False, 4 << 30)
    state: dict = {}
    BlockwiseMerge(candidates, settings, device=torch.device(device), progress=False).run(state.__setitem__)
    return {k: v.detach().cpu() for k, v in state.items()}


def part_methods(folder: Path, device: str, small: bool, in_memory: bool) -> dict:
    """Gram and Fisher statistics on `device` vs the CPU, then the merges of the methods built on them."""
    import torch

    examples = 16 if small else 32  # the CPU reference's per-example Fisher is what takes time
    names = ["alpha", "beta"]
    base, models, data = family(folder, "llama", {} if small else MEDIUM, names, examples)
    devices = [device] + (["cpu"] if device != "cpu" else [])
    result: dict = {"examples": examples, "stats_seconds": {}, "merge_seconds": {}}
    if in_memory:
        result["stats"] = "in-memory batches (no datasets): Fisher and Grams compared, no caches written"
        stats = {where: fisher_in_memory(models, data, examples, where, result) for where in devices}
        ok = True
        if device != "cpu":
            result["fisher_gpu_vs_cpu"] = max(relative(stats[device][0][k], stats["cpu"][0][k]) for k in stats["cpu"][0])
            result["gram_gpu_vs_cpu"] = max(relative(stats[device][1][k], stats["cpu"][1][k]) for k in stats["cpu"][1])
            ok &= result["fisher_gpu_vs_cpu"] < 1e-3 and result["gram_gpu_vs_cpu"] < 1e-4
    else:
        pairs = [a for n in names for a in ("--model", f"{n}={models[n]}", "--dataset", f"{n}={data[n]}")]
        for where in devices:
            result["stats_seconds"][where] = timed_cli(
                "stats", *pairs, "--statistics", "gram,fisher", "--format", "safetensors", "--num-examples", examples,
                "--batch-size", 8, "--max-length", 64, "--device", where, "--out", folder / f"caches_{where.replace(':', '')}",
                "--overwrite")
        ok = True
        if device != "cpu":
            result.update(compare_caches(folder / f"caches_{device.replace(':', '')}", folder / "caches_cpu", names))
            ok &= result["fisher_gpu_vs_cpu"] < 1e-3 and result["gram_gpu_vs_cpu"] < 1e-4
    caches = folder / f"caches_{device.replace(':', '')}"
    head = r"score\..*"
    merges = {"ties": [f"--model={n}={models[n]}" for n in names] + ["--pretrained", base],
              "dare": [f"--model={n}={models[n]}" for n in names] + ["--pretrained", base],
              "fisher": [a for n in names for a in ("--cache", caches / n)],
              "regmean": [a for n in names for a in ("--cache", caches / n)]}
    for method, args in merges.items():
        if in_memory and method in ("fisher", "regmean"):
            result[method] = "skipped: needs the caches `regmean stats` writes (no datasets)"
            continue
        out = folder / f"merged_{method}"
        result["merge_seconds"][method] = timed_cli("merge", "--method", method, *args, "--exclude", head,
                                                    "--device", device, "--out", out, "--overwrite")
        tensors = load_folder(out)
        alpha = load_folder(models["alpha"])
        result[method] = {"finite": all_finite(tensors), "tensors": len(tensors),
                          "moved_from_alpha": max(relative(tensors[k], alpha[k]) for k in tensors
                                                  if tensors[k].is_floating_point() and not re.match(head, k))}
        ok &= result[method]["finite"] and result[method]["tensors"] == len(alpha)
    if device == "cpu":
        result["gpu_vs_cpu"] = "skipped: no CUDA device"
    result["ok"] = bool(ok)
    if torch.cuda.is_available():
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def compare_caches(gpu: Path, cpu: Path, names: list[str]) -> dict:
    from regmean_pipeline.cache.store import StatsCache

    fisher, gram = 0.0, 0.0
    for name in names:
        ours, theirs = StatsCache(gpu / name), StatsCache(cpu / name)
        if set(ours.manifest.fisher) != set(theirs.manifest.fisher) or set(ours.manifest.grams) != set(theirs.manifest.grams):
            raise RuntimeError(f"{name}: the GPU and CPU caches hold different tensors")
        for key in theirs.manifest.fisher:
            fisher = max(fisher, relative(ours.read("fisher", key), theirs.read("fisher", key)))
        for key in theirs.manifest.grams:
            gram = max(gram, relative(ours.read_packed(key), theirs.read_packed(key)))
    return {"fisher_gpu_vs_cpu": fisher, "gram_gpu_vs_cpu": gram, "fisher_tensors": len(theirs.manifest.fisher)}


def fisher_in_memory(models: dict, data: dict, examples: int, device: str, result: dict) -> tuple[dict, dict]:
    """Each candidate's per-example Fisher (torch.func vmap) and Grams on ``device``, from tokenized batches."""
    import torch
    import transformers

    from regmean_pipeline.measure.fisher import FisherAccumulator
    from regmean_pipeline.measure.gram import collect_grams

    fisher, grams = {}, {}
    started = time.perf_counter()
    for name, folder in models.items():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
        model = model.to(device).eval()
        batches = tokenized(folder, data[name], examples, 8)
        accumulator = FisherAccumulator(model)
        for batch in batches:
            accumulator.add({k: v.to(device) for k, v in batch.items()})
        fisher.update({f"{name}/{k}": v.cpu() for k, v in accumulator.result().sums.items()})
        grams.update({f"{name}/{k}": v.cpu() for k, v in collect_grams(model, batches, device=device).sums.items()})
    result["stats_seconds"][device] = round(time.perf_counter() - started, 2)
    return fisher, grams


PART_FUNCTIONS = {"plusplus": part_plusplus, "methods": part_methods}


def run_part_here(name: str, folder: Path, device: str, small: bool, in_memory: bool) -> int:
    """Child process: one part of this module; writes folder/result.json; exit 1 when it fails."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        result = PART_FUNCTIONS[name](folder, device, small, in_memory)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": _reason(exc)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    (folder / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))
    return 0 if result.get("ok") else 1


# ---------------------------------------------------------------------------------------------------------------
# The session


@dataclass
class Part:
    name: str
    what: str
    budget: float  # seconds at full size
    small_budget: float  # with --small, on a CPU (a cap for a loaded machine; they take 5 to 45 s)
    results: tuple[str, ...] = ()  # the part's result files (in its folder), read into the summary


PARTS = [
    Part("gpu_check", "device map across GPU and CPU, merge on the GPU, nccl (2+ GPUs)", 120, 120, ("gpu_check.json",)),
    Part("plusplus", "RegMean++ (regmean merge --method regmean++) on the GPU vs the CPU", 120, 120, ("result.json",)),
    Part("methods", "stats --statistics gram,fisher on the GPU vs the CPU; merge ties, dare, fisher, regmean", 150, 120,
         ("result.json",)),
    Part("reliability", "tests/gpu_reliability_check.py: kill/resume, fp16 overflow, singular systems", 150, 180,
         ("gpu_reliability_check.json",)),
    Part("bench_gpu", "python -m bench.gpu: 1.1B Llama stats, Gram rate, merge, batched solves", 300, 120,
         ("gpu.md", "gpu.json")),
    Part("sweep", "optional: regmean sweep --help, once stages/sweep.py exists", 30, 60),
]


@dataclass
class Outcome:
    name: str
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    note: str = ""
    result: dict | None = None
    table: str | None = None
    log: Path | None = None


def part_command(part: Part, folder: Path, env: Environment, small: bool) -> list[str] | str:
    """The part's command, or why it is skipped."""
    python = sys.executable
    flag = ["--small"] if small else []
    if part.name == "gpu_check":
        return [python, str(ROOT / "tests" / "gpu_check.py"), str(folder), *flag]
    if part.name == "reliability":
        lacking = [name for name in ("datasets", "pytest") if not env.has(name)]
        if lacking:
            return f"skipped: needs {' and '.join(lacking)} (missing)"
        return [python, str(ROOT / "tests" / "gpu_reliability_check.py"), str(folder), *flag]
    if part.name == "bench_gpu":
        if not env.cuda and not small:
            return "skipped: no CUDA device (full size needs a GPU; --small runs it on the CPU)"
        return [python, "-m", "bench.gpu", "--out", str(folder / "gpu.md"), "--work", str(folder), "--device",
                env.device, *flag]
    if part.name == "sweep":
        if not (ROOT / "stages" / "sweep.py").exists():
            return "skipped: stages/sweep.py is not there yet (optional part)"
        return [python, "-m", "stages", "sweep", "--help"]
    in_memory = ["--in-memory"] if not env.has("datasets") else []
    return [python, "-m", "bench.gpu_session", "--part", part.name, "--part-dir", str(folder), "--device", env.device,
            *flag, *in_memory]


def child_environment(extra_paths: list[str]) -> dict:
    paths = [str(ROOT), *extra_paths, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, **CHILD_ENV, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_command(command: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """Run in its own process group, output to ``log``; (exit code or None when it ran out of time, seconds)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the part and whatever it started
            except ProcessLookupError:
                pass
            process.wait()
            code = None
    return code, time.perf_counter() - started


def read_results(part: Part, folder: Path) -> tuple[dict | None, str | None]:
    result, table = None, None
    for name in part.results:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".json") and result is None:
            try:
                result = json.loads(path.read_text())
            except ValueError:
                pass
        elif name.endswith(".md"):
            table = path.read_text()
    return result, table


def skipped_notes(value, prefix: str = "") -> list[str]:
    """Every "skipped: ..." string in a result, with where it is."""
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in skipped_notes(v, f"{prefix}{k}.")]
    if isinstance(value, str) and value.startswith("skipped"):
        return [f"{prefix.rstrip('.')}: {value}" if prefix else value]
    return []


class Session:
    def __init__(self, out: Path, work: Path, small: bool, deadline: float, parts: list[Part]):
        self.out, self.work, self.small, self.deadline, self.parts = out, work, small, deadline, parts
        self.started = time.perf_counter()
        self.lines: list[str] = []
        self.outcomes: list[Outcome] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def run(self, env: Environment, wheel_lines: list[str]) -> int:
        for line in wheel_lines + env.lines:
            self.say(line)
        self.say(env.device_line)
        if env.missing_required:
            self.say(f"stopped: required {', '.join(env.missing_required)} missing; no part was run")
            self.finish(env, 3)
            return 3
        child_env = child_environment([p for p in sys.path if p == str(WHEEL_SITE)])
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        for index, part in enumerate(self.parts, start=1):
            self.outcomes.append(self.run_part(index, part, env, child_env))
        failed = [o for o in self.outcomes if o.status in ("failed", "timed out")]
        code = 1 if failed else 0
        self.finish(env, code)
        return code

    def run_part(self, index: int, part: Part, env: Environment, child_env: dict) -> Outcome:
        folder = self.work / part.name
        folder.mkdir(parents=True, exist_ok=True)
        left = self.deadline - (time.perf_counter() - self.started)
        header = f"== [{index}/{len(self.parts)}] {part.name}: {part.what}"
        command = part_command(part, folder, env, self.small)
        if isinstance(command, str):
            self.say(f"{header}\n   {command}")
            return Outcome(part.name, "skipped", note=command.removeprefix("skipped: "))
        if left < 10:
            note = f"out of time (the session's deadline, {self.deadline:.0f}s, was reached)"
            self.say(f"{header}\n   skipped: {note}")
            return Outcome(part.name, "skipped", note=note)
        timeout = min(part.small_budget if self.small else part.budget, left)
        self.say(f"{header} (budget {timeout:.0f}s)")
        log = self.work / "logs" / f"{part.name}.log"
        code, seconds = run_command(command, log, timeout, child_env)
        result, table = read_results(part, folder)
        notes = skipped_notes(result or {})
        if code is None:
            outcome = Outcome(part.name, "timed out", seconds, f"killed after {timeout:.0f}s", result, table, log)
        elif code != 0:
            error = (result or {}).get("error") or next(
                (line for line in reversed(log.read_text(errors="replace").splitlines())
                 if line.startswith(("error:", "Error", "AssertionError", "RuntimeError")) or "Error:" in line), "")
            outcome = Outcome(part.name, "failed", seconds, f"exit {code}{': ' + error[:300] if error else ''}",
                              result, table, log)
        else:
            outcome = Outcome(part.name, "passed", seconds, "; ".join(notes), result, table, log)
        self.say(f"   {outcome.status} in {seconds:.1f}s{': ' + outcome.note if outcome.note else ''}")
        if outcome.status != "passed":
            for line in log.read_text(errors="replace").splitlines()[-15:]:
                self.say(f"   | {line[:300]}")
        return outcome

    def finish(self, env: Environment, code: int) -> None:
        total = time.perf_counter() - self.started
        self.say(f"session: exit {code} after {total:.0f}s; summary in {self.out / 'summary.md'}")
        self.out.mkdir(parents=True, exist_ok=True)
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "commit": commit(), "small": self.small, "seconds": round(total, 1), "exit": code,
                  "device": env.device_line, "environment": env.lines, "versions": env.versions,
                  "missing_required": env.missing_required, "missing_optional": env.missing_optional,
                  "parts": [{"name": o.name, "status": o.status, "seconds": round(o.seconds, 1), "note": o.note,
                             "result": o.result} for o in self.outcomes]}
        (self.out / "session.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        summary = self.summary(env, code, total)
        (self.out / "summary.md").write_text(summary)
        table = [line for line in summary.splitlines() if line.startswith("| ")]
        print(f"\n{summary}\n== parts (again, for the tail of the output)\n" + "\n".join(table), flush=True)
        (self.out / "session.log").write_text("\n".join(self.lines) + "\n")
        self.archive()

    def summary(self, env: Environment, code: int, total: float) -> str:
        lines = [f"# GPU session{' (--small)' if self.small else ''}: exit {code}", "",
                 f"{env.device_line}", "",
                 f"{datetime.date.today().isoformat()}, commit {commit()}, {total:.0f}s in all "
                 f"(deadline {self.deadline:.0f}s)", "", "## Environment", ""]
        lines += [f"- {line.removeprefix('env: ')}" for line in env.lines] or ["- every package is there"]
        lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in env.versions.items()), "", "## Parts", "",
                  "| part | status | seconds | note |", "| --- | --- | --- | --- |"]
        outcomes = {o.name: o for o in self.outcomes}
        selected = {p.name for p in self.parts}
        for part in PARTS:
            outcome = outcomes.get(part.name)
            if outcome is None:
                why = "not run (required packages missing)" if part.name in selected else "not selected (--only/--skip)"
                lines.append(f"| {part.name} | {why} | | |")
                continue
            note = outcome.note.replace("|", "/").replace("\n", " ")[:400]
            lines.append(f"| {part.name} | {outcome.status} | {outcome.seconds:.1f} | {note} |")
        for outcome in self.outcomes:
            if outcome.result is None and outcome.table is None and outcome.status != "failed":
                continue
            lines += ["", f"## {outcome.name}", ""]
            if outcome.table:
                lines += [outcome.table.strip(), ""]
            elif outcome.result is not None:
                lines += [f"- {key}: {value}" for key, value in flatten(outcome.result)][:60]
            if outcome.status in ("failed", "timed out") and outcome.log is not None and outcome.log.exists():
                tail = outcome.log.read_text(errors="replace").splitlines()[-40:]
                lines += ["", "Log tail:", "", "```", *[line[:300] for line in tail], "```"]
        return "\n".join(lines) + "\n"

    def archive(self) -> None:
        """parts.tar.gz: every part's log, and its small result files (json, md, logs of its own commands)."""
        with tarfile.open(self.out / "parts.tar.gz", "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if not path.is_file() or path.suffix not in (".log", ".json", ".md"):
                    continue
                relative_path = path.relative_to(self.work)
                if relative_path.suffix != ".log" and (len(relative_path.parts) > 2 or path.stat().st_size > 1 << 20):
                    continue  # model configs, cache manifests: not results
                data = path.read_bytes()
                if len(data) > MAX_LOG_BYTES:
                    data = data[:MAX_LOG_BYTES // 4] + b"\n[... cut ...]\n" + data[-3 * MAX_LOG_BYTES // 4:]
                info = tarfile.TarInfo(str(relative_path))
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in flatten(v, f"{prefix}{k}.")]
    if isinstance(value, float):
        shown = f"{value:.3g}"
    elif isinstance(value, list):
        shown = ", ".join(map(str, value))[:200]
    else:
        shown = str(value)[:300]
    return [(prefix.rstrip("."), shown)]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or "?"
    except (OSError, subprocess.CalledProcessError):
        return "? (no git here)"


def select(only: str | None, skip: str | None) -> list[Part]:
    names = [p.name for p in PARTS]
    chosen = [n.strip() for n in (only or ",".join(names)).split(",") if n.strip()]
    dropped = {n.strip() for n in (skip or "").split(",") if n.strip()}
    unknown = sorted((set(chosen) | dropped) - set(names))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}: the parts are {', '.join(names)}")
    return [p for p in PARTS if p.name in chosen and p.name not in dropped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="folder for summary.md, session.json, session.log, "
                        "parts.tar.gz")
    parser.add_argument("--small", action="store_true", help="tiny sizes: every part on a CPU in about 2 minutes")
    parser.add_argument("--only", help="comma-separated parts to run (default: all): " + ", ".join(p.name for p in PARTS))
    parser.add_argument("--skip", help="comma-separated parts to leave out")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for all parts together; a part is cut at the deadline, later ones are skipped "
                        "[default: 450; with --small, 600: a loaded CPU is slow]")
    parser.add_argument("--device", default=None, help="the parts' device [default: cuda when there, else cpu]")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the parts' models, caches and logs (kept) [default: a temporary folder]")
    parser.add_argument("--fetch-wheels", action="store_true",
                        help=f"download {', '.join(WHEELS)} for Python {GPU_PYTHON} into .whl/ and exit (needs pip "
                        "with an index; `make gpu-wheels`)")
    parser.add_argument("--part", choices=sorted(PART_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--part-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    if args.part:
        return run_part_here(args.part, args.part_dir, args.device or "cpu", args.small, args.in_memory)
    if args.out is None:
        parser.error("OUT is required")
    for name, value in CHILD_ENV.items():
        os.environ.setdefault(name, value)
    parts = select(args.only, args.skip)
    deadline = args.deadline if args.deadline is not None else (600.0 if args.small else 450.0)
    wheel_lines = install_wheels()
    env = check_environment(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return Session(args.out, args.work, args.small, deadline, parts).run(env, wheel_lines)
    scratch = Path(tempfile.mkdtemp(prefix="regmean-gpu-session-"))
    try:
        return Session(args.out, scratch, args.small, deadline, parts).run(env, wheel_lines)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
