"""The merged model as a Hugging Face folder: config and tokenizer files of one candidate, new weights."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from regmean_pipeline.io.adapters import ADAPTER_FILES

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf")
NOT_COPIED = {"README.md", ".gitattributes", "merge_report.json", "model.safetensors.index.json",
              "pytorch_model.bin.index.json", "finetune.json"}  # records of how a candidate was made


def copy_model_files(source: Path, target: Path, *, base_dir: Path | None = None) -> list[str]:
    """Config, generation config, tokenizer and processor files: every top-level file but weights.

    For a LoRA adapter folder, pass its base model's folder as ``base_dir``: the base gives the config
    and tokenizer, and the adapter's own files (its tokenizer, chat template) replace those.
    """
    copied = copy_model_files(base_dir, target) if base_dir is not None else []
    for path in sorted(Path(source).iterdir()):
        if not path.is_file() or path.name in NOT_COPIED or path.name in ADAPTER_FILES \
                or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(path, Path(target) / path.name)
        copied.append(path.name)
    return sorted(set(copied))


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if unit not in units or value <= 0:
        raise ValueError(f"not a size: {text!r}")
    return int(value * units[unit])


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")
