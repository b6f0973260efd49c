"""The statistics a cache can hold. Each is a set of named flat arrays, every one a sum over counted rows
(tokens, examples), so that shards, torchrun ranks and checkpoints all combine them the same way: add
the arrays, add the counts. What differs between statistics is only how an array is named, shaped and
counted, which this module declares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from regmean_pipeline.cache.symmetric import packed_length
from regmean_pipeline.errors import RegMeanError


@dataclass
class GramEntry:
    """A Gram of one layer input: the packed upper triangle of a (dim, dim) sum over ``tokens`` rows."""

    dim: int
    tokens: int
    checksum: str

    @property
    def length(self) -> int:
        return packed_length(self.dim)

    @property
    def count(self) -> int:
        return self.tokens

    def counted(self, count: int) -> GramEntry:
        return GramEntry(self.dim, count, "")


@dataclass
class FisherEntry:
    """The diagonal Fisher of one parameter: a sum over ``examples`` of its squared gradients."""

    shape: list[int]
    examples: int
    checksum: str

    @property
    def length(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        return self.examples

    def counted(self, count: int) -> FisherEntry:
        return FisherEntry(list(self.shape), count, "")


@dataclass(frozen=True)
class Statistic:
    name: str  # in --statistics and the manifest's `statistics`
    section: str  # the manifest field that lists its arrays
    file_stem: str  # its arrays' file in the cache: STEM.zarr or STEM.safetensors
    entry: type  # GramEntry or FisherEntry
    count_field: str  # the entry field that counts the rows summed
    description: str


GRAM = Statistic("gram", "grams", "grams", GramEntry, "tokens",
                 "the Gram matrix of every linear layer's input (RegMean)")
FISHER = Statistic("fisher", "fisher", "fisher", FisherEntry, "examples",
                   "the diagonal Fisher information of every parameter (Fisher merging)")
STATISTICS: dict[str, Statistic] = {statistic.name: statistic for statistic in (GRAM, FISHER)}


def parse_statistics(text: str, where: str = "--statistics") -> list[str]:
    """``gram,fisher`` -> ["gram", "fisher"] in the order given; unknown or repeated names refused."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STATISTICS]
    if not names or unknown or len(set(names)) != len(names):
        raise RegMeanError(f"{where}: {text!r}: give one or more of {', '.join(STATISTICS)}, comma-separated, "
                           "each once")
    return names
