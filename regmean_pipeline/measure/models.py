"""Loading a candidate with its own head, and its tokenizer or image processor, from one folder."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import nn

from regmean_pipeline.errors import RegMeanError
from regmean_pipeline.io.adapters import LoraWeights, is_adapter
from regmean_pipeline.io.weights import adapter_base_dir, open_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(name: str, where: str = "--dtype") -> torch.dtype:
    if name not in DTYPES:
        raise RegMeanError(f"{where}: unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """'auto' means the GPU when there is one."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RegMeanError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RegMeanError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_config(folder: Path, *, trust_remote_code: bool = False):
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RegMeanError(f"{folder}: the model needs its own code; pass --trust-remote-code if you trust it") from None
        raise RegMeanError(f"{folder}/config.json: {exc}") from None
    except OSError as exc:
        raise RegMeanError(f"{folder}: not a transformers model folder ({exc})") from None


def architecture_of(config) -> str:
    return (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "Model")])[0]


def model_class(config, *, trust_remote_code: bool = False) -> type:
    """The class named in config.architectures, so the candidate keeps its own head."""
    name = architecture_of(config)
    cls = getattr(transformers, name, None)
    if cls is not None:
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        for reference in auto_map.values():
            reference = reference[0] if isinstance(reference, (list, tuple)) else reference
            if reference and reference.rsplit(".", 1)[-1] == name:
                return get_class_from_dynamic_module(reference, config.name_or_path)
    raise RegMeanError(f"config.architectures names {name!r}, which this transformers version does not know")


def load_model(folder: Path, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               allow_pickle: bool = False, device_map: str | None = None, base_model: str | None = None,
               attn_implementation: str | None = None) -> nn.Module:
    """The candidate with its own head; a LoRA adapter folder is loaded as its base with the adapter
    merged in memory, from the very tensors the merge reads (``LoraWeights``)."""
    adapter = open_weights(folder, allow_pickle=allow_pickle, base_model=base_model) if is_adapter(folder) else None
    source = adapter.base_dir if adapter is not None else folder
    config = load_config(source, trust_remote_code=trust_remote_code)
    cls = model_class(config, trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    if device_map:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(str(source), config=config, **kwargs)
    except Exception as exc:  # OSError, ValueError, and a refused or damaged pickle (UnpicklingError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RegMeanError(f"{source}: cannot load the model ({first})") from None
    if adapter is not None:
        apply_adapter(model, adapter)
    if not device_map:
        model.to(device)
    return model.eval()


def apply_adapter(model: nn.Module, adapter: LoraWeights) -> None:
    """Replace the adapted tensors of a loaded base model by their merged values, where they live."""
    state = model.state_dict(keep_vars=True)
    tied = tied_parameter_names(model)
    with torch.no_grad():
        for name in adapter.changed():
            tensor = state.get(name)
            if tensor is None or name in tied:
                raise RegMeanError(f"adapter {adapter.reference}: changes {name}, which the model "
                                   f"{type(model).__name__} has not as a parameter of its own (absent, or tied)")
            if tensor.device.type == "meta":
                raise RegMeanError(f"adapter {adapter.reference}: {name} is offloaded by --device-map; an adapter "
                                   "candidate must fit the devices (or merge it into its base first)")
            tensor.copy_(adapter.get(name))


def preprocessor_folder(folder: Path, base_model: str | None = None) -> Path:
    """Where a candidate's tokenizer lives: the folder, or for an adapter without one, its base."""
    if not is_adapter(folder) or any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        return folder
    return adapter_base_dir(folder, base_model)


def load_preprocessor(folder: Path, *, images: bool, trust_remote_code: bool = False, base_model: str | None = None):
    """The candidate's own tokenizer (text) or image processor (images)."""
    folder = preprocessor_folder(Path(folder), base_model)
    if images:
        from regmean_pipeline.measure.data import require_pillow

        require_pillow()  # before transformers, whose own ImportError would be a traceback
    try:
        if images:
            return transformers.AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        kind = "image processor" if images else "tokenizer"
        raise RegMeanError(f"{folder}: no usable {kind} ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        # GPT-2 style tokenizers have no pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def forward_inputs(model: nn.Module) -> set[str]:
    """Names the model's forward accepts, to drop tokenizer outputs it would reject."""
    return set(inspect.signature(model.forward).parameters)


def parameter_aliases(module: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of that parameter, the first registered first (tied weights share one
    object under several names)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {name: names for names in groups.values() for name in names}


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Parameter names that alias an earlier parameter (tied embeddings): not separately stored."""
    return {name for name, names in parameter_aliases(model).items() if names[0] != name}


def check_finite_parameters(model: nn.Module, where: str) -> None:
    """Stop before the forward pass when a weight already holds NaN or Inf (one cheap pass over them)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.device.type == "meta" or not parameter.is_floating_point():
                continue  # offloaded by a device map: checked where it is loaded, if anywhere
            if not bool(torch.isfinite(parameter).all()):
                layer = name.rsplit(".", 1)[0]
                raise RegMeanError(f"{where}: parameter {name} (layer {layer}) holds NaN or Inf; "
                                   "the checkpoint is damaged or diverged in training")


def config_summary(config) -> dict[str, int]:
    """The sizes two candidates must share, recorded in each cache so merge can name a mismatch."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    summary = {}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            summary[key] = value
    return summary
