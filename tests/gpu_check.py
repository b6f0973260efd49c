"""The CUDA paths of the at-scale features, checked by hand on a GPU machine: ``python tests/gpu_check.py OUTDIR
[--small]`` (`python -m bench.gpu_session` runs it with the other GPU checks).

Needs torch, transformers, accelerate and safetensors only (no datasets, no zarr): batches are tokenized
here and caches are safetensors. Checks, each against the same computation on the CPU:
  1. stats with a device map that puts layer 0 on the GPU and the rest on the CPU (accumulators land on
     both), and with ``device_map="auto"``;
  2. the merge solved on the GPU;
  3. with two GPUs or more: data-parallel stats reduced over nccl, and the layer-parallel merge under
     torchrun, against one process.
Without a CUDA device every computation still runs, on the CPU, and the report says which checks were
skipped. ``--small``: fewer examples (the CPU smoke run of the tests).
Writes OUTDIR/gpu_check.json and exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regmean_pipeline.cache.manifest import manifest_from_stats  # noqa: E402
from regmean_pipeline.cache.store import write_cache  # noqa: E402
from regmean_pipeline.distributed import process_group, share  # noqa: E402
from regmean_pipeline.io.weights import fingerprint, open_weights  # noqa: E402
from regmean_pipeline.measure.gram import collect_grams  # noqa: E402
from regmean_pipeline.measure.models import load_model, load_preprocessor  # noqa: E402
from regmean_pipeline.measure.ranks import sum_gram_stats  # noqa: E402
from regmean_pipeline.testing import WORDS, make_model, save_model  # noqa: E402

GPU = "cuda:0" if torch.cuda.is_available() else "cpu"
NO_CUDA = "skipped: no CUDA device (computed on the CPU only)"
EXAMPLES = 48


def batches_for(folder: Path, n: int | None = None, size: int = 8) -> list[dict[str, torch.Tensor]]:
    n = n or EXAMPLES
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20))) for _ in range(n)]
    tokenizer = load_preprocessor(folder, images=False)
    return [dict(tokenizer(texts[i:i + size], padding="longest", return_tensors="pt")) for i in range(0, n, size)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def worst_gram_error(stats, reference) -> float:
    assert stats.layer_grams == reference.layer_grams and stats.tokens == reference.tokens
    return max(relative(stats.sums[k], reference.sums[k]) for k in reference.sums)


def stats_checks(folders: list[Path], out: Path) -> dict:
    results = {}
    split_map = {"model.embed_tokens": GPU, "model.rotary_emb": GPU, "model.layers.0": GPU, "model.layers.1": "cpu",
                 "model.norm": "cpu", "score": "cpu"}
    for folder in folders:
        batches = batches_for(folder)
        reference = collect_grams(load_model(folder, dtype=torch.float32, device=torch.device("cpu")), batches,
                                  device="cpu")
        mapped = load_model(folder, dtype=torch.float32, device=None, device_map=split_map)
        stats = collect_grams(mapped, batches, device=GPU)
        auto = collect_grams(load_model(folder, dtype=torch.float32, device=None, device_map="auto"), batches,
                             device=GPU)
        results[folder.name] = {
            "accumulator_devices": sorted({str(t.device) for t in stats.sums.values()}),
            "split_map_vs_cpu": worst_gram_error(stats, reference),
            "auto_map_vs_cpu": worst_gram_error(auto, reference),
        }
        manifest = manifest_from_stats(
            stats, model={"reference": str(folder), "architecture": "LlamaForSequenceClassification",
                          "model_type": "llama", "fingerprint": fingerprint(open_weights(folder))},
            dataset={"path": "gpu_check"}, storage="safetensors", forward_dtype="float32",
            accumulate_dtype="float32", include_padding=False)
        (out / "caches" / folder.name).mkdir(parents=True)
        write_cache(out / "caches" / folder.name, manifest, {k: v.cpu() for k, v in stats.sums.items()})
    return results


def merge_with(out: Path, name: str, device: str, torchrun: int = 0) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    args = ["merge", "--cache-dir", str(out / "caches"), "--out", str(out / name), "--device", device,
            "--max-shard-size", "40KB"]
    command = [sys.executable, "-m", "stages"] if not torchrun else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun), "-m", "stages"]
    result = subprocess.run(command + args, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command + args)} failed:\n{result.stderr[-3000:]}")
    tensors = {}
    for file in sorted((out / name).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def nccl_stats_worker(folder: Path, out: Path) -> None:
    """Under torchrun: each rank accumulates its share of the batches on its GPU; nccl sums them."""
    with process_group() as ranks:
        batches = batches_for(folder)
        mine = [batches[i] for i in share(len(batches), ranks.rank, ranks.world)]
        device = f"cuda:{ranks.local_rank}"
        model = load_model(folder, dtype=torch.float32, device=torch.device(device))
        stats = sum_gram_stats(collect_grams(model, mine, device=device))
        if ranks.is_main:
            reference = collect_grams(load_model(folder, dtype=torch.float32, device=torch.device("cpu")), batches,
                                      device="cpu")
            (out / "nccl_stats.json").write_text(json.dumps({"nccl_reduced_vs_cpu": worst_gram_error(stats, reference),
                                                             "examples": stats.examples}))


def main(out: Path) -> int:
    started = time.time()
    print(f"device: {torch.cuda.get_device_name(0) if GPU != 'cpu' else 'cpu: ' + NO_CUDA}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    folders = [save_model(make_model("llama", seed=seed), out / "models" / f"c{seed}") for seed in (1, 2)]
    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "gpus": torch.cuda.device_count(), "torch": torch.__version__}
    report["stats"] = stats_checks(folders, out)
    cpu, gpu = merge_with(out, "merged_cpu", "cpu"), merge_with(out, "merged_gpu", GPU)
    report["merge_gpu_vs_cpu"] = max(relative(gpu[k], cpu[k]) for k in cpu)
    if GPU == "cpu":
        report["cuda"] = {"split_map_across_gpu_and_cpu": NO_CUDA, "merge_solved_on_gpu": NO_CUDA}
    ok = all(v["split_map_vs_cpu"] < 1e-4 and v["auto_map_vs_cpu"] < 1e-4 for v in report["stats"].values())
    ok &= report["merge_gpu_vs_cpu"] < 1e-4 and set(gpu) == set(cpu)
    ok &= all(len(v["accumulator_devices"]) == 2 for v in report["stats"].values()) or GPU == "cpu"
    if torch.cuda.device_count() >= 2:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--nccl-stats", str(folders[0]), str(out)], check=True)
        report.update(json.loads((out / "nccl_stats.json").read_text()))
        two = merge_with(out, "merged_two_ranks", "auto", torchrun=2)
        assert set(two) == set(gpu)
        report["layer_parallel_nccl_vs_one_gpu"] = max(relative(two[k], gpu[k]) for k in gpu)
        ok &= report["nccl_reduced_vs_cpu"] < 1e-4 and report["layer_parallel_nccl_vs_one_gpu"] < 1e-6
    else:
        report["nccl"] = f"skipped: needs two GPUs, found {torch.cuda.device_count()} (nccl allows one rank per GPU)"
    report["ok"], report["seconds"] = bool(ok), round(time.time() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) == 4 and sys.argv[1] == "--nccl-stats":
        nccl_stats_worker(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    arguments = [a for a in sys.argv[1:] if a != "--small"]
    if "--small" in sys.argv[1:]:
        EXAMPLES = 16
    sys.exit(main(Path(arguments[0] if arguments else "gpu_check_out")))
