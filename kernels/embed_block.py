"""The drafter's input block in one launch: the ids [bonus, MASK × (b - 1)] and their embedding rows.

The reference is a concatenation (the ids) and an embedding lookup; the kernel writes both, the rows copied
from the table unchanged (bit for bit the lookup).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_block_ref(bonus: torch.Tensor, mask_ids: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bonus: [1] id; mask_ids: [b - 1] ids. Returns (ids [b] = [bonus, mask_ids], their rows of `table` [b, H])."""
    ids = torch.cat((bonus, mask_ids))
    return ids, F.embedding(ids, table)


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _embed_block_kernel(bonus_ptr, mask_ptr, table_ptr, ids_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if row == 0:
        token = tl.load(bonus_ptr)
    else:
        token = tl.load(mask_ptr + row - 1)
    if tl.program_id(1) == 0:
        tl.store(ids_ptr + row, token)
    ok = cols < hidden
    tl.store(out_ptr + row.to(tl.int64) * hidden + cols,
             tl.load(table_ptr + token.to(tl.int64) * hidden + cols, mask=ok), mask=ok)


def embed_block(bonus: torch.Tensor, mask_ids: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: same contract as `embed_block_ref`, one launch."""
    b, hidden = mask_ids.shape[0] + 1, table.shape[1]
    assert table.is_contiguous() and mask_ids.is_contiguous()
    ids = torch.empty(b, dtype=torch.int64, device=table.device)
    out = torch.empty((b, hidden), dtype=table.dtype, device=table.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _embed_block_kernel[(b, triton.cdiv(hidden, block))](bonus, mask_ids, table, ids, out, hidden, BLOCK=block)
    return ids, out
