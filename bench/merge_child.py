"""One merge in a fresh process, so its peak RSS (VmHWM) is its own: ours, or FusionBench's.

    python -m bench.merge_child ours --cache-dir C --out O [--batch-memory 256MiB]
    python -m bench.merge_child fusionbench --cache-dir C --out O

Prints one JSON line: wall seconds (whole run and, for FusionBench, its merge function alone),
RSS after imports and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.fixtures import peak_rss_bytes


def current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_ours(cache_dir: Path, out: Path, batch_memory: str) -> dict:
    from stages.merge import MergeOptions, run_merge

    imported = current_rss_bytes()
    started = time.perf_counter()
    report = run_merge(MergeOptions(out=str(out), cache_dir=str(cache_dir), device="cpu", batch_memory=batch_memory,
                                    overwrite=True, progress=False))
    return {"wall_s": time.perf_counter() - started, "rss_after_imports": imported,
            "timings": report["timings"], "batches": report["totals"]["batches"]}


def run_fusionbench(cache_dir: Path, out: Path, ratio: float) -> dict:
    """FusionBench's flow after its stats pass: every candidate's state dict and one mean Gram per linear
    module in memory, then ``merging_with_regmean_weights``, then the merged state dict saved."""
    import torch
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from safetensors.torch import load_file, save_file

    from regmean_pipeline.cache.store import GramCache

    imported = current_rss_bytes()
    started = time.perf_counter()
    caches = [GramCache(folder) for folder in sorted(cache_dir.iterdir()) if (folder / "manifest.json").exists()]
    state_dicts = [load_file(str(Path(c.manifest.model["reference"]) / "model.safetensors")) for c in caches]
    # FusionBench merges parameters (named_parameters); integer buffers such as BERT's position_ids
    # are not among them and pass through from the first model.
    params = {name: [sd[name] for sd in state_dicts] for name, t in state_dicts[0].items() if t.is_floating_point()}
    buffers = {name: t for name, t in state_dicts[0].items() if not t.is_floating_point()}
    grams = []
    for cache in caches:
        means = {}
        for name, layer in cache.manifest.layers.items():
            # FusionBench hooks every module on its own, so layers fed one input hold separate copies.
            means[name] = cache.read(layer.gram) / cache.manifest.grams[layer.gram].tokens
        grams.append(means)
    loaded = time.perf_counter()
    with torch.no_grad():
        merged = merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=ratio)
    merged_at = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in {**merged, **buffers}.items()}, str(out / "model.safetensors"))
    finished = time.perf_counter()
    return {"wall_s": finished - started, "merge_function_s": merged_at - loaded, "load_s": loaded - started,
            "save_s": finished - merged_at, "rss_after_imports": imported}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ours", "fusionbench"])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-memory", default="1GiB")
    parser.add_argument("--ratio", type=float, default=0.95)
    args = parser.parse_args()
    if args.mode == "ours":
        result = run_ours(args.cache_dir, args.out, args.batch_memory)
    else:
        result = run_fusionbench(args.cache_dir, args.out, args.ratio)
    result["peak_rss"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
