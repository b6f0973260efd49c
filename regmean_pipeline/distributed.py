"""torch.distributed for the stages when they run under torchrun: gloo on CPU, nccl for GPU tensors.

Nothing here is pickled: every exchange is a tensor (sums, counts, digests, encoded text), so a
process group carries exactly the numbers the pipeline needs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from regmean_pipeline.errors import RegMeanError

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=60)  # a long stats pass on one rank must not time out the others


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank 0 of 1 when not under torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> Ranks:
    """Rank and world size as torchrun (or any launcher setting its variables) gives them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """Join the torchrun job for the duration of a stage; a single process needs no group."""
    ranks = launched_ranks()
    if not ranks.active or dist.is_initialized():
        yield ranks
        return
    # CPU tensors (counts, digests, accumulators of CPU-placed layers) go through gloo, GPU ones through nccl.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("rank %d of %d joined the process group (%s)", ranks.rank, ranks.world, backend)
    try:
        yield ranks
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_together()
    dist.destroy_process_group()


def leave_together() -> None:
    """Wait for every rank before the group is torn down.

    A rank that destroys its gloo group while another still works (rank 0 publishing the output) has been
    seen to abort at exit (SIGABRT, "terminate called without an active exception"), which torchrun
    reports as a failed job; torch.distributed expects every rank to destroy the group at the same point.
    A rank that failed instead closes its connections, and the others stop here with one line.
    """
    try:  # a CPU tensor, so gloo carries it under "cpu:gloo,cuda:nccl" too: it notices a peer that exited
        dist.all_reduce(torch.zeros(1, dtype=torch.int64))
    except RuntimeError as exc:  # a peer exited: gloo reports the closed connection
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegMeanError(f"another rank of this torchrun job failed before finishing ({reason}); see its output") \
            from None


def rank_device(ranks: Ranks, name: str | None) -> str | None:
    """``auto`` under torchrun on GPUs means this rank's own GPU (cuda:LOCAL_RANK)."""
    if ranks.active and name in (None, "auto") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    return name


def share(count: int, index: int, parts: int) -> range:
    """Part ``index`` of ``parts`` contiguous, near-equal parts of range(count)."""
    return range(count * index // parts, count * (index + 1) // parts)


def _digest_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.int64).clone()


def check_same(text: str, what: str) -> None:
    """Raise on every rank unless all ranks hold the same ``text`` (compared by digest)."""
    digest = _digest_tensor(text)
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RegMeanError(f"the {dist.get_world_size()} ranks disagree on {what}; every rank must run the same "
                           "command on the same files")


def sum_counts(values: list[int]) -> list[int]:
    """Element-wise sum of integer lists over all ranks, exactly (int64)."""
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_in_place(tensors: list[torch.Tensor]) -> None:
    """All-reduce (sum) every tensor where it lies, one collective at a time, in the given order."""
    for tensor in tensors:
        dist.all_reduce(tensor)


def all_ok(ok: bool) -> bool:
    """True when every rank reports success: the point where a failure on one rank stops all of them."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag) == 0


def broadcast_text(text: str | None, source: int = 0) -> str:
    """Rank ``source``'s string on every rank (UTF-8 bytes in two broadcasts: length, then data)."""
    data = (text or "").encode() if dist.get_rank() == source else b""
    length = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(length, source)
    buffer = torch.zeros(int(length), dtype=torch.uint8)
    if dist.get_rank() == source and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, source)
    return bytes(buffer.tolist()).decode()
