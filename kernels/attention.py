"""Attention of a few queries (q_len <= block size) over a static KV cache, with GQA.

The queries sit at the last `q_len` positions of the valid cache (`kv_len` read from a device
tensor). `causal=True` is the target's verify/decode pattern; `causal=False` is the drafter's: the
block sees all cached context and itself, bidirectionally. An optional sliding window limits keys
to those within `window` positions of the query (Hugging Face convention: key j is visible from
query i when i - j < window).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference. q: [Tq, Hq, D]; caches: [Hkv, max_len, D]; kv_len: 0-d int64. Returns [Tq, Hq, D]."""
    n, tq = int(kv_len), q.shape[0]
    k, v = k_cache[:, :n], v_cache[:, :n]
    q_pos = torch.arange(n - tq, n, device=q.device)[:, None]
    k_pos = torch.arange(n, device=q.device)[None, :]
    mask = k_pos <= q_pos if causal else torch.ones(tq, n, dtype=torch.bool, device=q.device)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)
