"""The steps where RegMean++ processes meet: one process needs none of them; under torchrun they are
torch.distributed collectives on the sums, never on a candidate's examples, activations or Grams."""

from __future__ import annotations

import torch
import torch.distributed as dist

from regmean_pipeline.distributed import Ranks, broadcast_text, check_same, sum_counts, sum_in_place


class Collective:
    """One process: every step is the identity."""

    def __init__(self, ranks: Ranks | None = None) -> None:
        self.ranks = ranks or Ranks()

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world(self) -> int:
        return self.ranks.world

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Element-wise sums over all processes, in place."""

    def broadcast_(self, tensor: torch.Tensor, source: int) -> None:
        """``source``'s tensor on every process, in place."""

    def broadcast_text(self, text: str | None, source: int) -> str:
        return text or ""

    def check_same(self, text: str, what: str) -> None:
        """Every process holds the same ``text``; else one error on all of them."""

    def sum_counts(self, values: list[int]) -> list[int]:
        return list(values)


class TorchrunCollective(Collective):
    """The same steps over the torchrun process group (gloo for CPU tensors, nccl for GPU ones)."""

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        sum_in_place(tensors)

    def broadcast_(self, tensor: torch.Tensor, source: int) -> None:
        # torch.distributed sends contiguous tensors only; a solution is a transposed view (SystemSums).
        dense = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(dense, source)
        if dense is not tensor:
            tensor.copy_(dense)

    def broadcast_text(self, text: str | None, source: int) -> str:
        return broadcast_text(text, source)

    def check_same(self, text: str, what: str) -> None:
        check_same(text, what)

    def sum_counts(self, values: list[int]) -> list[int]:
        return sum_counts(values)


def collective_for(ranks: Ranks) -> Collective:
    return TorchrunCollective(ranks) if ranks.active else Collective(ranks)
