"""GPU benchmark: a ~1.1B-parameter Llama (random weights, built from a config: no downloads), bf16
forward with float32 Grams, safetensors caches, and a merge of two candidates. Prints one table and
writes it to OUT (markdown) and OUT.json.

    python -m bench.gpu --out bench/gpu_results.md            # one CUDA GPU, a few minutes
    python -m bench.gpu --out /tmp/gpu_small.md --small       # tiny sizes, runs on a CPU in a minute

Measures: stats tokens/s vs a plain forward over the same batches; the Gram products' flop rate vs
the card's measured float32 (and TF32) matmul rate; merge wall time vs the time to read every
cache and weight file once; batched Cholesky solves vs a per-layer loop. Uses neither zarr nor
datasets (token batches are synthetic).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from bench.fixtures import llama_config, markdown_table, matmul_rate, recorded_timed_grams, timed
from regmean_pipeline.cache.manifest import manifest_from_stats
from regmean_pipeline.cache.store import StatsCache, write_cache
from regmean_pipeline.io.weights import SafetensorsCheckpoint, fingerprint, open_weights
from regmean_pipeline.measure.gram import collect_grams
from regmean_pipeline.merge.solve import solve_batch
from stages.merge import run_merge
from stages.merge_options import MergeOptions

log = logging.getLogger("bench.gpu")


@dataclass
class GpuSizes:
    layers: int = 22  # TinyLlama-1.1B's shape
    hidden: int = 2048
    mlp: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    batches: int = 8
    batch_size: int = 16
    max_tokens: int = 512
    matmul: int = 8192
    batch_memory: str = "8GiB"  # merge --batch-memory: room for equal-shaped systems to batch on the GPU


SMALL = GpuSizes(layers=2, hidden=128, mlp=352, heads=4, kv_heads=2, vocab=1000, batches=3, batch_size=4,
                 max_tokens=64, matmul=512, batch_memory="1GiB")


def token_batches(sizes: GpuSizes, seed: int) -> list[dict[str, torch.Tensor]]:
    """Synthetic batches, lengths between half and all of max_tokens, right-padded, longest first
    (as `regmean stats` orders them)."""
    generator = torch.Generator().manual_seed(seed)
    count = sizes.batches * sizes.batch_size
    lengths = torch.randint(sizes.max_tokens // 2, sizes.max_tokens + 1, (count,), generator=generator)
    lengths = lengths.sort(descending=True).values
    batches = []
    for start in range(0, count, sizes.batch_size):
        chunk = lengths[start:start + sizes.batch_size]
        width = int(chunk.max())
        ids = torch.randint(3, sizes.vocab, (len(chunk), width), generator=generator)
        mask = (torch.arange(width)[None, :] < chunk[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def forward(model, batches, device) -> None:
    with torch.inference_mode():
        for batch in batches:
            model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})


def write_candidate(model, folder: Path, caches: Path, batches, device, name: str) -> dict:
    """Save the model, run our stats pass over the batches and write a safetensors cache."""
    kept: list = []
    stats = None

    def stats_pass():
        nonlocal stats
        stats = collect_grams(model, batches, device=device, accumulator=recorded_timed_grams(kept))

    seconds = timed(stats_pass, device)
    accumulator = kept[0]
    model.save_pretrained(str(folder))
    manifest = manifest_from_stats(
        stats, model={"reference": str(folder), "architecture": "LlamaForCausalLM", "model_type": "llama",
                      "fingerprint": fingerprint(open_weights(folder))},
        dataset={"path": "synthetic tokens"}, storage="safetensors", forward_dtype="bfloat16",
        accumulate_dtype="float32", include_padding=False, tool="bench.gpu",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    (caches / name).mkdir(parents=True)
    write_cache(caches / name, manifest, stats.sums)
    return {"stats_s": seconds, "product_s": accumulator.product_seconds(), "product_flops": accumulator.product_flops,
            "full_flops": accumulator.full_flops}


def read_everything(folders: list[Path]) -> tuple[float, int]:
    """Seconds and bytes to read every file under the folders once, 64 MiB at a time."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open(path, "rb", buffering=0) as f:
                while (count := f.readinto(view)):
                    total += count
    return time.perf_counter() - started, total


def checked_read(caches: list[Path]) -> float:
    """Seconds to read every Gram (checksums, finiteness checks) and every weight tensor of the candidates."""
    started = time.perf_counter()
    for folder in caches:
        cache = StatsCache(folder)
        for key in cache.manifest.grams:
            cache.read_packed(key)
        weights = SafetensorsCheckpoint(Path(cache.manifest.model["reference"]))
        for name in weights.names():
            weights.get(name)
    return time.perf_counter() - started


def solve_comparison(shapes: list[tuple[int, int]], count: int, device: torch.device) -> list[dict]:
    """Batched solve_batch over ``count`` systems of each (d, width) vs one call per system."""
    generator = torch.Generator(device=device).manual_seed(0)
    return [solve_timing(dim, width, count, device, generator) for dim, width in shapes]


def solve_timing(dim: int, width: int, count: int, device: torch.device, generator: torch.Generator) -> dict:
    """One shape's timings; its tensors are freed when this returns."""
    factor = torch.randn(count, dim, dim, device=device, generator=generator) / dim ** 0.5
    matrix = factor @ factor.transpose(1, 2) + torch.eye(dim, device=device)
    del factor
    rhs = torch.randn(count, dim, width, device=device, generator=generator)
    anchor = torch.randn(count, dim, width, device=device, generator=generator)
    target = torch.zeros_like(anchor)

    def batched() -> None:
        solve_batch(matrix, rhs, anchor.clone(), target)

    def looped() -> None:
        for i in range(count):
            solve_batch(matrix[i:i + 1], rhs[i:i + 1], anchor[i:i + 1].clone(), target[i:i + 1])

    solve_batch(matrix[:1], rhs[:1], anchor[:1].clone(), target[:1])  # warm-up
    return {"dim": dim, "width": width, "systems": count, "batched_s": timed(batched, device),
            "loop_s": timed(looped, device)}


def run(sizes: GpuSizes, work: Path, device: torch.device) -> dict:
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    log.info("matmul rates")
    results["matmul_fp32"] = matmul_rate(sizes.matmul, device, torch.float32)
    results["matmul_tf32"] = matmul_rate(sizes.matmul, device, torch.float32, tf32=True)
    results["matmul_bf16"] = matmul_rate(sizes.matmul, device, torch.bfloat16)

    config = llama_config(sizes.layers, sizes.hidden, sizes.mlp, sizes.heads, sizes.kv_heads, sizes.vocab)
    log.info("building the model")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    results["parameters"] = sum(p.numel() for p in model.parameters())
    batches = token_batches(sizes, seed=0)
    results["tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    forward(model, batches[:1], device)
    collect_grams(model, batches[:1], device=device)  # warm-up of both passes
    results["forward_s"] = timed(functools.partial(forward, model, batches, device), device)

    caches = work / "caches"
    log.info("candidate 0: stats + cache")
    results["candidate_0"] = write_candidate(model, work / "model_0", caches, batches, device, "c0")
    with torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(1)
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, device=device, generator=generator, dtype=torch.float32)
            parameter.add_((0.01 * parameter.float().std() * noise).to(parameter.dtype))
    log.info("candidate 1: stats + cache")
    results["candidate_1"] = write_candidate(model, work / "model_1", caches, token_batches(sizes, seed=1),
                                             device, "c1")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    folders = [caches / "c0", caches / "c1", work / "model_0", work / "model_1"]
    log.info("reading caches and weights")
    results["raw_read_s"], results["read_bytes"] = read_everything(folders)
    results["checked_read_s"] = checked_read([caches / "c0", caches / "c1"])
    log.info("merge")
    started = time.perf_counter()
    report = run_merge(MergeOptions(out=str(work / "merged"), cache_dir=str(caches), device=str(device),
                                    batch_memory=sizes.batch_memory, overwrite=True, progress=False))
    results["batch_memory"], results["merge_batches"] = sizes.batch_memory, report["totals"]["batches"]
    results["merge_s"] = time.perf_counter() - started
    results["merge_timings"] = report["timings"]
    log.info("batched vs per-layer solves")
    q_width = sizes.hidden + 2 * sizes.hidden // sizes.heads * sizes.kv_heads
    shapes = [(sizes.hidden, q_width), (sizes.hidden, sizes.hidden), (sizes.hidden, 2 * sizes.mlp),
              (sizes.mlp, sizes.hidden)]
    results["solves"] = solve_comparison(shapes, sizes.layers, device)
    results["imported_zarr_or_datasets"] = sorted(m for m in ("zarr", "datasets") if m in sys.modules)
    return results


def table(r: dict) -> str:
    rows = []
    rows.append(("device", r["device"], f"torch {r['torch']}", "", ""))
    rows.append(("matmul GFLOP/s fp32 / tf32 / bf16", f"{r['matmul_fp32'] / 1e9:.0f}",
                 f"{r['matmul_tf32'] / 1e9:.0f} / {r['matmul_bf16'] / 1e9:.0f}", "", ""))
    rows.append(("model", f"{r['parameters'] / 1e9:.2f}B params, bf16", f"{r['tokens']} tokens", "", ""))
    c0 = r["candidate_0"]
    forward_rate, stats_rate = r["tokens"] / r["forward_s"], r["tokens"] / c0["stats_s"]
    rows.append(("stats tokens/s vs plain forward", f"{stats_rate:.0f}", f"{forward_rate:.0f}",
                 f"{stats_rate / forward_rate:.2f}", ""))
    gram_rate = c0["product_flops"] / c0["product_s"]
    rows.append(("Gram product GFLOP/s vs fp32 matmul", f"{gram_rate / 1e9:.0f}", f"{r['matmul_fp32'] / 1e9:.0f}",
                 f"{gram_rate / r['matmul_fp32']:.2f}", ">= 0.50"))
    rows.append(("Gram product GFLOP/s vs tf32 matmul", f"{gram_rate / 1e9:.0f}", f"{r['matmul_tf32'] / 1e9:.0f}",
                  f"{gram_rate / r['matmul_tf32']:.2f}", ""))
    rows.append(("Gram time vs full X^T X at fp32 matmul rate", f"{c0['product_s']:.2f}s",
                 f"{c0['full_flops'] / r['matmul_fp32']:.2f}s", f"{c0['full_flops'] / r['matmul_fp32'] / c0['product_s']:.2f}x", ""))
    rows.append(("merge s vs raw read of caches + weights", f"{r['merge_s']:.1f}",
                 f"{r['raw_read_s']:.1f} ({r['read_bytes'] / 2**30:.1f} GiB)", f"{r['merge_s'] / r['raw_read_s']:.2f}x",
                 "<= 1.5x"))
    rows.append(("merge --batch-memory / solve batches", r["batch_memory"], str(r["merge_batches"]), "", ""))
    rows.append(("merge s vs checked read (checksums, all tensors)", f"{r['merge_s']:.1f}",
                 f"{r['checked_read_s']:.1f}", f"{r['merge_s'] / r['checked_read_s']:.2f}x", ""))
    timings = r["merge_timings"]
    rows.append(("merge phases: plan / wait for reads / solve / average", f"{timings.get('plan_and_checks', 0):.1f}",
                 f"{timings['wait_for_reads']:.1f} / {timings['solve']:.1f} / {timings['average_and_copy']:.1f}", "", ""))
    for s in r["solves"]:
        rows.append((f"solve {s['systems']} x (d={s['dim']}, w={s['width']}): batched vs loop s", f"{s['batched_s']:.3f}",
                     f"{s['loop_s']:.3f}", f"{s['loop_s'] / s['batched_s']:.2f}x faster", ""))
    rows.append(("zarr/datasets imported", ", ".join(r["imported_zarr_or_datasets"]) or "neither", "", "", "none"))
    return markdown_table(("measurement", "value", "reference", "ratio", "target"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="write the table here (markdown; JSON beside it)")
    parser.add_argument("--small", action="store_true", help="tiny sizes (runs on a CPU in about a minute)")
    parser.add_argument("--work", type=Path, default=None, help="folder for models and caches (default: a temp dir)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu (with --small)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("regmean_pipeline", "stages", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.small:
        parser.error("no CUDA device: the full benchmark needs a GPU (use --small to try it on a CPU)")
    sizes = SMALL if args.small else GpuSizes()
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        started = time.perf_counter()
        results = run(sizes, Path(scratch), device)
        results["seconds"] = time.perf_counter() - started
    text = table(results) + f"\n\n{results['device']}, {results['date']}; ran {results['seconds']:.0f}s\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
