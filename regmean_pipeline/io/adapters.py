"""PEFT LoRA adapters as candidates: a base checkpoint plus low-rank updates, read tensor by tensor.

A folder holding ``adapter_config.json`` is its base model (``base_model_name_or_path``, or one given)
with every targeted weight replaced by W0 + scale * B @ A (scale = alpha / r, or alpha / sqrt(r) with
rsLoRA). ``LoraWeights`` computes that on each read, so no merged checkpoint is ever written per
candidate; its names, shapes and dtypes are the base's. Anything this reading would get wrong (DoRA,
per-module ranks, LoRA on embeddings or convolutions, other adapter types) is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.safetensors_io import SafetensorsReader, copy_into

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin"})
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.(?P<kind>weight|bias)")
# Options whose effect this reading does not reproduce: refused when set, never silently dropped.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "Megatron layers (megatron_config)",
}


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@dataclass
class AdapterConfig:
    """The parts of adapter_config.json the merge depends on, checked."""

    folder: Path
    base_reference: str | None
    rank: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def read_adapter_config(folder: Path) -> AdapterConfig:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegMeanError(f"{path}: not a readable adapter config ({exc})") from None
    if not isinstance(config, dict):
        raise RegMeanError(f"{path}: not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise RegMeanError(f"{path}: adapter type {kind!r} is not supported (LoRA adapters only)")
    for key, feature in UNSUPPORTED.items():
        if config.get(key):
            raise RegMeanError(f"{path}: {feature} is not supported; merge the adapter into its base first "
                               "(peft's merge_and_unload) and give that checkpoint")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise RegMeanError(f"{path}: 'r' must be a positive integer and 'lora_alpha' a number (got {rank!r}, {alpha!r})")
    base = config.get("base_model_name_or_path")
    return AdapterConfig(Path(folder), base if isinstance(base, str) and base else None, rank, float(alpha),
                         bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out")))


@dataclass
class _Update:
    a: str  # adapter tensor names
    b: str


class LoraWeights:
    """A WeightSource: the base's tensors with every adapter target read as W0 + scale * B @ A, and the
    tensors an adapter saves whole (``modules_to_save``, trained biases) read from the adapter."""

    def __init__(self, config: AdapterConfig, base, base_dir: Path):
        self.config, self.base, self.base_dir = config, base, Path(base_dir)
        self.reference = str(config.folder)
        path = config.folder / ADAPTER_WEIGHTS
        if not path.is_file():
            raise RegMeanError(f"{config.folder}: no {ADAPTER_WEIGHTS} (adapters saved as pickle are not read; "
                               "save it again with safe_serialization)")
        try:
            self.adapter = SafetensorsReader(path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RegMeanError(f"{path}: not a readable safetensors file ({exc})") from None
        self.updates: dict[str, _Update] = {}
        self.replaced: dict[str, str] = {}  # base name -> adapter tensor saved whole
        self._last_factors: tuple[_Update, torch.Tensor, torch.Tensor] | None = None
        self._index(path)

    def _index(self, path: Path) -> None:
        base_names = set(self.base.names())
        halves: dict[str, dict[str, str]] = {}
        for key in self.adapter.keys():
            if not key.startswith(PEFT_PREFIX):
                raise RegMeanError(f"{path}: tensor {key} is not named as peft saves LoRA adapters ({PEFT_PREFIX}...)")
            name = key[len(PEFT_PREFIX):]
            if "lora_embedding_" in name:
                module = name.split(".lora_embedding_")[0]
                raise RegMeanError(f"{path}: LoRA on the embedding {module} is not supported (RegMean merges linear "
                                   "layers; an adapted embedding would be merged wrongly)")
            if "lora_magnitude_vector" in name:
                raise RegMeanError(f"{path}: DoRA (lora_magnitude_vector) is not supported")
            match = _LORA_KEY.fullmatch(name)
            if match is None:
                name = name.replace(".base_layer.", ".")  # a targeted layer's own weight, saved whole
                if ".lora_" in name:
                    raise RegMeanError(f"{path}: adapter tensor {key} is of a LoRA variant this reader does not know")
                if name not in base_names or tuple(self.adapter.shape(key)) != tuple(self.base.shape(name)):
                    raise RegMeanError(f"{path}: tensor {key} has no counterpart of its shape in the base "
                                       f"{self.base_dir}; was the adapter made for another base?")
                self.replaced[name] = key
                continue
            if match["kind"] == "bias":
                raise RegMeanError(f"{path}: LoRA biases ({key}) are not supported")
            halves.setdefault(f"{match['module']}.weight", {})[match["which"]] = key
        for weight, pair in halves.items():
            self._add_update(path, weight, pair, base_names)

    def _add_update(self, path: Path, weight: str, pair: dict[str, str], base_names: set[str]) -> None:
        if set(pair) != {"A", "B"}:
            raise RegMeanError(f"{path}: {weight.removesuffix('.weight')} has lora_{next(iter(pair))} "
                               "but not its other half")
        a_shape, b_shape = self.adapter.shape(pair["A"]), self.adapter.shape(pair["B"])
        module = weight.removesuffix(".weight")
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise RegMeanError(f"{path}: LoRA on {module}, which is not a linear layer (a convolution?), is not "
                               "supported")
        if weight not in base_names:
            raise RegMeanError(f"{path}: LoRA on {module}, whose weight {weight} is not in the base "
                               f"{self.base_dir}; was the adapter made for another base?")
        out_in = (b_shape[0], a_shape[1])
        expected = out_in[::-1] if self.config.fan_in_fan_out else out_in
        if b_shape[1] != a_shape[0] or tuple(self.base.shape(weight)) != expected:
            raise RegMeanError(f"{path}: LoRA on {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do "
                               f"not fit its weight {list(self.base.shape(weight))} in the base {self.base_dir}")
        self.updates[weight] = _Update(pair["A"], pair["B"])

    def changed(self) -> list[str]:
        """Names whose tensor differs from the base's."""
        return sorted(self.updates.keys() | self.replaced.keys())

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def _factors(self, update: _Update) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in float32; the last pair is kept, since a fingerprint samples one tensor 16 times."""
        cached = self._last_factors
        if cached is None or cached[0] is not update:
            cached = self._last_factors = (update, self.adapter.read(update.a).float(),
                                           self.adapter.read(update.b).float())
        return cached[1], cached[2]

    def _delta(self, update: _Update, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """scale * B @ A in float32, in the weight's stored orientation, rows start:stop of it."""
        a, b = self._factors(update)
        if self.config.fan_in_fan_out:  # stored (in, out): rows are A's columns
            a = a if start is None else a[:, start:stop]
            return (b @ a).mul_(self.config.scale).T
        b = b if start is None else b[start:stop]
        return (b @ a).mul_(self.config.scale)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.rows(name, None, None)
        return weight if out is None else copy_into(out, weight, name)

    def rows(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        """Rows start:stop (None, None: all) of the tensor as the adapted model holds it."""
        if name in self.replaced:
            weight = self.adapter.read(self.replaced[name], start, stop).to(self.base.dtype(name))
        else:
            weight = self.base.get(name) if start is None else self.base.rows(name, start, stop)
        update = self.updates.get(name)
        if update is None:
            return weight
        return (weight.float() + self._delta(update, start, stop)).to(weight.dtype)
