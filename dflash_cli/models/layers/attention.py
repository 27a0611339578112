"""Causal GQA self-attention over the static KV cache, with the options the families differ by:
q/k RMSNorm (plain or (1 + w)), q/k/v/o biases, per-head sinks, a sliding window per layer, a
sigmoid output gate (its rows interleaved per head with the query's in the checkpoint), and partial
rotary (the rope table is built for the rotated dims only; the kernel rotates what the table covers).

T new tokens write their K/V at the cache's next positions (into this layer's row of the cache,
`slot`) and attend over everything before them; `commit` on the cache decides how many stay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops
from ..weights import Weight
from .linear import Linear, take_linear


def attention_weights(p: str, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qk_norm: str | None = None,
                      norm_dtype: str = "model", bias: bool = False, sinks: bool = False,
                      gate: bool = False) -> list[Weight]:
    """Layer `p`'s attention tensors (p ends with the layer's "."). qk_norm: the norms' init ("norm" or
    "zero_norm"), None without; gate: q_proj holds a gate row block per head after its query rows."""
    a, q, kv = p + "self_attn.", heads * head_dim, kv_heads * head_dim
    table = []
    for name, rows, cols, gain in (("q_proj", q * (2 if gate else 1), hidden, 2.0), ("k_proj", kv, hidden, 2.0),
                                   ("v_proj", kv, hidden, 1.0), ("o_proj", hidden, q, 1.0)):
        table.append(Weight(a + name + ".weight", (rows, cols), gain=gain))
        if bias:
            table.append(Weight(a + name + ".bias", (rows,), "normal", 0.1))
    if qk_norm:
        table += [Weight(a + "q_norm.weight", (head_dim,), qk_norm, dtype=norm_dtype),
                  Weight(a + "k_norm.weight", (head_dim,), qk_norm, dtype=norm_dtype)]
    if sinks:
        table.append(Weight(a + "sinks", (heads,), "normal", 1.0, dtype="float32"))
    return table


@dataclass
class Attention:
    qkv: Linear  # rows [q | (gate) | k | v]: one GEMM
    o_proj: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    slot: int  # this layer's row in the cache's K/V
    norm_offset: bool = False  # q/k norms applied as (1 + w)
    gated: bool = False  # output × sigmoid(gate)
    window: int | None = None  # sliding window (keys q - k < window), None: the whole context
    sinks: torch.Tensor | None = None  # [heads] fp32: one more logit in each head's softmax
    rope: torch.Tensor | None = None  # this layer's own rope table (per-layer θ), else the step's

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, c, slot: int, *, bias: bool = False, gated: bool = False,
             norm_offset: bool = False, window: int | None = None) -> "Attention":
        """Pop layer `p`'s attention from `w`; `c` gives the head counts and eps (a DecoderConfig)."""
        a = p + "self_attn."
        rows = None
        if gated:  # per head: query rows, then gate rows; regrouped as [all queries | all gates]
            rows = {a + "q_proj": torch.arange(2 * c.num_heads * c.head_dim).view(c.num_heads, 2, c.head_dim)
                    .transpose(0, 1).reshape(-1)}
        qkv = take_linear(w, *(a + n + "_proj" for n in "qkv"), bias=bias, rows=rows)
        return cls(qkv, take_linear(w, a + "o_proj", bias=bias), w.pop(a + "q_norm.weight", None),
                   w.pop(a + "k_norm.weight", None), c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, slot,
                   norm_offset, gated, window, w.pop(a + "sinks", None))

    def __call__(self, h: torch.Tensor, cache, step) -> torch.Tensor:
        """h [T, H] -> [T, H]; K/V written at step.positions of cache.kv (row `slot`)."""
        t, hd = h.shape[0], self.head_dim
        qd, kvd = self.heads * hd, self.kv_heads * hd
        if self.gated:
            q, gate, k, v = self.qkv(h).split([qd, qd, kvd, kvd], dim=-1)
        else:
            q, k, v = self.qkv(h).split([qd, kvd, kvd], dim=-1)
        cache_k, cache_v = cache.kv.k[self.slot], cache.kv.v[self.slot]
        if step.mask is not None:  # a tree verify
            out = self._tree(q.view(t, self.heads, hd), k.view(t, self.kv_heads, hd), v.view(t, self.kv_heads, hd),
                             cache_k, cache_v, step).reshape(t, -1)
            return self.o_proj(out * torch.sigmoid(gate) if self.gated else out)
        q = ops.qk_norm_rope_cache(q.view(t, self.heads, hd), k.view(t, self.kv_heads, hd),
                                   v.view(t, self.kv_heads, hd), self.q_norm, self.k_norm, self.eps,
                                   step.cos_sin if self.rope is None else self.rope,
                                   step.positions, cache_k, cache_v, offset=self.norm_offset)
        out = ops.attention(q, cache_k, cache_v, step.kv_len, causal=True, scale=hd**-0.5,
                            sliding_window=self.window, sinks=self.sinks)
        out = out.reshape(t, -1)
        return self.o_proj(out * torch.sigmoid(gate) if self.gated else out)

    def _tree(self, q, k, v, cache_k, cache_v, step) -> torch.Tensor:
        """A tree verify (dflash_cli/tree.py): q/k normed and rotated at each node's own position
        (anchor + depth), K/V written at the node's cache row, attention over the committed keys and the
        node's ancestors (`step.mask`), within the layer's window by position. The torch reference on
        every device: the fused rope-cache and attention kernels take neither rows apart from positions
        nor a mask yet."""
        from ...kernels.attention import attention_ref
        from ...kernels.rope_cache import head_rms_norm, rotate

        if self.q_norm is not None:
            q = head_rms_norm(q, self.q_norm, self.eps, self.norm_offset)
            k = head_rms_norm(k, self.k_norm, self.eps, self.norm_offset)
        cs = (step.cos_sin if self.rope is None else self.rope)[step.positions]
        q = rotate(q, cs)
        cache_k.index_copy_(1, step.rows, rotate(k, cs).transpose(0, 1).to(cache_k.dtype))
        cache_v.index_copy_(1, step.rows, v.transpose(0, 1).to(cache_v.dtype))
        mask = step.mask
        if self.window is not None:
            mask = mask & (step.positions[:, None] - step.key_positions[None, :] < self.window)
        return attention_ref(q, cache_k, cache_v, step.kv_len, causal=True, scale=self.head_dim**-0.5,
                             sinks=self.sinks, mask=mask)
