"""DFlash2's candidate-selector walk (dflash_cli/dflash2.py, research/dflash2.md §1.4): from the anchor, at each
draft row t the best of the k candidates given the one chosen at row t - 1, greedy (argmax, the lowest index
on ties), left to right:

    c_0 = argmax_b S_0(anchor, b),   c_t = argmax_b S_t(c_(t-1), b),   draft_t = candidates[t, c_t]

The reference is two torch ops per row plus a stack and a gather; the kernel is one launch of one program
that walks the L rows (L ≤ the block size, k ≤ a few dozen: a few hundred scores in all).
"""
from __future__ import annotations

import torch


def selector_walk_ref(scores: torch.Tensor, candidates: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """scores: [L, k, k] (row t: S_t(a, b) for the k candidates a of row t - 1, row 0's all the anchor's);
    candidates: [L, k] ids. Returns the L drafted ids (written into `out` [L] when given)."""
    chosen = torch.zeros(1, dtype=torch.int64, device=scores.device)  # row 0: every predecessor is the anchor
    path = []
    for t in range(scores.shape[0]):
        chosen = scores[t].index_select(0, chosen).argmax(-1)
        path.append(chosen)
    if out is None:
        return candidates.gather(1, torch.stack(path)).view(-1)
    return torch.gather(candidates, 1, torch.stack(path), out=out.view(-1, 1)).view(-1)


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _walk_kernel(scores_ptr, cand_ptr, out_ptr, rows, k, BLOCK: tl.constexpr):
    b = tl.arange(0, BLOCK)
    ok = b < k
    chosen = tl.zeros((), tl.int32)
    for t in range(0, rows):
        s = tl.load(scores_ptr + (t * k + chosen) * k + b, mask=ok, other=float("-inf"))
        best = tl.max(s, axis=0)
        chosen = tl.min(tl.where(ok & (s == best), b, BLOCK), axis=0)  # the first maximal index, as argmax
        tl.store(out_ptr + t, tl.load(cand_ptr + t * k + chosen))


def selector_walk(scores: torch.Tensor, candidates: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: same contract as `selector_walk_ref`, one launch."""
    rows, k, _ = scores.shape
    scores, candidates = scores.contiguous(), candidates.contiguous()
    out = torch.empty(rows, dtype=candidates.dtype, device=candidates.device) if out is None else out
    if rows:
        _walk_kernel[(1,)](scores, candidates, out, rows, k, BLOCK=max(2, triton.next_power_of_2(k)))
    return out
