"""The model's stack of repeated blocks, found generically, and which parameters belong to which unit.

RegMean++ merges a model unit by unit: the prefix (embeddings: everything that runs before the first
block), each block of the stack, and the tail (final norm, pooler, heads: everything else). The stack is
the ``nn.ModuleList`` of same-class blocks holding the most parameters (``encoder.layer``,
``transformer.h``, ``model.layers``, ``vision_model.encoder.layers``, ...), so no architecture needs code
of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from regmean_pipeline.errors import RegMeanError

LOOKED_FOR = ("an nn.ModuleList of same-class blocks holding most parameters, such as encoder.layer, "
              "transformer.h, model.layers or vision_model.encoder.layers")
# A second stack holding at least this share of the first one's parameters (an encoder-decoder's
# decoder) would need hidden states of its own; such models are refused rather than merged half right.
SECOND_STACK_SHARE = 0.25


@dataclass(frozen=True)
class BlockStack:
    path: str  # module path of the ModuleList, e.g. "bert.encoder.layer"
    length: int
    block_class: str

    def block_prefix(self, index: int) -> str:
        return f"{self.path}.{index}."

    def block_of(self, name: str) -> int | None:
        """The block a parameter (or module) name belongs to, or None outside the stack."""
        head = self.path + "."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_stack(model: nn.Module) -> BlockStack:
    """The stack of repeated blocks; one clear error naming what was looked for when there is none."""
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            candidates.append((_parameter_count(module), path, module))
    candidates = [c for c in candidates if c[0] > 0]
    if not candidates:
        raise RegMeanError(f"{type(model).__name__}: no stack of repeated blocks found (looked for {LOOKED_FOR}); "
                           "RegMean++ cannot merge it, use --method regmean")
    count, path, module = max(candidates, key=lambda c: c[0])
    for other_count, other_path, _ in candidates:
        nested = other_path.startswith(path + ".") or path.startswith(other_path + ".")
        if other_path != path and not nested and other_count >= SECOND_STACK_SHARE * count:
            raise RegMeanError(f"{type(model).__name__}: two stacks of blocks ({path}, {other_path}); RegMean++ "
                               "merges models with one stack (encoders, decoders, vision towers), use --method regmean")
    return BlockStack(path, len(module), type(module[0]).__name__)


@dataclass(frozen=True)
class Unit:
    """What RegMean++ merges in one step: the prefix, block ``index`` of the stack, or the tail."""

    kind: str  # "prefix", "block" or "tail"
    names: tuple[str, ...]  # its stored parameter names
    index: int | None = None  # the block's position in the stack

    @property
    def label(self) -> str:
        return f"block {self.index}" if self.kind == "block" else self.kind


@dataclass
class Units:
    """Stored parameter names by unit: prefix, one list per block, tail."""

    prefix: list[str]
    blocks: list[list[str]]
    tail: list[str]

    def ordered(self) -> list[Unit]:
        """The units in the order RegMean++ merges them."""
        return [Unit("prefix", tuple(self.prefix))] \
            + [Unit("block", tuple(names), index) for index, names in enumerate(self.blocks)] \
            + [Unit("tail", tuple(self.tail))]


def split_units(names: list[str], stack: BlockStack, prefix_modules: set[str]) -> Units:
    """Parameter names by unit: in a block of the stack, in a module that ran before the first block
    (``prefix_modules``), or else in the tail (what runs after the stack, and what never runs)."""
    units = Units([], [[] for _ in range(stack.length)], [])
    for name in names:
        block = stack.block_of(name)
        if block is not None:
            units.blocks[block].append(name)
        elif name.rsplit(".", 1)[0] in prefix_modules:
            units.prefix.append(name)
        else:
            units.tail.append(name)
    return units
