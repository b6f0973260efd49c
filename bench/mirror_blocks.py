"""The mirror's block size (cache/symmetric.MIRROR_BLOCK), measured on this machine: unpacking a solve
batch's packed Grams into full symmetric matrices (``unpack_upper``: row copies, then the blocked
mirror), per block size, against a plain copy of as many bytes and against the unpacking it replaced
(``masked_scatter_``, then a whole-matrix mirror: ``triu(1)`` added back transposed).

    python -m bench.mirror_blocks [--repeats 7]

Prints one markdown table: milliseconds (best of the repeats) per batch of the bench's shapes.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.fixtures import markdown_table
from regmean_pipeline.cache import symmetric

BATCHES = ((384, 12), (1024, 8), (2816, 4))  # (d, systems): MiniLM, Llama-shaped hidden and MLP inputs
BLOCKS = (32, 64, 128, 256, 512)


def best_ms(run, repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def whole_matrix_mirror(matrix: torch.Tensor) -> None:
    """The mirror before the blocked one: one (d, d) temporary per matrix, added back transposed."""
    for square in matrix:
        upper = square.triu(1)
        square.triu_().add_(upper.transpose(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    chosen = symmetric.MIRROR_BLOCK
    rows = []
    for dim, count in BATCHES:
        x = torch.randn(count, dim, dim)
        packed = torch.stack([symmetric.pack_upper(m) for m in x + x.mT])
        full, source = torch.empty(count, dim, dim), torch.randn(count, dim, dim)
        mask = symmetric._upper_mask(dim, "cpu")
        row = [f"d={dim}, {count} systems", f"{best_ms(lambda: full.copy_(source), args.repeats):.1f}"]

        def scatter_then(mirror):
            full.masked_scatter_(mask, packed)
            mirror(full)

        row.append(f"{best_ms(lambda: scatter_then(whole_matrix_mirror), args.repeats):.1f}")
        for block in BLOCKS:
            symmetric.MIRROR_BLOCK = block
            row.append(f"{best_ms(lambda: symmetric.unpack_upper(packed, dim, out=full), args.repeats):.1f}")
        symmetric.MIRROR_BLOCK = chosen
        rows.append(tuple(row))
    header = ("batch", "copy", "before", *(f"block {b}" + (" (used)" if b == chosen else "")
                                                        for b in BLOCKS))
    print(f"unpack + mirror, ms (best of {args.repeats}); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
