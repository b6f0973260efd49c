"""The LLM walk-through's material, built here: a tiny Llama base, three chat tasks, one LoRA adapter each.

``python -m demos.llm --out DIR`` writes DIR/base (a tiny Llama pretrained briefly on generic chat),
DIR/tasks/{sentiment,topic,question} (chat task folders over one kind of input, each asking another
question of it; see regmean_pipeline.testing.chat_example) and DIR/adapters/{sentiment,topic,question}
(peft LoRA adapters of the base, each trained on one task's assistant tokens). The regmean commands then merge and score them
(Makefile target ``llm-demo``, docs/llm.md). Everything is seeded; reruns reuse what is there.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from demos.sweep_summary import summary as sweep_summary
from regmean_pipeline.measure.chat import ChatEncoder
from regmean_pipeline.tasks.validation import split_off_validation
from regmean_pipeline.testing import CHAT_TASKS, WORDS, make_chat_tokenizer, tiny_config, write_chat_task

log = logging.getLogger("demos.llm")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@dataclass
class Recipe:
    """Sizes and steps; the defaults are the docs' walk-through (minutes on a 2-core CPU)."""

    hidden: int = 64
    layers: int = 2
    base_steps: int = 200
    adapter_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-2
    rank: int = 32
    n_train: int = 512
    n_test: int = 128
    seed: int = 0
    stats_examples: int = 256  # examples per adapter for its Grams and Fisher
    scalings: list[float] = field(default_factory=lambda: [0.3, 1.0])  # task arithmetic's lambdas
    validation_fraction: float = 0.1  # training rows held out as each task's validation split (the sweep's)


def generic_conversations(n: int, rng: random.Random) -> list[list[dict]]:
    """Pretraining chat without a task: the assistant answers random words with a random word."""
    def words(count: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(count))
    return [[{"role": "user", "content": words(rng.randint(2, 8))}, {"role": "assistant", "content": words(1)}]
            for _ in range(n)]


def train(model: torch.nn.Module, tokenizer, conversations: list[list[dict]], *, steps: int, batch_size: int,
          learning_rate: float, seed: int, desc: str) -> float:
    """AdamW on the loss of the assistant's tokens; returns the mean loss of the last 20 steps."""
    encoded = ChatEncoder(tokenizer).encode(conversations)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        batch = [encoded[generator.randrange(len(encoded))] for _ in range(batch_size)]
        width = max(len(e.ids) for e in batch)
        ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in batch])
        mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in batch])
        labels = torch.tensor([[t if r else -100 for t, r in zip(e.ids, e.response)] + [-100] * (width - len(e.ids))
                               for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("%s: step %d, loss %.3f", desc, step + 1, sum(losses[-20:]) / len(losses[-20:]))
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def build_base(folder: Path, recipe: Recipe) -> Path:
    if (folder / "config.json").exists():
        return folder
    config = tiny_config("llama_causal", hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
                         intermediate_size=2 * recipe.hidden)
    torch.manual_seed(recipe.seed)
    model = transformers.LlamaForCausalLM(config)
    tokenizer = make_chat_tokenizer(folder)
    data = generic_conversations(recipe.n_train, random.Random(recipe.seed))
    loss = train(model, tokenizer, data, steps=recipe.base_steps, batch_size=recipe.batch_size,
                 learning_rate=recipe.learning_rate, seed=recipe.seed, desc="base")
    model.save_pretrained(folder)
    (folder / "pretraining.json").write_text(json.dumps({"recipe": asdict(recipe), "final_loss": loss}, indent=1))
    return folder


def train_adapter(base: Path, task: Path, folder: Path, recipe: Recipe) -> Path:
    """A LoRA adapter of the base on one task, saved by peft (its config names the base's folder)."""
    import peft

    if (folder / "adapter_config.json").exists():
        return folder
    torch.manual_seed(recipe.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=recipe.rank, lora_alpha=2 * recipe.rank, lora_dropout=0.0,
                                                      target_modules=LORA_TARGETS))
    # The rows held out (written as the task's validation.jsonl, what `regmean sweep` scores) are not trained on.
    kept, _ = split_off_validation(task, recipe.validation_fraction, recipe.seed)
    rows = [json.loads(line)["messages"] for line in (task / "train.jsonl").read_text().splitlines()]
    data = [rows[i] for i in kept]
    loss = train(lora, tokenizer, data, steps=recipe.adapter_steps, batch_size=recipe.batch_size,
                 learning_rate=recipe.learning_rate, seed=recipe.seed, desc=f"adapter {task.name}")
    lora.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"recipe": asdict(recipe), "final_loss": loss}, indent=1))
    return folder


def prepare(out: Path, recipe: Recipe) -> dict[str, Path]:
    """Base, tasks and adapters under ``out``; returns their folders."""
    out = Path(out)
    base = build_base(out / "base", recipe)
    folders = {"base": base}
    for name in CHAT_TASKS:
        task = out / "tasks" / name
        if not (task / "task.json").exists():
            write_chat_task(task, name, n_train=recipe.n_train, n_test=recipe.n_test, seed=recipe.seed)
        folders[name] = train_adapter(base.resolve(), task, out / "adapters" / name, recipe)
    return folders


def regmean(*args: str | Path | float) -> None:
    """Run one regmean command in this process, as typed on the command line (and printed so)."""
    import click

    from stages.cli import app

    words = [str(a) for a in args]
    log.info("$ regmean %s", shlex.join(words))
    try:
        app(words + ["--quiet"], standalone_mode=False)
    except click.exceptions.Exit as exc:
        if exc.exit_code:
            raise SystemExit(f"regmean {words[0]} failed (exit status {exc.exit_code})") from None


def run(out: Path, recipe: Recipe, *, device: str = "cpu") -> dict:
    """The whole walk-through; returns eval's results (also in OUT/eval/results.json and results.md)."""
    out = Path(out)
    prepare(out, recipe)
    merged = out / "merged"
    for tokens, caches, target in (("all", "caches", "regmean"), ("response", "caches-response", "regmean_response")):
        for name in CHAT_TASKS:
            regmean("stats", "--model", out / "adapters" / name, "--dataset", out / "tasks" / name / "train.jsonl",
                    "--messages-column", "messages", "--tokens", tokens, "--num-examples", recipe.stats_examples,
                    "--statistics", "gram,fisher", "--device", device, "--out", out / caches / name, "--overwrite")
        regmean("merge", "--cache-dir", out / caches, "--out", merged / target, "--device", device, "--overwrite")
    # Each adapter's Gram divided by its trace: every adapter weighs the same in every layer (docs/llm.md).
    regmean("merge", "--cache-dir", out / "caches", "--gram-weighting", "trace", "--out", merged / "regmean_trace",
            "--device", device, "--overwrite")
    # RegMean++: the same adapters and examples, each block measured on the merged model's own hidden states.
    pairs = [arg for name in CHAT_TASKS for arg in ("--model", f"{name}={out / 'adapters' / name}",
                                                    "--dataset", f"{name}={out / 'tasks' / name / 'train.jsonl'}")]
    regmean("merge", "--method", "regmean++", *pairs, "--messages-column", "messages", "--num-examples",
            recipe.stats_examples, "--out", merged / "regmean_plusplus", "--device", device, "--overwrite")
    regmean("merge", "--method", "average", "--cache-dir", out / "caches", "--out", merged / "average",
            "--device", device, "--overwrite")
    for scaling in recipe.scalings:
        regmean("merge", "--method", "task-arithmetic", "--pretrained", out / "base", "--scaling", scaling,
                "--cache-dir", out / "caches", "--out", merged / f"task_arithmetic_{scaling}", "--device", device,
                "--overwrite")
    # TIES at FusionBench's defaults, and Fisher merging with the Fisher of the responses' tokens.
    regmean("merge", "--method", "ties", "--pretrained", out / "base", "--cache-dir", out / "caches",
            "--out", merged / "ties", "--device", device, "--overwrite")
    regmean("merge", "--method", "fisher", "--cache-dir", out / "caches-response", "--out", merged / "fisher",
            "--device", device, "--overwrite")
    # The merge chosen on the tasks' validation splits, over the default grid (every point scored on test too,
    # for the walk-through's report only).
    regmean("sweep", "--cache-dir", out / "caches-response", *[f"--task={name}={out / 'tasks' / name}"
                                                               for name in CHAT_TASKS],
            "--pretrained", out / "base", "--score-test", "--device", device, "--out", out / "sweep")
    methods = [f"base={out / 'base'}", f"individual={out / 'adapters'}", f"average={merged / 'average'}"]
    methods += [f"task-arithmetic-{s}={merged / f'task_arithmetic_{s}'}" for s in recipe.scalings]
    methods += [f"ties={merged / 'ties'}", f"fisher={merged / 'fisher'}"]
    methods += [f"regmean={merged / 'regmean'}", f"regmean-response-tokens={merged / 'regmean_response'}",
                f"regmean-trace={merged / 'regmean_trace'}", f"regmean++={merged / 'regmean_plusplus'}",
                f"sweep={out / 'sweep' / 'best'}"]
    regmean("eval", *[f"--task={out / 'tasks' / name}" for name in CHAT_TASKS],
            *[f"--method={method}" for method in methods], "--reference", "individual", "--device", device,
            "--out", out / "eval", "--overwrite", "--reuse-scores",
            "--title", "Three LoRA adapters of a tiny Llama merged into one model: response loss per task")
    log.info("\n%s", (out / "eval" / "results.md").read_text())
    results = json.loads((out / "eval" / "results.json").read_text())
    log.info("%s", sweep_summary(json.loads((out / "sweep" / "sweep.json").read_text()), results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    for name, value in asdict(Recipe()).items():
        if isinstance(value, list):
            parser.add_argument(f"--{name.replace('_', '-')}", type=float, nargs="+", default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)  # the regmean commands reset the root logger's level to their own
    out, device = args.pop("out"), args.pop("device")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    run(out, Recipe(**args), device=device)


if __name__ == "__main__":
    main()
