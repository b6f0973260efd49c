"""Where the CPU merge's time goes: the Llama-shaped K = 4 merge of `make bench` under torch.profiler.

Prints the profile's top rows (self CPU time) and the solve phase's rate against a float32 matmul
measured in the same process, with RegMean's flops counted as bench.run counts them:

    python -m bench.profile_merge [--work outputs/bench-profile] [--rows 15] [--quick]

The candidates and their caches are built once under --work and reused by later runs (delete the
folder to rebuild), so a before/after comparison profiles the very same inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from bench.fixtures import build_llama, llama_config, matmul_rate, regmean_solve_flops
from bench.run import QUICK, REPO, Sizes, make_candidates
from regmean_pipeline.cache.manifest import read_manifest

log = logging.getLogger("bench.profile")


def llama_caches(work: Path, sizes: Sizes) -> Path:
    """The bench's Llama-shaped base and four perturbed candidates with their caches (built once)."""
    marker = work / "sizes.json"
    wanted = json.dumps(sizes.__dict__, sort_keys=True)
    if marker.exists() and marker.read_text() == wanted:
        return work / "caches"
    shutil.rmtree(work, ignore_errors=True)
    config = llama_config(sizes.llama_layers, sizes.llama_hidden, sizes.llama_mlp)
    base = build_llama(work / "base", config)
    caches = make_candidates(base, work, 4, sizes.candidate_examples_llama, sizes, "llama")
    marker.write_text(wanted)
    return caches


def profile_merge(caches: Path, out: Path, rows: int) -> dict:
    from stages.merge import run_merge
    from stages.merge_options import MergeOptions

    options = MergeOptions(out=str(out), cache_dir=str(caches), device="cpu", batch_memory="1GiB", overwrite=True,
                           progress=False)
    run_merge(options)  # warm-up: first-call allocations and lazy initialisation are nobody's cost
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        report = run_merge(options)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench-profile")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("regmean_pipeline", "stages", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sizes = QUICK if args.quick else Sizes()
    caches = llama_caches(args.work, sizes)
    report = profile_merge(caches, args.work / "merged", args.rows)
    candidates = sorted(p for p in caches.iterdir() if (p / "manifest.json").exists())
    flops = regmean_solve_flops(read_manifest(candidates[0]), len(candidates))
    rate = matmul_rate(sizes.matmul, torch.device("cpu"), torch.float32)
    solve = report["timings"]["solve"]
    print(f"float32 matmul {rate / 1e9:.1f} GFLOP/s; solve phase {solve:.1f}s for {flops / 1e12:.3f} TFLOP = "
          f"{flops / solve / 1e9:.1f} GFLOP/s = {flops / solve / rate:.2f} of matmul (timed under the profiler); "
          f"whole merge {report['timings']['total']:.1f}s")


if __name__ == "__main__":
    main()
