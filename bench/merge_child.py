"""One merge in a fresh process, so its peak RSS (VmHWM) is its own: ours, or FusionBench's.

    python -m bench.merge_child ours --cache-dir C --out O [--batch-memory 256MiB]
    python -m bench.merge_child fusionbench --cache-dir C --out O
    python -m bench.merge_child method|fusionbench-ties|fusionbench-dare|fusionbench-fisher --spec SPEC.json

``method`` is our `regmean merge --method M` with any method; the fusionbench-* modes run FusionBench's
own functions on the same inputs (bench/methods.py writes the spec: method, params, models, pretrained,
cache_dir, out). Prints one JSON line: wall seconds (whole run and, for FusionBench, its merge function
alone), RSS after imports and peak RSS.
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
    from stages.merge import run_merge
    from stages.merge_options import MergeOptions

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

    from regmean_pipeline.cache.store import StatsCache

    imported = current_rss_bytes()
    started = time.perf_counter()
    caches = [StatsCache(folder) for folder in sorted(cache_dir.iterdir()) if (folder / "manifest.json").exists()]
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
            means[name] = cache.gram(layer.gram) / cache.manifest.grams[layer.gram].tokens
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


def run_method(spec: dict) -> dict:
    """Our merge with any method, as `regmean merge` runs it (candidates as models or caches)."""
    from stages.merge import run_merge
    from stages.merge_options import MergeOptions

    imported = current_rss_bytes()
    started = time.perf_counter()
    report = run_merge(MergeOptions(out=spec["out"], method=spec["method"], params=spec.get("params", {}),
                                    models=spec.get("models", {}), pretrained=spec.get("pretrained"),
                                    cache_dir=spec.get("cache_dir"), device="cpu", overwrite=True, progress=False,
                                    batch_memory=spec.get("batch_memory", "1GiB")))
    return {"wall_s": time.perf_counter() - started, "rss_after_imports": imported, "timings": report.get("timings")}


def _load_candidates(spec: dict):
    """FusionBench's models as state dicts: the pretrained one, every candidate's (by name), the names of
    the floating tensors it merges (sorted, as its state_dict_to_vector orders them) and the integer
    buffers that pass through from the pretrained model."""
    from safetensors.torch import load_file

    pretrained = load_file(str(Path(spec["pretrained"]) / "model.safetensors"))
    candidates = {name: load_file(str(Path(path) / "model.safetensors")) for name, path in spec["models"].items()}
    floating = sorted(name for name, tensor in pretrained.items() if tensor.is_floating_point())
    buffers = {name: tensor for name, tensor in pretrained.items() if not tensor.is_floating_point()}
    return pretrained, candidates, floating, buffers


def _save(merged: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # clone: FusionBench's vector_to_state_dict hands back views of one vector, which save_file refuses
    save_file({name: tensor.clone() for name, tensor in merged.items()}, str(out / "model.safetensors"))


def run_fusionbench_ties(spec: dict) -> dict:
    """FusionBench's TiesMergingAlgorithm.run once its models are loaded: every state dict flattened by its
    state_dict_to_vector (integer buffers removed), task vectors = fine-tuned - pretrained,
    ``ties_merging(reset_thresh=100 * density, merge_func)``, pretrained + scaling * merged, unflattened by
    its vector_to_state_dict; then saved. After the timing, how many parameters' trimmed task vectors sum
    to exactly zero with some entry non-zero: the only place where its sign rule (the sign of the whole
    model's sum) and ours (+, as mergekit) can pick differently."""
    import torch
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        topk_values_mask,
        vector_to_state_dict,
    )

    params = spec["params"]
    threshold = round(100 * params["density"])  # an integer percentage: 20 / 100 is exactly 0.2
    imported = current_rss_bytes()
    started = time.perf_counter()
    pretrained, candidates, floating, buffers = _load_candidates(spec)
    remove = list(buffers)
    loaded = time.perf_counter()
    with torch.no_grad():
        flat_ft = torch.vstack([state_dict_to_vector(c, remove) for c in candidates.values()])
        flat_ptm = state_dict_to_vector(pretrained, remove)
        task_vectors = flat_ft - flat_ptm
        del flat_ft
        merged_tv = ties_merging(task_vectors, reset_thresh=threshold, merge_func=params["merge_func"])
        merged = vector_to_state_dict(flat_ptm + params["scaling"] * merged_tv, pretrained, remove_keys=remove)
    merged_at = time.perf_counter()
    _save({**merged, **buffers}, Path(spec["out"]))
    finished = time.perf_counter()
    peak = peak_rss_bytes()
    trimmed, *_ = topk_values_mask(task_vectors, K=threshold)
    zero_sum = int(((trimmed.sum(0) == 0) & (trimmed != 0).any(0)).sum())
    return {"wall_s": finished - started, "merge_function_s": merged_at - loaded, "load_s": loaded - started,
            "save_s": finished - merged_at, "rss_after_imports": imported, "peak_rss": peak,
            "zero_sum_parameters": zero_sum, "elements": int(task_vectors.shape[1])}


def run_fusionbench_dare(spec: dict) -> dict:
    """FusionBench's DareTaskArithmetic.run (only_on_linear_weights false, rescale true) on the state
    dicts: its module_sub_ (fine-tuned - pretrained), its module_random_drop_ on every tensor, its
    state_dict_sum, pretrained + scaling * sum. Its ``torch.rand_like`` is made to return our keep mask
    (1.0 kept, 0.0 dropped: task_vectors.keep_mask of stream_key(seed, candidate, parameter), as
    TaskVectorMerge draws it), so ``rand > sparsity`` keeps exactly what ours keeps; computing our masks
    is timed apart and not counted in its merge time."""
    from unittest import mock

    import torch
    from fusion_bench.method.dare import utils as dare_utils
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sum

    from regmean_pipeline.merge.methods.task_vectors import keep_mask, stream_key

    params = spec["params"]
    density, seed = params["density"], params.get("seed", 0)
    imported = current_rss_bytes()
    started = time.perf_counter()
    pretrained, candidates, floating, buffers = _load_candidates(spec)
    loaded = time.perf_counter()
    where: dict[int, tuple[str, str]] = {}  # id of each task-vector tensor -> (candidate, parameter)
    mask_seconds = 0.0

    def our_draw(tensor, *args, **kwargs):
        nonlocal mask_seconds
        begun = time.perf_counter()
        candidate, name = where[id(tensor)]
        keep = keep_mask(stream_key(seed, candidate, name), 0, tensor.numel(), density).reshape(tensor.shape)
        mask_seconds += time.perf_counter() - begun
        return keep.to(tensor.dtype)

    with torch.no_grad():
        task_vectors = {}
        for candidate, state in candidates.items():
            vector = {name: state[name] for name in floating}
            dare_utils.module_sub_(vector, {name: pretrained[name] for name in floating}, trainable_only=False)
            where.update({id(tensor): (candidate, name) for name, tensor in vector.items()})
            task_vectors[candidate] = vector
        with mock.patch.object(dare_utils.torch, "rand_like", our_draw):
            for vector in task_vectors.values():
                dare_utils.module_random_drop_(vector, 1 - density, rescale=True)
        total = state_dict_sum(list(task_vectors.values()))
        merged = {name: pretrained[name].add_(total[name] * params["scaling"]) for name in floating}
    merged_at = time.perf_counter()
    _save({**merged, **buffers}, Path(spec["out"]))
    finished = time.perf_counter()
    return {"wall_s": finished - started - mask_seconds, "merge_function_s": merged_at - loaded - mask_seconds,
            "mask_s": mask_seconds, "load_s": loaded - started, "save_s": finished - merged_at,
            "rss_after_imports": imported}


def run_fusionbench_fisher(spec: dict) -> dict:
    """FusionBench's merging_with_fisher_weights on the caches' candidates, given the caches' own Fisher
    (sums / examples, the weights our merge reads), equal scaling coefficients 1/K and the spec's
    normalize_fisher_weight and minimal_fisher_weight; every candidate's state dict in memory, as its
    FisherMergingAlgorithm holds them."""
    import torch
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from safetensors.torch import load_file

    from regmean_pipeline.cache.store import StatsCache

    params = spec["params"]
    cache_dir = Path(spec["cache_dir"])
    imported = current_rss_bytes()
    started = time.perf_counter()
    caches = [StatsCache(folder) for folder in sorted(cache_dir.iterdir()) if (folder / "manifest.json").exists()]
    states = [load_file(str(Path(c.manifest.model["reference"]) / "model.safetensors")) for c in caches]
    names = [name for name, tensor in states[0].items() if tensor.is_floating_point()
             and all(name in c.manifest.fisher for c in caches)]
    passed = {name: tensor for name, tensor in states[0].items() if name not in set(names)}
    weights = [{name: c.fisher(name) / c.manifest.fisher[name].examples for name in names} for c in caches]
    loaded = time.perf_counter()
    with torch.no_grad():
        merged = merging_with_fisher_weights(
            {name: [state[name] for state in states] for name in names}, weights,
            fisher_scaling_coefficients=torch.ones(len(caches)) / len(caches),
            normalize_fisher_weight=params["normalize_fisher_weight"],
            minimal_fisher_weight=params["minimal_fisher_weight"])
    merged_at = time.perf_counter()
    _save({**merged, **passed}, Path(spec["out"]))
    finished = time.perf_counter()
    return {"wall_s": finished - started, "merge_function_s": merged_at - loaded, "load_s": loaded - started,
            "save_s": finished - merged_at, "rss_after_imports": imported, "without_fisher": len(passed)}


def run_regmean_points(spec: dict) -> dict:
    from bench.sweep import run_points

    return run_points(spec)


SPEC_MODES = {"method": run_method, "regmean-points": run_regmean_points, "fusionbench-ties": run_fusionbench_ties, "fusionbench-dare": run_fusionbench_dare,
              "fusionbench-fisher": run_fusionbench_fisher}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ours", "fusionbench", *SPEC_MODES])
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--spec", type=Path, help="the spec JSON of the modes after ours and fusionbench")
    parser.add_argument("--batch-memory", default="1GiB")
    parser.add_argument("--ratio", type=float, default=0.95)
    args = parser.parse_args()
    if (args.spec is None) == (args.mode in SPEC_MODES) or (args.spec is None and not (args.cache_dir and args.out)):
        parser.error("modes ours and fusionbench take --cache-dir and --out; the others take --spec")
    if args.mode in SPEC_MODES:
        result = SPEC_MODES[args.mode](json.loads(args.spec.read_text()))
    elif args.mode == "ours":
        result = run_ours(args.cache_dir, args.out, args.batch_memory)
    else:
        result = run_fusionbench(args.cache_dir, args.out, args.ratio)
    result.setdefault("peak_rss", peak_rss_bytes())  # a mode that checks more after its merge reads it first
    print(json.dumps(result))


if __name__ == "__main__":
    main()
