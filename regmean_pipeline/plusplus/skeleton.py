"""A model built without weights, whose modules receive real tensors one unit at a time.

RegMean++ never loads a whole candidate: the model is built with its parameters on the meta device
(accelerate's ``init_empty_weights``; buffers such as position ids and rotary frequencies are real, as
the model's own constructor makes them), and each unit's tensors are put in place when it is worked on,
then released.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from accelerate import init_empty_weights
from torch import nn

from regmean_pipeline.measure.models import model_class, parameter_aliases


def empty_model(config, *, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The candidate's class (config.architectures) with meta parameters; floating buffers are made in
    ``dtype`` where the model does not fix their dtype itself, as ``from_pretrained(dtype=...)`` makes them."""
    cls = model_class(config, trust_remote_code=trust_remote_code)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights():
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def load_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], *, device: torch.device | str,
                 dtype: torch.dtype) -> None:
    """Put each named tensor (names relative to ``module``) in place of the parameter, every alias of a
    tied parameter included, or of the buffer; floating tensors become ``dtype``. A parameter already
    materialized with the same shape, dtype and device is overwritten in place (no new allocation)."""
    aliases = parameter_aliases(module)
    buffers = dict(module.named_buffers())
    for name, tensor in tensors.items():
        target = dtype if tensor.is_floating_point() else tensor.dtype
        if name in aliases:
            owner, leaf = _owner(module, name)
            current = owner._parameters[leaf]
            if current.device == torch.device(device) and current.shape == tensor.shape and current.dtype == target:
                with torch.no_grad():
                    current.copy_(tensor)
                continue
            # A copy of its own: the next candidate is copied into it in place, and the source may be a
            # caller's live tensor (the in-memory API) or a merged tensor already handed to the output.
            parameter = nn.Parameter(tensor.to(device, target, copy=True), requires_grad=False)
            for alias in aliases[name]:
                alias_owner, alias_leaf = _owner(module, alias)
                alias_owner._parameters[alias_leaf] = parameter
        elif name in buffers:
            owner, leaf = _owner(module, name)
            owner._buffers[leaf] = tensor.to(device, target, copy=True)
        else:
            raise KeyError(name)


def release(module: nn.Module) -> None:
    """Give the memory of every parameter back (to the meta device), keeping tied ones tied; buffers stay."""
    aliases = parameter_aliases(module)
    done: set[str] = set()
    for name, names in aliases.items():
        if name in done:
            continue
        owner, leaf = _owner(module, name)
        parameter = owner._parameters[leaf]
        if parameter.device.type != "meta":
            empty = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False)
            for alias in names:
                alias_owner, alias_leaf = _owner(module, alias)
                alias_owner._parameters[alias_leaf] = empty
        done.update(names)


def relative(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Names with ``prefix`` (``bert.encoder.layer.3.``) stripped, for loading into that submodule."""
    return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
