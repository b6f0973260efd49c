"""The merge methods beyond RegMean, side by side in `make bench` with FusionBench's own functions and mergekit.

Every comparison runs both sides on the same inputs in this same run, each merge in a fresh child process
(rounds alternated, the run of median wall time kept), and compares the merged tensors:
- TIES (global trim, sum) and DARE (the same drop mask) against FusionBench's ``ties_merging`` and
  ``param_random_drop_`` + ``state_dict_sum`` on the MiniLM candidates (the Llama-shaped ones under
  ``--quick``; bench/merge_child.py runs both sides);
- Fisher merging: our ``--fisher-estimator batch`` Fisher against FusionBench's estimator on the same
  batches, and ``--method fisher`` against its ``merging_with_fisher_weights`` given the same Fisher, on
  MiniLM classifiers (a 2-layer BERT under ``--quick``; FusionBench's estimator needs a label distribution);
- the time per example of ``regmean stats --statistics gram,fisher`` (both estimators) against a
  FusionBench-style Fisher pass over the same batches;
- our TIES (per-tensor trim, mean) and average against ``mergekit-yaml`` ties and linear on the
  Llama-shaped candidates, whole processes (interpreter start and imports included on both sides).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.fixtures import (
    FusionBenchStyleStats,
    minilm_classifier,
    perturbed_copy,
    text_task,
    timed,
    timed_process,
    tiny_bert_classifier,
)
from regmean_pipeline.io.weights import SafetensorsCheckpoint
from regmean_pipeline.measure.data import DatasetSpec, load_examples, make_loader
from regmean_pipeline.measure.gram import ROW_MASK_KEY
from regmean_pipeline.measure.models import forward_inputs, load_model, load_preprocessor

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIES = {"density": 0.2, "trim": "global", "merge_func": "sum", "scaling": 0.3}  # FusionBench's defaults
DARE = {"density": 0.5, "scaling": 0.3, "seed": 0}
FISHER = {"normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6}
MERGEKIT_DENSITY = 0.2
# Our task-vector merges against FusionBench run with whole tensors per chunk: at the default 1GiB a tensor
# above 1GiB / (40 K) elements (MiniLM's word embeddings at K=5) is read in row chunks, and the pretrained
# weights have no row reads yet (PretrainedWeights.rows: AttributeError). FusionBench holds every model whole.
TASK_VECTOR_BATCH_MEMORY = "4GiB"
EXACT = 1e-5  # the largest relative difference (per tensor, Frobenius) counted as the same merge


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def spec_child(mode: str, spec: dict, folder: Path) -> dict:
    """One merge_child run of a spec mode (our method or a FusionBench function); its JSON line."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"spec_{mode}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "bench.merge_child", mode, "--spec", str(path)],
                          capture_output=True, text=True, env=_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} merge failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternating_medians(sides: dict[str, Callable[[], dict]], rounds: int) -> dict[str, dict]:
    """Every side run ``rounds`` times, the sides alternating within each round; per side, the run of
    median wall time, with all wall times in ``wall_s_runs``. Alternating hands the page cache and a
    shared machine's changing load to both sides alike, as bench/run.py's median_runs does."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, run in sides.items():
            runs[side].append(run())
    median = {}
    for side, results in runs.items():
        median[side] = dict(sorted(results, key=lambda r: r["wall_s"])[len(results) // 2])
        median[side]["wall_s_runs"] = [r["wall_s"] for r in results]
    return median


def merged_differences(ours: Path, theirs: Path, pretrained: Path | None = None,
                       explained: Callable[[str], bool] | None = None) -> dict:
    """Per floating tensor both folders hold: ||ours - theirs||_F / ||theirs||_F (the largest is the
    exactness figure) and, with ``pretrained``, the same difference over ||theirs - pretrained||_F (relative
    to what the merge changed: float32 rounding of the merged weights alone shows there as ~1e-5). A
    tensor beyond the target that ``explained(name)`` accounts for is listed apart (``explained``) and left
    out of both maxima."""
    mine, reference = SafetensorsCheckpoint(ours), SafetensorsCheckpoint(theirs)
    base = SafetensorsCheckpoint(pretrained) if pretrained is not None else None
    names = [n for n in reference.names() if reference.dtype(n).is_floating_point]
    shared = [n for n in names if n in set(mine.names())]
    weights, changes, apart = [0.0], [0.0], {}
    for name in shared:
        expected = reference.get(name).double()
        difference = float((mine.get(name).double() - expected).norm())
        relative = difference / (float(expected.norm()) or 1.0)
        if relative > EXACT and explained is not None and explained(name):
            apart[name] = relative
            continue
        weights.append(relative)
        if base is not None:
            change = float((expected - base.get(name).double()).norm())
            changes.append(difference / change if change else 0.0 if difference == 0 else math.inf)
    return {"max_relative_difference": max(weights),
            "max_relative_to_change": max(changes) if base is not None else None,
            "tensors": len(shared), "missing": len(names) - len(shared), "explained": apart}


# --- TIES and DARE against FusionBench's functions ------------------------------------------------------

def task_vector_comparison(method: str, mode: str, root: Path, pretrained: Path, models: dict[str, Path],
                           params: dict, rounds: int) -> dict:
    """``regmean merge --method METHOD --pretrained P --model ...`` against FusionBench's function
    (merge_child MODE) on the same state dicts; times, peak RSS and the merged tensors' differences."""
    spec = {"method": method, "params": params, "pretrained": str(pretrained),
            "models": {name: str(path) for name, path in models.items()}, "batch_memory": TASK_VECTOR_BATCH_MEMORY}
    ours_out, theirs_out = root / f"merged_{method}_ours", root / f"merged_{method}_fusionbench"
    sides = {"ours": lambda: spec_child("method", {**spec, "out": str(ours_out)}, root),
             "fusionbench": lambda: spec_child(mode, {**spec, "out": str(theirs_out)}, root)}
    results = alternating_medians(sides, rounds)
    differences = merged_differences(ours_out, theirs_out, pretrained)
    return {**results, **differences, "params": params, "k": len(models),
            "batch_memory": TASK_VECTOR_BATCH_MEMORY}


def trim_tie(base: Path, models: dict[str, Path], name: str, density: float) -> bool:
    """Whether some candidate's task vector of tensor ``name`` has a tie at mergekit's per-tensor trim: its
    k-th and (k+1)-th largest float32 magnitudes equal (k = max(1, int(density * numel))). There exactly k
    of the tied entries are kept, and which is a matter of order: mergekit keeps argsort's (unstable),
    ours the first in index order; the merged tensor then differs where the two picks' signs or values do."""
    pretrained = SafetensorsCheckpoint(base).get(name).float()
    for path in models.values():
        magnitudes = (SafetensorsCheckpoint(path).get(name).float() - pretrained).abs().flatten()
        k = max(1, int(density * magnitudes.numel()))
        if k < magnitudes.numel():
            top = torch.topk(magnitudes, k + 1).values
            if top[k - 1] == top[k]:
                return True
    return False


def ties_vs_fusionbench(root: Path, pretrained: Path, models: dict[str, Path], rounds: int) -> dict:
    """Our TIES with FusionBench's trim (over the whole model) and sum against its ``ties_merging`` on
    the vectors its TiesMergingAlgorithm builds; both float32 selections, so the same entries survive."""
    return task_vector_comparison("ties", "fusionbench-ties", root, pretrained, models, TIES, rounds)


def dare_vs_fusionbench(root: Path, pretrained: Path, models: dict[str, Path], rounds: int) -> dict:
    """Our DARE against FusionBench's drop and sum given our drop mask (its own draw is random, so only
    the same mask makes the two comparable entry by entry)."""
    return task_vector_comparison("dare", "fusionbench-dare", root, pretrained, models, DARE, rounds)


# --- Fisher: the estimator, the merge and the stats pass ----------------------------------------------

CLASSIFIERS = {"minilm": ("MiniLM-L6", minilm_classifier), "tiny": ("tiny BERT", tiny_bert_classifier)}


def fisher_candidates(root: Path, classifier: str, count: int, examples: int, sizes,
                      labels: int = 2) -> tuple[Path, dict]:
    """``count`` perturbed copies of a classifier (CLASSIFIERS), each with a `regmean stats --statistics
    gram,fisher --fisher-estimator batch` cache of its own task data in root/caches; returns the caches'
    folder and {name: (model, task)}."""
    from stages.stats import StatsOptions, run_stats

    base = CLASSIFIERS[classifier][1](root / "base", labels=labels)
    candidates = {}
    for i in range(count):
        name = f"classifier_{i}"
        model = perturbed_copy(base, root / name, seed=200 + i)
        task = text_task(root / f"task_{i}.jsonl", n=examples, seed=20 + i)
        run_stats(StatsOptions(model=str(model), dataset=str(task), out=str(root / "caches" / name),
                               num_examples=examples, batch_size=sizes.batch_size, max_length=sizes.max_length,
                               device="cpu", overwrite=True, progress=False, statistics="gram,fisher",
                               fisher_estimator="batch"))
        candidates[name] = (model, task)
    return root / "caches", candidates


def stats_batches(model_dir: Path, task: Path, examples: int, sizes) -> tuple[torch.nn.Module, list[dict]]:
    """The model as `regmean stats` loads it and the very batches its pass makes of the task (make_loader
    with the same spec: the same examples, order, padding and batch size)."""
    model = load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_preprocessor(model_dir, images=False)
    spec = DatasetSpec(str(task), num_examples=examples, seed=0, max_length=sizes.max_length)
    chosen = load_examples(spec, images=False)
    batches = list(make_loader(chosen, tokenizer, spec, accepted=forward_inputs(model), config=model.config,
                               batch_size=sizes.batch_size))
    return model, batches


def fusionbench_fisher(model: torch.nn.Module, batches: list[dict]) -> tuple[dict[str, torch.Tensor], int]:
    """FusionBench's Fisher pass for a classifier (fisher_merging.fisher_merging's loop, without its
    trainer): per batch, the gradient of sum over examples and labels of sqrt(p) log p (p detached under
    the root), squared by its own get_param_squared_gradients, summed over batches; with the examples
    seen (it divides by them, counting whole batches)."""
    from fusion_bench.method.fisher_merging.fisher_merging import get_param_squared_gradients

    names = [name for name, _ in model.named_parameters()]
    sums: dict[str, torch.Tensor] = {}
    examples = 0
    for batch in batches:
        inputs = {key: value for key, value in batch.items() if key != ROW_MASK_KEY}
        logits = model(**inputs).logits
        probabilities = torch.softmax(logits, dim=-1).detach()
        log_probabilities = torch.log_softmax(logits, dim=-1)
        objective = (torch.sqrt(probabilities) * log_probabilities).sum(dim=-1).sum(dim=0)
        model.zero_grad()
        objective.backward()
        for name, squares in get_param_squared_gradients(model, names).items():
            if name in sums:
                sums[name] += squares
            else:
                sums[name] = squares
        examples += len(logits)
    model.zero_grad(set_to_none=True)
    return sums, examples


ZERO_FISHER = 1e-9  # a Fisher below this fraction of the model's largest is zero up to rounding


def _relative(got: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    """||got - expected||_F over ||expected||_F, or over ``floor`` where that is larger."""
    return float((got - expected).norm()) / (max(float(expected.norm()), floor) or 1.0)


def fisher_estimates(caches: Path, candidates: dict[str, tuple[Path, Path]], examples: int, sizes) -> dict:
    """Our cached batch-estimator Fisher (sums / examples) against FusionBench's pass over the same
    batches, per candidate and parameter: the largest relative difference (Frobenius). A parameter whose
    Fisher is zero but for rounding (attention key biases: the softmax cancels them, so their gradients
    are noise) is measured against ZERO_FISHER x the candidate's largest parameter Fisher, and counted.
    Where the two differ by more than the target, the same estimator in float64 (FusionBench's pass on
    the model in float64, same batches) says how far each float32 result is from it: the gradient of
    sum sqrt(p) log p cancels terms, so float32 rounding alone reaches ~1e-5 there."""
    from regmean_pipeline.cache.store import StatsCache

    worst, parameters, missing, zero, disputed = 0.0, 0, 0, 0, 0
    ours_vs_exact, theirs_vs_exact = [0.0], [0.0]
    for name, (model_dir, task) in candidates.items():
        cache = StatsCache(caches / name)
        model, batches = stats_batches(model_dir, task, examples, sizes)
        theirs, seen = fusionbench_fisher(model, batches)
        theirs = {parameter: total.double() / seen for parameter, total in theirs.items()}
        floor = ZERO_FISHER * max(float(mean.norm()) for mean in theirs.values())
        ours, over = {}, []
        for parameter, expected in theirs.items():
            entry = cache.manifest.fisher.get(parameter)
            if entry is None:
                missing += 1
                continue
            ours[parameter] = cache.fisher(parameter).double() / entry.examples
            zero += float(expected.norm()) < floor
            difference = _relative(ours[parameter], expected, floor)
            worst = max(worst, difference)
            parameters += 1
            if difference > EXACT:
                over.append(parameter)
        if over:
            exact, seen = fusionbench_fisher(model.double(), batches)
            exact = {parameter: total / seen for parameter, total in exact.items()}
            floor = ZERO_FISHER * max(float(mean.norm()) for mean in exact.values())
            ours_vs_exact += [_relative(ours[p], exact[p], floor) for p in over]
            theirs_vs_exact += [_relative(theirs[p], exact[p], floor) for p in over]
            disputed += len(over)
    return {"max_relative_difference": worst, "parameters": parameters, "missing": missing, "zero": zero,
            "disputed": disputed, "ours_vs_float64": max(ours_vs_exact), "fusionbench_vs_float64": max(theirs_vs_exact)}


def fisher_merge_vs_fusionbench(caches: Path, root: Path, rounds: int) -> dict:
    """``regmean merge --method fisher`` against FusionBench's ``merging_with_fisher_weights`` given the
    caches' Fisher; times, peak RSS and the merged tensors' differences."""
    spec = {"method": "fisher", "params": FISHER, "cache_dir": str(caches)}
    ours_out, theirs_out = root / "merged_fisher_ours", root / "merged_fisher_fusionbench"
    sides = {"ours": lambda: spec_child("method", {**spec, "out": str(ours_out)}, root),
             "fusionbench": lambda: spec_child("fusionbench-fisher", {**spec, "out": str(theirs_out)}, root)}
    results = alternating_medians(sides, rounds)
    differences = merged_differences(ours_out, theirs_out)
    return {**results, **differences}


def fisher_pass_times(model_dir: Path, task: Path, examples: int, sizes, rounds: int) -> dict:
    """Seconds of whole passes over the same batches, alternated in rounds (median kept): our stats pass
    with both statistics (collect_grams with a FisherAccumulator, exactly as `regmean stats --statistics
    gram,fisher` drives it) with each estimator, our Fisher alone (--statistics fisher), and the
    FusionBench-style Fisher pass. Ours measures the Grams in the same pass; FusionBench's measures the
    Fisher only."""
    from regmean_pipeline.measure.fisher import FisherAccumulator
    from regmean_pipeline.measure.gram import collect_grams

    model, batches = stats_batches(model_dir, task, examples, sizes)

    def ours(estimator: str, grams: bool = True) -> Callable[[list[dict]], None]:
        return lambda chosen: collect_grams(model, chosen, device="cpu", grams=grams,
                                            fisher=FisherAccumulator(model, estimator=estimator))

    def fusionbench_both(chosen: list[dict]) -> None:  # what both statistics take there: two passes
        FusionBenchStyleStats(model).run([{k: v for k, v in batch.items() if k != ROW_MASK_KEY} for batch in chosen])
        fusionbench_fisher(model, chosen)

    passes = {"ours_batch": ours("batch"), "ours_per_example": ours("per-example"),
              "ours_fisher_only_batch": ours("batch", grams=False),
              "fusionbench": lambda chosen: fusionbench_fisher(model, chosen),
              "fusionbench_both": fusionbench_both}
    for run in passes.values():  # first-call allocations and lazy inits are nobody's cost
        run(batches[:1])
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run in passes.items():
            seconds[name].append(timed(lambda: run(batches)))
    count = sum(len(b["input_ids"]) for b in batches)
    return {"examples": count, **{f"{name}_s": sorted(s)[len(s) // 2] for name, s in seconds.items()},
            "runs": seconds}


# --- our TIES and average against mergekit-yaml -------------------------------------------------------

def mergekit_config(method: str, base: Path, models: dict[str, Path], density: float) -> str:
    """mergekit's YAML: ties (per-tensor magnitude trim, sum sign election, normalize: the disjoint mean)
    or linear (the plain mean), weight 1 each, computed and written in float32."""
    lines = [f"merge_method: {method}"]
    if method == "ties":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for path in models.values():
        lines.append(f"  - model: {path}")
        lines.append("    parameters: {weight: 1.0" + (f", density: {density}" if method == "ties" else "") + "}")
    if method == "ties":
        lines.append("parameters: {normalize: true}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def mergekit_vs_ours(root: Path, base: Path, models: dict[str, Path], rounds: int,
                     density: float = MERGEKIT_DENSITY) -> dict:
    """Per method, ``regmean merge`` and ``mergekit-yaml`` as whole processes on the same candidates (wall
    time and peak RSS of each, progress bars off on both), rounds alternated; and the merged tensors'
    differences. mergekit computes in float32, ours in float64."""
    root.mkdir(parents=True, exist_ok=True)
    candidates = [arg for name, path in models.items() for arg in ("--model", f"{name}={path}")]
    ours_args = {"ties": ["--method", "ties", "--trim", "tensor", "--merge-func", "mean", "--scaling", "1",
                          "--density", str(density), "--pretrained", str(base)],
                 "average": ["--method", "average"]}
    results = {}
    for ours_method, theirs_method in (("ties", "ties"), ("average", "linear")):
        config = root / f"mergekit_{theirs_method}.yml"
        config.write_text(mergekit_config(theirs_method, base, models, density))
        ours_out, theirs_out = root / f"merged_{ours_method}_ours", root / f"merged_{theirs_method}_mergekit"
        ours_command = [str(BIN / "regmean"), "merge", *ours_args[ours_method], *candidates, "--out", str(ours_out),
                        "--device", "cpu", "--overwrite", "--quiet"]
        theirs_command = [str(BIN / "mergekit-yaml"), str(config), str(theirs_out), "--quiet"]

        def ours(command=ours_command, output=root / f"{ours_method}_ours.log") -> dict:
            return timed_process(command, output, env=_env(), cwd=REPO)

        def mergekit(command=theirs_command, out=theirs_out, output=root / f"{theirs_method}_mergekit.log") -> dict:
            shutil.rmtree(out, ignore_errors=True)  # mergekit writes into what is there; it starts fresh as ours
            return timed_process(command, output, env=_env(), cwd=REPO)

        median = alternating_medians({"ours": ours, "mergekit": mergekit}, rounds)
        tie = (lambda name: trim_tie(base, models, name, density)) if ours_method == "ties" else None
        results[ours_method] = {**median, **merged_differences(ours_out, theirs_out, base, explained=tie),
                                "method": theirs_method}
    return {"density": density, "k": len(models), **results}


# --- the table's rows ---------------------------------------------------------------------------------

def _met(value: bool) -> str:
    return "yes" if value else "NO"


def _exactness_row(what: str, result: dict, note: str = "") -> tuple:
    """The largest difference against the target; tensors that differ only through a tie at mergekit's
    trim (merged_differences' ``explained``) are shown apart, in the note, and not held to it."""
    tied = result.get("explained") or {}
    diff = result["max_relative_difference"]
    if tied:
        note = (f"{note}; " if note else "") + (f"{len(tied)} tensor(s) with a tie at the k-th magnitude (which "
                                                f"tied entry is kept: argsort vs index order): up to "
                                                f"{max(tied.values()):.1e}, not counted")
    if result.get("missing"):
        note = (f"{note}; " if note else "") + f"{result['missing']} of the reference's tensors not in ours"
    change = result.get("max_relative_to_change")
    reference = f"of the change: {change:.1e}" if change is not None else ""
    return (f"{what}: max relative difference (per tensor, Frobenius)", f"{diff:.1e}", reference, note,
            f"<= {EXACT:.0e}", _met(diff <= EXACT))


def _time_rows(what: str, ours: dict, theirs: dict, their_label: str, target_time: str = "",
               target_memory: str = "") -> list[tuple]:
    ratio = theirs["wall_s"] / ours["wall_s"]
    memory = ours["peak_rss"] / theirs["peak_rss"]
    function = f" (its function alone {theirs['merge_function_s']:.1f})" if "merge_function_s" in theirs else ""
    return [
        (f"{what}: wall s, ours vs {their_label}{function}", f"{ours['wall_s']:.1f}", f"{theirs['wall_s']:.1f}",
         f"{ratio:.2f}x faster", target_time, _met(ratio > 1.0) if target_time else ""),
        (f"{what}: peak RSS MiB, ours vs {their_label}", f"{ours['peak_rss'] / 2**20:.0f}",
         f"{theirs['peak_rss'] / 2**20:.0f}", f"{memory:.2f}x", target_memory,
         _met(memory <= 1.0) if target_memory else ""),
    ]


def rows(results: dict) -> list[tuple]:
    """Table rows (measurement, ours, reference, ratio, target, met) for bench/run.py's table."""
    out: list[tuple] = []
    for key, label, fb in (("ties", "TIES", "FusionBench load + state_dict_to_vector + ties_merging + save"),
                           ("dare", "DARE", "FusionBench load + module_sub_ + module_random_drop_ + state_dict_sum + "
                                            "save")):
        r = results.get(key)
        if r is None:
            continue
        settings = ", ".join(f"{k} {v}" for k, v in r["params"].items() if k != "seed")
        what = f"{label} {r['label']} K={r['k']} ({settings}; --batch-memory {r['batch_memory']})"
        # TIES: where the trimmed task vectors sum to exactly 0 (with some entry not 0), FusionBench elects the
        # sign of the whole model's sum and ours +; only there can the two rules pick differently
        note = f"{r['fusionbench']['zero_sum_parameters']} params with a zero trimmed sum" if key == "ties" \
            else "same drop mask"
        out.append(_exactness_row(f"{what} vs FusionBench", r, note))
        out += _time_rows(f"{what}, after imports", r["ours"], r["fusionbench"], fb)
    if "fisher_estimates" in results:
        e, m = results["fisher_estimates"], results["fisher_merge"]
        what = f"{results['fisher_label']} classifiers K={results['fisher_k']}"
        out.append(_exactness_row(f"Fisher {what}: ours (stats --fisher-estimator batch, sums / examples) vs "
                                  "FusionBench's estimator on the same batches", e,
                                  f"{e['parameters']} arrays, {e['zero']} zero but for rounding; "
                                  f"{e['disputed']} > {EXACT:.0e}"))
        if e["disputed"]:
            exact = e["ours_vs_float64"]
            out.append((f"Fisher {what}: on those, error of ours vs FusionBench's, against its estimator in float64",
                        f"{exact:.1e}", f"{e['fusionbench_vs_float64']:.1e}", "", f"<= {EXACT:.0e}",
                        _met(exact <= EXACT)))
        out.append(_exactness_row(f"Fisher merge {what}: ours vs FusionBench's merging_with_fisher_weights (same "
                                  "Fisher)", m))
        out += _time_rows(f"Fisher merge {what}, after imports", m["ours"], m["fusionbench"],
                          "FusionBench load + merging_with_fisher_weights + save")
    if "fisher_pass" in results:
        f = results["fisher_pass"]
        label = results["fisher_label"]
        n = f["examples"]
        theirs = f["fusionbench_s"] / n
        for key, what in (("ours_batch", "--statistics gram,fisher --fisher-estimator batch"),
                          ("ours_per_example", "--statistics gram,fisher --fisher-estimator per-example")):
            ours = f[f"{key}_s"] / n
            out.append((f"stats {label} classifier: ms/example, ours {what} (Grams and Fisher in one pass) vs "
                        "FusionBench-style Fisher pass (Fisher only, its batch estimator)", f"{1e3 * ours:.1f}",
                        f"{1e3 * theirs:.1f}", f"{theirs / ours:.2f}x faster", "faster", _met(ours < theirs)))
        if "fusionbench_both_s" in f:
            both = f["fusionbench_both_s"] / n
            ours = f["ours_batch_s"] / n
            out.append((f"stats {label} classifier: ms/example, ours --statistics gram,fisher --fisher-estimator "
                        "batch vs FusionBench-style Gram pass + Fisher pass (both statistics, two passes)",
                        f"{1e3 * ours:.1f}", f"{1e3 * both:.1f}", f"{both / ours:.2f}x faster", "", ""))
        alone = f["ours_fisher_only_batch_s"] / n
        out.append((f"stats {label} classifier: ms/example, ours --statistics fisher --fisher-estimator batch "
                    "(Fisher alone) vs FusionBench-style Fisher pass", f"{1e3 * alone:.1f}", f"{1e3 * theirs:.1f}",
                    f"{theirs / alone:.2f}x faster", "", ""))
    if "mergekit" in results:
        r = results["mergekit"]
        for method, label in (("ties", f"TIES (tensor trim, mean, density {r['density']})"), ("average", "average")):
            m = r[method]
            what = f"{label} Llama-shaped K={r['k']}"
            out.append(_exactness_row(f"{what} vs mergekit {m['method']}", m))
            out += _time_rows(f"{what}: whole process", m["ours"], m["mergekit"], f"mergekit-yaml {m['method']}",
                              target_time="faster", target_memory="<= 1.00x")
    return out


def measure(work: Path, minilm: Path, llama_base: Path, llama_root: Path, sizes) -> dict:
    """Every comparison of this module, on bench/run.py's candidates (work/minilm/minilm_I over ``minilm``,
    llama_root/llama_I over ``llama_base``); ``sizes`` chooses which (methods_candidates, fisher_classifier)."""
    rounds = sizes.merge_rounds
    results: dict = {}
    llama_models = {f"llama_{i}": llama_root / f"llama_{i}" for i in range(4)}
    if sizes.methods_candidates == "minilm":
        label, pretrained, models = "MiniLM-L6", minilm, {f"minilm_{i}": work / "minilm" / f"minilm_{i}"
                                                          for i in range(5)}
    else:
        label, pretrained, models = "Llama-shaped", llama_base, llama_models
    for key, compare in (("ties", ties_vs_fusionbench), ("dare", dare_vs_fusionbench)):
        log.info("%s vs FusionBench's own functions: %s x%d", key.upper(), label, len(models))
        results[key] = {**compare(work / "methods", pretrained, models, rounds), "label": label}

    fisher_label = CLASSIFIERS[sizes.fisher_classifier][0]
    log.info("Fisher: %s classifiers x5, stats --statistics gram,fisher --fisher-estimator batch", fisher_label)
    fisher_root = work / "fisher"
    caches, candidates = fisher_candidates(fisher_root, sizes.fisher_classifier, 5, sizes.candidate_examples_minilm,
                                           sizes)
    results.update(fisher_label=fisher_label, fisher_k=len(candidates))
    results["fisher_estimates"] = fisher_estimates(caches, candidates, sizes.candidate_examples_minilm, sizes)
    log.info("Fisher merge vs FusionBench's merging_with_fisher_weights")
    results["fisher_merge"] = fisher_merge_vs_fusionbench(caches, fisher_root, rounds)
    log.info("Fisher stats pass vs FusionBench-style Fisher pass")
    # the candidates' example count: the per-example estimator costs ~3x FusionBench's pass per example
    examples = sizes.candidate_examples_minilm
    task = text_task(fisher_root / "stats_task.jsonl", n=examples, seed=1)
    results["fisher_pass"] = fisher_pass_times(fisher_root / "base", task, examples, sizes, rounds)

    log.info("TIES and average vs mergekit-yaml: Llama-shaped x4")
    results["mergekit"] = mergekit_vs_ours(llama_root / "mergekit", llama_base, llama_models, rounds)
    return results
