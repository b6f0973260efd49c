"""Plan a merge before doing it: validate every candidate, then lay out the solve batches.

Everything that can be checked from manifests, safetensors headers and sampled fingerprints is
checked here, so a mismatch stops the merge in seconds rather than halfway through the solves.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from regmean_pipeline.cache.manifest import LayerEntry, Manifest
from regmean_pipeline.cache.symmetric import packed_length
from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.safetensors_io import TensorSpec
from regmean_pipeline.io.weights import WeightSource, fingerprint

log = logging.getLogger(__name__)

GRAM_WEIGHTINGS = ("equal", "tokens", "trace")


class StatsSource(Protocol):
    """A candidate's measured statistics: the manifest plus each stored array on demand (a cache folder,
    its shards, or memory)."""

    manifest: Manifest

    def read(self, statistic: str, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """One stored array of a statistic, flat (a Gram's packed upper triangle; a Fisher's values), into
        ``out`` (of the accumulation dtype) when given."""


@dataclass
class Candidate:
    name: str
    stats: StatsSource | None  # None for the methods that read no statistics
    weights: WeightSource
    coefficient: float = 1.0
    model_dir: Path | None = None
    where: str = ""  # the cache's location, for messages
    reference: str = ""  # the weights as the user or the cache named them (a path or a hub id), for records


@dataclass
class SolveSettings:
    """RegMean's closed-form solve of every linear layer (merge/systems.py, merge/solve.py)."""

    reduce_non_diagonal_ratio: float = 0.95
    gram_weighting: str = "equal"
    solve_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not 0.0 <= self.reduce_non_diagonal_ratio <= 1.0:
            raise RegMeanError(f"--reduce-non-diagonal-ratio: must lie in [0, 1], got {self.reduce_non_diagonal_ratio}")
        if self.gram_weighting not in GRAM_WEIGHTINGS:
            raise RegMeanError(f"--gram-weighting: {self.gram_weighting!r} is not one of {GRAM_WEIGHTINGS}")
        if self.solve_dtype not in (torch.float32, torch.float64):
            raise RegMeanError(f"--solve-dtype: must be float32 or float64, got {self.solve_dtype}")

    def gram_scale(self, coefficient: float, own_tokens: int, all_tokens: int, trace: float | None = None) -> float:
        """A candidate's factor on its Gram sum: equal weighting divides each sum by its own token count
        (FusionBench's mean); tokens weighting, by the total of every candidate's; trace weighting, by the
        sum's trace, so that each candidate weighs the same in every layer whatever its activations' scale
        (``trace`` is needed then; a zero trace, inputs that were all zero, counts as 1)."""
        if self.gram_weighting == "trace":
            return coefficient / (trace or 1.0)
        return coefficient / (all_tokens if self.gram_weighting == "tokens" else own_tokens)


@dataclass
class MergeSettings:
    exclude: list[str] = field(default_factory=list)
    batch_bytes: int = 1 << 30  # bound on one solve batch's working memory
    solve: SolveSettings | None = None  # None: no layer is solved (the method combines every parameter)
    statistic: str | None = None  # what every candidate's cache must hold ("gram" when solving)
    method: str = "regmean"  # for messages


@dataclass
class GramGroup:
    """Layers fed one input: one system, their weights side by side as the right-hand side."""

    key: str
    dim: int
    layers: list[tuple[str, LayerEntry]]

    @property
    def width(self) -> int:
        return sum(layer.out_features for _, layer in self.layers)


@dataclass
class SolveBatch:
    dim: int
    width: int
    groups: list[GramGroup]


@dataclass
class MergePlan:
    batches: list[SolveBatch]
    averaged: list[str]
    copied: list[str]
    outputs: list[TensorSpec]
    unsolved_layers: dict[str, str]  # linear weights not solved by RegMean -> why

    @property
    def num_systems(self) -> int:
        return sum(len(batch.groups) for batch in self.batches)


def compile_excludes(patterns: list[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise RegMeanError(f"--exclude {pattern!r}: not a valid regular expression ({exc})") from None
    return compiled


def exclusion(patterns: list[str]) -> Callable[[str], bool]:
    """Whether a parameter name is kept out of the merge (any pattern re.match-es it)."""
    compiled = compile_excludes(patterns)
    return lambda name: any(pattern.match(name) for pattern in compiled)


def plan_merge(candidates: list[Candidate], settings: MergeSettings, *, base: WeightSource | None = None,
               check_fingerprints: bool = True) -> MergePlan:
    if not candidates:
        raise RegMeanError("no candidates to merge: give --cache-dir with one stats cache per subfolder, or --cache")
    seen: dict[str, Candidate] = {}
    for candidate in candidates:
        check_candidate_name(candidate.name)
        if candidate.name in seen:
            raise RegMeanError(f"candidate name {candidate.name!r} is used twice ({seen[candidate.name].where} and "
                               f"{candidate.where}); give each cache folder its own name")
        seen[candidate.name] = candidate
        if candidate.coefficient <= 0:
            raise RegMeanError(f"candidate {candidate.name}: coefficient must be positive, got {candidate.coefficient}")
    first = candidates[0]
    excluded = exclusion(settings.exclude)
    if settings.statistic is not None:
        for candidate in candidates:
            check_statistic(candidate, settings.statistic, settings.method)
        _check_models(candidates, check_fingerprints)
    names = first.weights.names()
    _check_parameters(candidates, names, excluded)
    copy_source = base or first.weights
    copied = [name for name in names if excluded(name)]
    for name in copied:
        if name not in copy_source.names():
            raise RegMeanError(f"--base {copy_source.reference}: has no parameter {name}, which is excluded from the merge")

    solving = settings.solve is not None and settings.statistic == "gram"  # (RegMean++ solves per block itself)
    groups, unsolved = _gram_groups(candidates, names, excluded) if solving else ([], {})
    solved = {layer.weight for group in groups for _, layer in group.layers}
    averaged = [name for name in names if name not in solved and not excluded(name)]
    outputs = [TensorSpec(name, (copy_source if excluded(name) else first.weights).dtype(name),
                          (copy_source if excluded(name) else first.weights).shape(name)) for name in names]
    plan = MergePlan(solve_batches(groups, settings), averaged, copied, outputs, unsolved)
    log.info("plan: %d candidates, %d systems in %d batches, %d averaged and %d copied parameters",
             len(candidates), plan.num_systems, len(plan.batches), len(averaged), len(copied))
    return plan


def check_statistic(candidate: Candidate, statistic: str, method: str) -> None:
    """The candidate's cache must hold the statistic the method reads; say what to run when it does not."""
    held = candidate.stats.manifest.statistics if candidate.stats is not None else []
    if statistic in held:
        return
    command = "regmean stats" + ("" if statistic == "gram" else f" --statistics {','.join([*held, statistic])}")
    if candidate.stats is None:
        raise RegMeanError(f"candidate {candidate.name}: has no stats cache; --method {method} needs one per "
                           f"candidate holding its {statistic} statistic (run `{command}`)")
    raise RegMeanError(f"candidate {candidate.name}: its cache {candidate.where} holds {', '.join(held)} but not "
                       f"{statistic}, which --method {method} reads; run `{command}` for it")


def check_candidate_name(name: str) -> None:
    """Candidate names end up in reports and file names: plain names only, never a path."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise RegMeanError(f"candidate name {name!r}: must be a plain name (no path separators, not '.' or '..')")


def _check_models(candidates: list[Candidate], check_fingerprints: bool) -> None:
    first = candidates[0]
    architecture = first.stats.manifest.model["architecture"]
    for candidate in candidates:
        manifest = candidate.stats.manifest
        if manifest.model["architecture"] != architecture:
            raise RegMeanError(f"candidate {candidate.name} ({candidate.where}): architecture "
                               f"{manifest.model['architecture']}, but {first.name} is {architecture}")
        theirs, ours = manifest.model.get("config"), first.stats.manifest.model.get("config")
        for key in sorted(theirs.keys() & ours.keys()) if isinstance(theirs, dict) and isinstance(ours, dict) else []:
            if theirs[key] != ours[key]:
                raise RegMeanError(f"candidate {candidate.name} ({candidate.where}): {key} = {theirs[key]!r}, but "
                                   f"{first.name} has {ours[key]!r}; all candidates must share one architecture")
        if check_fingerprints:
            found = fingerprint(candidate.weights)
            if found != manifest.model["fingerprint"]:
                raise RegMeanError(f"candidate {candidate.name}: the Grams in {candidate.where} were computed on other "
                                   f"weights than {candidate.weights.reference} (fingerprint mismatch)")
        if manifest.include_padding != first.stats.manifest.include_padding:
            log.warning("candidate %s counted padding (include_padding=%s) unlike %s", candidate.name,
                        manifest.include_padding, first.name)


def _check_parameters(candidates: list[Candidate], names: list[str], excluded) -> None:
    first = candidates[0]
    reference = {name for name in names if not excluded(name)}
    for candidate in candidates[1:]:
        theirs = set(candidate.weights.names())
        missing = sorted(reference - theirs)
        extra = sorted(name for name in theirs - set(names) if not excluded(name))
        if missing or extra:
            which, name = ("lacks", missing[0]) if missing else ("has an extra", extra[0])
            raise RegMeanError(f"candidate {candidate.name}: {which} parameter {name} compared with {first.name}; "
                               "all candidates must share one architecture")
        for name in sorted(reference):
            theirs_shape, ours = candidate.weights.shape(name), first.weights.shape(name)
            if theirs_shape != ours:
                raise RegMeanError(
                    f"candidate {candidate.name}: parameter {name} has shape {list(theirs_shape)} but {list(ours)} in "
                    f"{first.name}; parameters that differ per task (heads) must be excluded, e.g. "
                    f"--exclude '{re.escape(name.rsplit('.', 1)[0])}\\..*'")


def _gram_groups(candidates: list[Candidate], names: list[str], excluded) -> tuple[list[GramGroup], dict[str, str]]:
    first = candidates[0]
    layers = first.stats.manifest.layers
    available = set(names)
    for candidate in candidates[1:]:
        theirs = candidate.stats.manifest.layers
        for name in layers.keys() | theirs.keys():
            if name not in theirs or name not in layers:
                holder, lacker = (first, candidate) if name not in theirs else (candidate, first)
                raise RegMeanError(f"candidate {lacker.name} ({lacker.where}): has no Gram for layer {name}, which "
                                   f"{holder.name} has; were both computed for the same architecture?")
            partner_ours = [n for n, e in layers.items() if e.gram == layers[name].gram]
            partner_theirs = [n for n, e in theirs.items() if e.gram == theirs[name].gram]
            if partner_ours != partner_theirs or theirs[name].in_features != layers[name].in_features:
                raise RegMeanError(f"candidate {candidate.name}: layer {name} was measured differently than in "
                                   f"{first.name} (shared inputs or input size differ)")
    unsolved: dict[str, str] = {}
    grouped: dict[str, list[tuple[str, LayerEntry]]] = defaultdict(list)
    for name, layer in layers.items():
        if excluded(layer.weight):
            unsolved[layer.weight] = "excluded"
            continue
        if layer.weight not in available:
            raise RegMeanError(f"candidate {first.name}: layer {name} has a Gram but its weight {layer.weight} is not "
                               f"in {first.weights.reference}")
        for candidate in candidates:
            shape = candidate.weights.shape(layer.weight)
            if shape != _weight_shape(layer):
                raise RegMeanError(f"candidate {candidate.name}: layer {name}: weight shape {list(shape)} does not "
                                   f"match the Gram's layer ({layer.in_features} inputs, {layer.out_features} outputs)")
            tokens = candidate.stats.manifest.grams[layer.gram].tokens
            if tokens == 0:
                raise RegMeanError(f"candidate {candidate.name}: layer {name}: its Gram {layer.gram} saw no tokens")
        grouped[layer.gram].append((name, layer))
    groups = [GramGroup(key, first.stats.manifest.grams[key].dim, members) for key, members in grouped.items()]
    return groups, unsolved


def _weight_shape(layer: LayerEntry) -> tuple[int, int]:
    return (layer.in_features, layer.out_features) if layer.transposed else (layer.out_features, layer.in_features)


# Loads the executor queues beyond the one being added. One is not enough: the anchor's step is short (no
# product), so the next candidate's load, begun only once the anchor's was taken, was waited for in every
# batch (0.4 to 0.9 s of the Llama-shaped bench merge; 0.2 s with two).
LOADS_AHEAD = 2


def system_bytes(dim: int, width: int, dtype: torch.dtype) -> int:
    """Working memory of one system in a solve batch, as the executor holds it (``SystemSums``): the packed
    sum S and one candidate's scaled packed G_i (one d^2 together), that G_i unpacked (then A, then
    its Cholesky factor in place), the packed G_i of the LOADS_AHEAD + 1 candidates in flight, and the
    (d, width) tensors: their loaded W_i, anchor, RHS, fallback target, correction."""
    in_flight = LOADS_AHEAD + 1
    return (2 * dim * dim + in_flight * packed_length(dim) + (in_flight + 4) * dim * width) * dtype.itemsize


def solve_batches(groups: list[GramGroup], settings: MergeSettings) -> list[SolveBatch]:
    """Equal-shaped systems together, as many per batch as the memory budget allows."""
    by_shape: dict[tuple[int, int], list[GramGroup]] = defaultdict(list)
    for group in groups:
        by_shape[(group.dim, group.width)].append(group)
    batches = []
    for (dim, width), members in by_shape.items():
        per_system = system_bytes(dim, width, settings.solve.solve_dtype)
        size = max(1, settings.batch_bytes // per_system)
        for start in range(0, len(members), size):
            batches.append(SolveBatch(dim, width, members[start:start + size]))
    return batches
