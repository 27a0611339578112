"""The batch-invariance check the per-row kernels share: a row's output launched alone equals, bit for
bit, the same row launched at any place inside a block of 2..32 rows (a decode step against a verify
block or a draft). Issue 24: what makes bf16 speculative output equal plain decoding."""
from __future__ import annotations

from typing import Callable

import torch

BLOCKS = (2, 3, 5, 8, 16, 17, 32)


def first_variant_row(step: Callable[[int, int], tuple[torch.Tensor, ...]], rows: int = 32,
                      blocks=BLOCKS) -> tuple[int, int] | None:
    """`step(start, stop)` runs the kernel over rows start..stop-1 and returns its outputs (each with the
    rows first). (block size, row) of the first row that differs from its launch alone; None when none does."""
    alone = [step(r, r + 1) for r in range(rows)]
    for size in blocks:
        for start in range(0, rows - size + 1, size):
            outs = step(start, start + size)
            for r in range(size):
                if not all(torch.equal(o[r:r + 1], a) for o, a in zip(outs, alone[start + r])):
                    return size, start + r
    return None
