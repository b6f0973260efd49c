"""Hidden states of every candidate's batches between one block and the next.

They live on the compute device while they fit the budget, else in host memory, and past the budget
in a local spill folder (one safetensors file per batch). Each batch's states are replaced as they
advance through a merged block, so the store never holds two copies of one batch.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

# Room left free on a GPU for the blocks, their activations and the solves.
DEVICE_RESERVE = 2 << 30


@dataclass
class StoreUsage:
    """Bytes where the hidden states are now, and the most ever held in memory or on disk."""

    device_bytes: int = 0
    host_bytes: int = 0
    spilled_bytes: int = 0
    peak_memory_bytes: int = 0
    peak_spilled_bytes: int = 0
    spill_writes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class ActivationStore:
    """key -> hidden states, within ``budget`` bytes of memory; the rest spilled under ``spill_root``."""

    def __init__(self, device: torch.device | str, budget: int, spill_root: Path | None = None) -> None:
        self.device = torch.device(device)
        self.budget = budget
        self._spill_root = spill_root
        self._spill: Path | None = None
        self._memory: dict[Hashable, torch.Tensor] = {}
        self._files: dict[Hashable, Path] = {}
        self._sizes: dict[Hashable, tuple[str, int]] = {}
        self.usage = StoreUsage()

    def _place(self, size: int) -> str:
        if self.usage.device_bytes + self.usage.host_bytes + size > self.budget:
            return "disk"
        if self.device.type != "cuda":
            return "device"  # the host is the device
        free, _ = torch.cuda.mem_get_info(self.device)
        return "device" if free - size > DEVICE_RESERVE else "host"

    def put(self, key: Hashable, hidden: torch.Tensor) -> None:
        self.discard(key)
        size = hidden.numel() * hidden.element_size()
        place = self._place(size)
        if place == "disk":
            self._files[key] = self._write(hidden)
            self.usage.spilled_bytes += size
            self.usage.spill_writes += 1
            self.usage.peak_spilled_bytes = max(self.usage.peak_spilled_bytes, self.usage.spilled_bytes)
        elif place == "device":
            self._memory[key] = hidden
            self.usage.device_bytes += size
        else:
            self._memory[key] = hidden.to("cpu")
            self.usage.host_bytes += size
        self._sizes[key] = (place, size)
        self.usage.peak_memory_bytes = max(self.usage.peak_memory_bytes,
                                           self.usage.device_bytes + self.usage.host_bytes)

    def get(self, key: Hashable) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key].to(self.device, non_blocking=True)
        return load_file(str(self._files[key]))["hidden"].to(self.device)

    def discard(self, key: Hashable) -> None:
        place, size = self._sizes.pop(key, ("", 0))
        self._memory.pop(key, None)
        if place == "device":
            self.usage.device_bytes -= size
        elif place == "host":
            self.usage.host_bytes -= size
        elif place == "disk":
            self.usage.spilled_bytes -= size
            self._files.pop(key).unlink()

    def _write(self, hidden: torch.Tensor) -> Path:
        if self._spill is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
            self._spill = Path(tempfile.mkdtemp(prefix="regmean-spill-", dir=self._spill_root))
            log.info("hidden states exceed --activation-memory: spilling the rest to %s", self._spill)
        path = self._spill / f"{self.usage.spill_writes:09d}.safetensors"
        save_file({"hidden": hidden.detach().to("cpu").contiguous()}, str(path))
        return path

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        self._sizes.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None
