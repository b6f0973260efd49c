"""What a RegMean run will need, from a model's config alone: ``regmean plan``.

The model is built on PyTorch's meta device (shapes, no storage), and one forward pass of meta
tensors runs the very hooks the stats stage uses, so the Grams counted here (shared inputs, tied
heads left out) are the ones a real run writes. The merge's solve batches come from the same
planner as ``regmean merge``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import nn

from regmean_pipeline.cache.manifest import LayerEntry
from regmean_pipeline.cache.symmetric import packed_length
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.adapters import ADAPTER_WEIGHTS, is_adapter
from regmean_pipeline.io.weights import adapter_base_dir, open_weights
from regmean_pipeline.measure.fisher import fisher_parameters
from regmean_pipeline.measure.linear import find_linear_layers
from regmean_pipeline.measure.models import (
    forward_inputs,
    load_config,
    model_class,
    parameter_aliases,
    tied_parameter_names,
)
from regmean_pipeline.measure.passes import detect_gram_keys, gram_bytes, gram_groups, plan_passes
from regmean_pipeline.merge.plan import (
    LOADS_AHEAD,
    GramGroup,
    MergeSettings,
    SolveSettings,
    solve_batches,
    system_bytes,
)

log = logging.getLogger(__name__)

# Batches of reads alive at once in the merge: the one being added, those queued ahead, and the anchor's.
PREFETCHED = LOADS_AHEAD + 2


def config_of(reference: str | Path, *, trust_remote_code: bool = False):
    """A transformers config from a model folder, a config.json file, or a hub id (config only)."""
    path = Path(reference).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if "torch_dtype" in data and Version(transformers.__version__) >= Version("4.56"):
                data.setdefault("dtype", data.pop("torch_dtype"))  # the newer name; avoids a deprecation warning
            return transformers.AutoConfig.for_model(**data)
        except (ValueError, KeyError, TypeError) as exc:
            raise RegMeanError(f"{path}: not a transformers config.json ({exc})") from None
    if path.is_dir() or not str(reference).startswith((".", "/", "~")):
        return load_config(path if path.is_dir() else reference, trust_remote_code=trust_remote_code)
    raise RegMeanError(f"--model {reference}: no such file or folder")


def meta_model(config, *, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The candidate's class built on the meta device: every shape, no memory, no weights read."""
    cls = model_class(config, trust_remote_code=trust_remote_code)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _meta_batch(model: nn.Module, config, length: int = 8) -> dict[str, torch.Tensor]:
    accepted = forward_inputs(model)
    if "input_ids" in accepted:
        batch = {"input_ids": torch.zeros(1, length, dtype=torch.long, device="meta")}
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
            batch["decoder_input_ids"] = batch["input_ids"]  # the decoder runs too: its Grams are counted
        return batch
    if "pixel_values" in accepted:
        size = getattr(config, "image_size", 224)
        return {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), size, size, device="meta")}
    raise RegMeanError(f"{type(model).__name__}: takes neither input_ids nor pixel_values; cannot size it")


@dataclass
class RunSizes:
    """Bytes (and counts) of one candidate's stats job and of the merge; see ``table``."""

    architecture: str
    parameters: int
    weight_bytes: int
    linear_layers: int
    grams: int
    cache_bytes: int  # one candidate's Gram arrays on disk (packed upper triangles)
    accumulator_bytes: int  # all of one candidate's accumulators at once
    largest_gram_bytes: int
    stats_passes: int  # passes over the data under gram_budget
    merge_peak_bytes: int  # solve batch working set + reads in flight, or the largest averaged tensor
    output_bytes: int
    candidates: int
    adapter_bytes: int = 0  # a LoRA adapter candidate's own file; its base's weights are weight_bytes
    base_model: str | None = None
    fisher_cache_bytes: int = 0  # --statistics fisher: one float per parameter (on disk and as accumulators)

    def as_dict(self) -> dict:
        return asdict(self)


def stored_apart(model: nn.Module, tied: set[str], folder: Path) -> set[str]:
    """The names among ``tied`` that a local checkpoint holds with values of their own.

    A model built from its config ties what the config says (T5's lm_head and embeddings, for one);
    ``from_pretrained`` unties a pair whose checkpoint tensors differ, and `regmean stats` then measures
    that lm_head as a linear layer of its own. Only a local folder is read, and only those tensors."""
    if not tied or not folder.is_dir():
        return set()
    try:
        weights = open_weights(folder)
        stored = set(weights.names())
    except (RegMeanError, OSError):
        return set()
    aliases = parameter_aliases(model)
    return {name for name in tied & stored
            if aliases[name][0] in stored and not torch.equal(weights.get(name), weights.get(aliases[name][0]))}


def estimate(reference: str | Path, *, candidates: int = 2, dtype: str | None = None,
             accumulate_dtype: torch.dtype = torch.float32, solve_dtype: torch.dtype = torch.float32,
             batch_memory: int = 1 << 30, gram_budget: int | None = None,
             trust_remote_code: bool = False, statistics: tuple[str, ...] = ("gram",)) -> RunSizes:
    if candidates < 1:
        raise RegMeanError(f"--candidates: must be at least 1, got {candidates}")
    adapter = Path(reference).expanduser() if is_adapter(Path(reference).expanduser()) else None
    base_dir = adapter_base_dir(adapter) if adapter is not None else None  # the Grams are the base model's
    config = config_of(base_dir or reference, trust_remote_code=trust_remote_code)
    declared = getattr(config, "dtype", None) if Version(transformers.__version__) >= Version("4.56") \
        else getattr(config, "torch_dtype", None)
    weight_dtype = getattr(torch, dtype or str(declared or "float32").replace("torch.", ""))
    model = meta_model(config, dtype=weight_dtype, trust_remote_code=trust_remote_code)
    tied = tied_parameter_names(model)
    untied = stored_apart(model, tied, base_dir or Path(reference).expanduser())
    tied -= untied
    layers = [layer for layer in find_linear_layers(model) if layer.weight not in tied]
    batch = _meta_batch(model, config)
    try:
        keys = detect_gram_keys(model, batch)
    except Exception as exc:  # a forward that meta tensors cannot run: count every layer on its own
        log.warning("could not trace %s on the meta device (%s); shared inputs are not detected, so the sizes "
                    "are upper bounds", type(model).__name__, str(exc).splitlines()[0] if str(exc) else exc)
        keys = {}
    keys = {name: key for name, key in keys.items() if key in {layer.name for layer in layers}}
    groups = gram_groups(layers, keys)

    element = accumulate_dtype.itemsize
    dims = [members[0].in_features for members in groups.values()]
    parameters = {name: p for name, p in model.named_parameters()}  # tied ones appear once
    saved = set(model.state_dict())
    buffers = {name: b for name, b in model.named_buffers() if name in saved}  # non-persistent ones are not saved
    parameters.update({name: model.get_parameter(name) for name in untied})
    output_bytes = sum(t.numel() * t.element_size() for t in (*parameters.values(), *buffers.values()))
    budget = gram_budget or sum(gram_bytes(d, accumulate_dtype) for d in dims)

    settings = MergeSettings(batch_bytes=batch_memory, solve=SolveSettings(solve_dtype=solve_dtype))
    solve_groups = [GramGroup(key, members[0].in_features,
                              [(layer.name, LayerEntry(key, layer.weight, layer.in_features, layer.out_features,
                                                       layer.transposed)) for layer in members])
                    for key, members in groups.items()]
    weight_element = weight_dtype.itemsize
    peak = 0
    for batch in solve_batches(solve_groups, settings):
        working = len(batch.groups) * system_bytes(batch.dim, batch.width, solve_dtype)
        weights_bytes = len(batch.groups) * batch.dim * batch.width * weight_element
        reads = len(batch.groups) * packed_length(batch.dim) * element + weights_bytes
        # + one batch of solved weights still queued for the output writer (io/background.py)
        peak = max(peak, working + PREFETCHED * reads + weights_bytes)
    solved = {layer.weight for layer in layers if layer.name in keys}
    for name, tensor in parameters.items():
        if name not in solved and tensor.is_floating_point():  # averaged: a float32 total and one read
            peak = max(peak, tensor.numel() * (4 + 2 * tensor.element_size()))
    return RunSizes(
        architecture=type(model).__name__,
        parameters=sum(p.numel() for p in parameters.values()),
        weight_bytes=sum(p.numel() * p.element_size() for p in parameters.values()),
        linear_layers=len(layers),
        grams=len(groups),
        cache_bytes=sum(packed_length(d) * element for d in dims),
        accumulator_bytes=sum(gram_bytes(d, accumulate_dtype) for d in dims),
        largest_gram_bytes=max((gram_bytes(d, accumulate_dtype) for d in dims), default=0),
        stats_passes=len(plan_passes(groups, budget, accumulate_dtype)) if groups else 0,
        merge_peak_bytes=peak,
        output_bytes=output_bytes,
        candidates=candidates,
        adapter_bytes=(adapter / ADAPTER_WEIGHTS).stat().st_size if adapter and (adapter / ADAPTER_WEIGHTS).is_file() else 0,
        base_model=str(base_dir) if base_dir else None,
        fisher_cache_bytes=sum(p.numel() for p in fisher_parameters(model).values()) * element
        if "fisher" in statistics else 0,
    )


def human(size: int) -> str:
    """Decimal units, as disks and object stores bill them."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if size < 1000 or unit == "PB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def table(sizes: RunSizes) -> str:
    """The sizes as a Markdown table: per candidate, and for all K candidates."""
    k = sizes.candidates
    weights = [("candidate weights", human(sizes.weight_bytes), human(k * sizes.weight_bytes))]
    if sizes.base_model:  # adapters: each candidate is its adapter file, over one base read by all
        weights = [("LoRA adapter file", human(sizes.adapter_bytes), human(k * sizes.adapter_bytes)),
                   ("base model weights (shared)", human(sizes.weight_bytes), human(sizes.weight_bytes))]
    rows = [
        *weights,
        ("Gram cache on disk", human(sizes.cache_bytes), human(k * sizes.cache_bytes)),
        ("stats: Gram accumulators", human(sizes.accumulator_bytes), f"{human(sizes.accumulator_bytes)} in each of {k} jobs"),
        ("stats: largest single Gram", human(sizes.largest_gram_bytes), ""),
        *([("Fisher cache on disk (and accumulators)", human(sizes.fisher_cache_bytes),
            human(k * sizes.fisher_cache_bytes))] if sizes.fisher_cache_bytes else []),
        ("merge: peak memory (estimate)", "", human(sizes.merge_peak_bytes)),
        ("merged model on disk", "", human(sizes.output_bytes)),
    ]
    head = (f"{sizes.architecture}: {sizes.parameters / 1e9:.3g}B parameters, {sizes.linear_layers} linear layers, "
            f"{sizes.grams} Grams")
    if sizes.stats_passes > 1:
        head += f"; {sizes.stats_passes} passes over the data under --max-gram-memory"
    if sizes.base_model:
        head += f"; LoRA adapter candidates of {sizes.base_model} (Grams and cache are the base model's)"
    lines = [head, "", f"| | per candidate | {k} candidates |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {one} | {all_} |" for name, one, all_ in rows]
    return "\n".join(lines)



@dataclass
class BlockwiseSizes:
    """What a RegMean++ run holds (``regmean plan --method regmean++``): hidden states and one block."""

    architecture: str
    stack: str
    blocks: int
    candidates: int
    examples: int  # per candidate
    tokens_per_example: int  # at most: texts are truncated to it, shorter ones are not padded to it
    hidden_size: int
    activation_bytes: int  # every candidate's hidden states between two blocks, at most
    activation_memory: int  # the --activation-memory budget
    spill_bytes: int  # what goes to the spill folder beyond the budget, at most
    block_weight_bytes: int  # the largest block, in the forward dtype (one is loaded at a time)
    block_gram_bytes: int  # its Gram accumulators, for all candidates (held until the block is solved)
    outside_stack_bytes: int  # embeddings and heads, loaded once

    def as_dict(self) -> dict:
        return asdict(self)


def blockwise_estimate(reference: str | Path, *, candidates: int = 2, num_examples: int = 256,
                       max_length: int | None = None, dtype: torch.dtype = torch.float32,
                       accumulate_dtype: torch.dtype = torch.float32, activation_memory: int = 4 << 30,
                       trust_remote_code: bool = False) -> BlockwiseSizes:
    """Sizes of a RegMean++ run from the config alone, the model built on the meta device."""
    from regmean_pipeline.plusplus.stack import find_block_stack

    if candidates < 1 or num_examples < 1:
        raise RegMeanError("--candidates/--num-examples: must be at least 1")
    config = config_of(reference, trust_remote_code=trust_remote_code)
    model = meta_model(config, dtype=dtype, trust_remote_code=trust_remote_code)
    stack = find_block_stack(model)
    blocks = model.get_submodule(stack.path)
    element = dtype.itemsize
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size"))
    if "pixel_values" in forward_inputs(model) and "input_ids" not in forward_inputs(model):
        tokens = (config.image_size // config.patch_size) ** 2 + 1  # patches and the class token
    else:
        tokens = max_length or getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", 512)
    activation = candidates * num_examples * tokens * hidden * element
    index = max(range(len(blocks)), key=lambda i: sum(p.numel() for p in blocks[i].parameters()))
    largest = blocks[index]
    accumulator = accumulate_dtype.itemsize
    try:  # layers fed one input share one Gram, as a real run finds them
        keys = detect_gram_keys(model, _meta_batch(model, config))
    except Exception:  # a forward that meta tensors cannot run: count every layer on its own (an upper bound)
        keys = {}
    prefix = stack.block_prefix(index)
    grams = {keys.get(prefix + layer.name, layer.name): layer.in_features for layer in find_linear_layers(largest)}
    stack_parameters = {id(p) for p in blocks.parameters()}
    return BlockwiseSizes(
        architecture=type(model).__name__, stack=stack.path, blocks=stack.length, candidates=candidates,
        examples=num_examples, tokens_per_example=int(tokens), hidden_size=hidden, activation_bytes=activation,
        activation_memory=activation_memory, spill_bytes=max(0, activation - activation_memory),
        block_weight_bytes=sum(p.numel() for p in largest.parameters()) * element,
        block_gram_bytes=candidates * sum(d * d * accumulator for d in grams.values()),
        outside_stack_bytes=sum(p.numel() for p in model.parameters() if id(p) not in stack_parameters) * element,
    )


def blockwise_table(sizes: BlockwiseSizes) -> str:
    k = sizes.candidates
    rows = [
        ("hidden states between two blocks (at most)", human(sizes.activation_bytes // k), human(sizes.activation_bytes)),
        ("  kept in memory (--activation-memory)", "", human(min(sizes.activation_bytes, sizes.activation_memory))),
        ("  spilled to disk (at most)", "", human(sizes.spill_bytes)),
        ("one block's weights (largest)", human(sizes.block_weight_bytes), ""),
        ("one block's Gram accumulators", human(sizes.block_gram_bytes // k), human(sizes.block_gram_bytes)),
        ("embeddings and heads (outside the stack)", human(sizes.outside_stack_bytes), ""),
    ]
    head = (f"{sizes.architecture}, RegMean++: {sizes.blocks} blocks in {sizes.stack}; {k} candidates x "
            f"{sizes.examples} examples x at most {sizes.tokens_per_example} tokens x hidden {sizes.hidden_size}")
    lines = [head, "", f"| | per candidate | {k} candidates |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {one} | {all_} |" for name, one, all_ in rows]
    return "\n".join(lines)
