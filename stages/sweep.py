"""`regmean sweep`: merge the candidates at every point of a grid, score each merge on the tasks' validation
splits (never on their test splits), and publish the best as `regmean merge` writes it.

The caches are measured once; each point is a merge. The RegMean points read every cache once together
(merge/shared_solves.py); the others are merges of their own. Each point's merge lives in a scratch folder
only while it is scored. OUT/sweep.json is rewritten after every point, so a killed sweep resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.atomic import output_lock
from regmean_pipeline.io.model_folder import copy_model_files, write_json
from regmean_pipeline.io.safetensors_io import ShardedCheckpointWriter
from regmean_pipeline.io.weights import fingerprint, open_weights, resolve_model_dir
from regmean_pipeline.measure.models import resolve_device
from regmean_pipeline.merge.methods.base import resolve_params
from regmean_pipeline.merge.methods.registry import get_method, parameter_index
from regmean_pipeline.merge.methods.regmean import solve_settings
from regmean_pipeline.merge.plan import MergeSettings, exclusion, plan_merge
from regmean_pipeline.merge.shared_solves import execute_regmean_points
from regmean_pipeline.sweep import report
from regmean_pipeline.sweep.book import SweepBook, key_of
from regmean_pipeline.sweep.grid import Point, default_points, read_grid
from regmean_pipeline.sweep.objective import OBJECTIVES, objective_value
from regmean_pipeline.sweep.scoring import rows_of, score
from regmean_pipeline.tasks.task_folder import VALIDATION, ChatTask, load_task
from regmean_pipeline.tasks.validation import VALIDATION_FILE, file_digest, trained_rows_seen_in
from stages.finetune import read_record
from stages.merge import open_candidates, run_merge
from stages.merge_options import MergeOptions
from stages.publish import sizes

log = logging.getLogger(__name__)

SWEEP_NAME, TABLE_NAME, CHART_NAME, BEST_DIR, SCRATCH_DIR = "sweep.json", "sweep.md", "sweep.png", "best", ".points"


@dataclass
class SweepOptions:
    out: str
    tasks: dict[str, str]  # candidate name -> its task folder (validation.jsonl scores the merges)
    merge: MergeOptions  # the candidates and what every merge shares (caches, pretrained, exclude, ...)
    grid: str | None = None  # a grid file; None: the default grid (sweep/grid.py)
    objective: str = "normalized"
    batch_size: int = 64  # evaluation
    max_length: int = 64
    score_test: bool = False  # also score every point on the test split, for reporting only
    overwrite: bool = False
    progress: bool = True
    datasets: dict[str, str] = field(default_factory=dict)  # regmean++ points: each candidate's examples


@dataclass
class _Context:
    options: SweepOptions
    tasks: list
    candidates: list
    validation: dict
    test: dict
    device: object
    excluded: object
    base_key: dict


def run_sweep(options: SweepOptions) -> dict:
    out = Path(options.out)
    with output_lock(out):
        return _run(options, out)


def _run(options: SweepOptions, out: Path) -> dict:
    started = time.perf_counter()
    if options.objective not in OBJECTIVES:
        raise RegMeanError(f"--objective: {options.objective!r} is not one of {', '.join(OBJECTIVES)}")
    _check_out(out, options.overwrite)
    context = _context(options)
    points = _points(options, context)
    book = SweepBook(out / SWEEP_NAME, fresh=options.overwrite)
    own = _individual(context, book)
    entries = _scored_points(points, context, book, own, out / SCRATCH_DIR)
    shutil.rmtree(out / SCRATCH_DIR, ignore_errors=True)
    best = max(range(len(entries)), key=lambda i: entries[i]["objective"])
    sweep = {**book.data, "tasks": [t.name for t in context.tasks], "objective": options.objective,
             "grid": options.grid or "default", "points": entries, "best": best,
             "individual_validation": own["validation"], "individual_test": own.get("test"),
             "validation": {t.name: {"file": str(t.split_file(VALIDATION)), "rows": len(context.validation[t.name]),
                                     "sha256": file_digest(t.split_file(VALIDATION))} for t in context.tasks}}
    sweep["best_merge"] = _publish_best(entries[best], sweep, context, out)
    sweep["seconds"] = time.perf_counter() - started
    write_json(out / SWEEP_NAME, sweep)
    (out / TABLE_NAME).write_text(report.table(sweep) + "\n")
    report.chart(sweep, out / CHART_NAME)
    log.info("sweep: %d points, best #%d (%s) with objective %.4f -> %s", len(entries), best,
             entries[best]["label"], entries[best]["objective"], out / BEST_DIR)
    return sweep


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RegMeanError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_NAME).exists() and not overwrite:
        raise RegMeanError(f"--out {out}: exists and holds no sweep; pass --overwrite to replace it")
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _context(options: SweepOptions) -> _Context:
    """Tasks, candidates and every check that needs no merge: a task per candidate, its validation split,
    labels matching its head, no validation row a candidate trained on."""
    if not options.tasks:
        raise RegMeanError("--task: give NAME=TASK_FOLDER for every candidate")
    tasks = [load_task(folder, kinds=("classification", ChatTask.kind)) for folder in options.tasks.values()]
    tasks = [dataclasses.replace(task, name=name) for name, task in zip(options.tasks, tasks)]
    candidates = open_candidates(options.merge, get_method("average"))
    names = [c.name for c in candidates]
    if sorted(names) != sorted(options.tasks):
        raise RegMeanError(f"--task: give exactly one task per candidate (candidates: {', '.join(names)}; tasks: "
                           f"{', '.join(options.tasks)})")
    by_name = {c.name: c for c in candidates}
    for task in tasks:
        task.split_file(VALIDATION)  # present, else one line naming the task
        seen = trained_rows_seen_in(task.folder, read_record(by_name[task.name].model_dir),
                                    f"candidate {task.name}") if by_name[task.name].model_dir else 0
        if seen:
            raise RegMeanError(f"task {task.name}: {seen} rows of {task.folder / VALIDATION_FILE} are rows candidate "
                               f"{task.name} was trained on; validation rows must be held out (`regmean finetune "
                               "--validation-fraction`)")
    validation = {task.name: rows_of(task, VALIDATION) for task in tasks}
    test = {task.name: rows_of(task, "test") for task in tasks} if options.score_test else {}
    merge = options.merge
    base_key = {"candidates": {c.name: _candidate_key(c) for c in candidates}, "coefficients": merge.coefficients,
                "exclude": merge.exclude, "pretrained": _weights_key(merge.pretrained), "base": merge.base,
                "datasets": options.datasets,
                "validation": {t.name: file_digest(t.split_file(VALIDATION)) for t in tasks},
                "eval": {"batch_size": options.batch_size, "max_length": options.max_length}}
    return _Context(options, tasks, candidates, validation, test, resolve_device(merge.device),
                    exclusion(merge.exclude), base_key)


def _candidate_key(candidate) -> dict:
    manifest = candidate.stats.manifest if candidate.stats is not None else None
    arrays = {statistic: [entry.checksum for entry in manifest.entries(statistic).values()]
              for statistic in manifest.statistics} if manifest else {}
    return {"weights": fingerprint(candidate.weights), "statistics": key_of(arrays) if arrays else None}


def _weights_key(reference: str | None) -> str | None:
    return fingerprint(open_weights(resolve_model_dir(reference))) if reference else None


def _points(options: SweepOptions, context: _Context) -> list[Point]:
    held = set.intersection(*[set(c.stats.manifest.statistics) if c.stats else set() for c in context.candidates])
    points = read_grid(options.grid) if options.grid else \
        default_points(statistics=held, pretrained=bool(options.merge.pretrained), data=bool(options.datasets))
    if not points:
        raise RegMeanError("the default grid has no method these candidates allow: give caches (`regmean stats`), "
                           "--pretrained, or a --grid")
    return points


def _individual(context: _Context, book: SweepBook) -> dict:
    """Each candidate's own scores on its task (once; kept in sweep.json for a rerun)."""
    key = key_of(context.base_key["candidates"], context.base_key["validation"], context.base_key["eval"],
                 bool(context.test))
    known = book.individual(key)
    if known is not None:
        return known
    scores = {"validation": {}, "test": {}}
    for task in context.tasks:
        candidate = next(c for c in context.candidates if c.name == task.name)
        for split, rows in (("validation", context.validation), ("test", context.test)):
            if task.name in rows:
                scores[split][task.name] = _score(context, task, rows[task.name], candidate.model_dir, None,
                                                  f"{task.name} (own)")
    book.record_individual(key, scores)
    return scores


def _score(context: _Context, task, rows, model_folder, merged, desc: str) -> dict:
    options = context.options
    return score(task, rows, model_folder=model_folder, merged=merged, excluded=context.excluded,
                 device=context.device, batch_size=options.batch_size, max_length=options.max_length,
                 progress=options.progress, desc=desc)


def _scored_points(points: list[Point], context: _Context, book: SweepBook, own: dict, scratch: Path) -> list[dict]:
    """Every point's validation scores and objective: earlier runs' as recorded, the rest merged and scored."""
    keys = [key_of(context.base_key, point.as_dict()) for point in points]
    pending = [i for i, key in enumerate(keys) if book.earlier(key) is None]
    log.info("sweep: %d points, %d already scored", len(points), len(points) - len(pending))
    with tqdm(total=len(pending), desc="sweep: points", unit="point", disable=not context.options.progress) as bar:
        regmean = [i for i in pending if points[i].method == "regmean"]
        if regmean:
            folders = _shared_regmean_merges([points[i] for i in regmean], context, scratch)
            for i, folder in zip(regmean, folders):
                _score_point(points[i], keys[i], folder, context, book, own)
                bar.update()
        for i in pending:
            if points[i].method == "regmean":
                continue
            folder = scratch / f"point-{i}"
            run_merge(_merge_options(context, points[i].method, points[i].params, folder, progress=False))
            _score_point(points[i], keys[i], folder, context, book, own)
            bar.update()
    # the objective from the recorded scores: a rerun with another --objective needs no merge
    recorded = [book.earlier(key) for key in keys]
    return [{**r, "objective": objective_value(r["validation"], own["validation"], context.options.objective)}
            for r in recorded]


def _score_point(point: Point, key: str, folder: Path, context: _Context, book: SweepBook, own: dict) -> None:
    validation, test = {}, {}
    for task in context.tasks:
        model_folder = next(c.model_dir for c in context.candidates if c.name == task.name)
        validation[task.name] = _score(context, task, context.validation[task.name], model_folder, folder,
                                       f"{point.method}/{task.name}")
        if context.test:
            test[task.name] = _score(context, task, context.test[task.name], model_folder, folder,
                                     f"{point.method}/{task.name} (test)")
    book.record(point, key, {"validation": validation, **({"test": test} if test else {})})
    shutil.rmtree(folder, ignore_errors=True)


def _shared_regmean_merges(points: list[Point], context: _Context, scratch: Path) -> list[Path]:
    """The RegMean points merged together, reading every cache once; each into its own scratch folder."""
    folders = [scratch / f"regmean-{i}" for i in range(len(points))]
    merge_regmean_points(context.candidates, [p.params for p in points], context.options.merge, folders,
                         context.device, progress=context.options.progress)
    return folders


def merge_regmean_points(candidates: list, params: list[dict], merge: MergeOptions, folders: list[Path], device,
                         *, progress: bool = True) -> None:
    """RegMean at each of ``params`` (config keys), reading every cache once: each point a model folder."""
    method = get_method("regmean")
    solves = [solve_settings(resolve_params(method, p, parameter_index(), style="key")) for p in params]
    max_shard, batch_bytes = sizes(merge)
    # every weighting holds two sets of sums (at ratios 1 and 0), and one point is solved at a time
    share = 2 * len({(s.gram_weighting, s.solve_dtype) for s in solves}) + 1
    settings = MergeSettings(list(merge.exclude), max(1, batch_bytes // share), solves[0], "gram", "regmean")
    base = open_weights(resolve_model_dir(merge.base), allow_pickle=merge.allow_pickle) if merge.base else None
    plan = plan_merge(candidates, settings, base=base)
    writers = []
    try:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            writers.append(ShardedCheckpointWriter(folder, plan.outputs, max_shard))
        execute_regmean_points(plan, candidates, solves, [w.write for w in writers], device=device, base=base,
                               progress=progress)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    source = resolve_model_dir(merge.base) if merge.base else candidates[0].model_dir
    for folder in folders:
        copy_model_files(source, folder, base_dir=None if merge.base else
                         getattr(candidates[0].weights, "base_dir", None))


def _publish_best(best: dict, sweep: dict, context: _Context, out: Path) -> str:
    """The chosen point made again by `regmean merge` into OUT/best (with per-candidate models where the tasks
    have heads), its card saying it was chosen by this sweep."""
    run_merge(_merge_options(context, best["method"], dict(best["settings"]), out / BEST_DIR,
                             per_candidate=any(not isinstance(t, ChatTask) for t in context.tasks),
                             chosen_by=report.card_text(sweep)))
    return str(out / BEST_DIR)


def _merge_options(context: _Context, method: str, params: dict, out: Path, **changes) -> MergeOptions:
    """The sweep's shared merge options for one point: --pretrained for the methods that use it; a method
    that reads data while merging gets each candidate's model and examples instead of the caches."""
    needs = get_method(method).needs
    merge = dataclasses.replace(context.options.merge, **{
        "out": str(out), "method": method, "params": dict(params), "overwrite": True, "config_params": {},
        "per_candidate": False, "pretrained": context.options.merge.pretrained if needs.pretrained else None,
        **changes})
    if needs.data:
        merge = dataclasses.replace(merge, cache_dir=None, caches=[],
                                    models={c.name: c.reference or str(c.model_dir) for c in context.candidates},
                                    params={**merge.params, "datasets": context.options.datasets})
    return merge
