"""Causal GQA self-attention over the static KV cache, with the options the families differ by:
q/k RMSNorm (plain or (1 + w)), q/k/v/o biases, per-head sinks, a sliding window per layer, a
sigmoid output gate (its rows interleaved per head with the query's in the checkpoint), partial
rotary (the rope table is built for the rotated dims only; the kernel rotates what the table covers),
and Gemma 4's: a head geometry and rope table of the layer's own, q/k norms whose fp32 weight is
applied before the one rounding, keys that are also the values (no v_proj), an unscaled RMSNorm of
the values, and the attention scale (1.0 there: the q/k norms carry it).

T new tokens write their K/V at the cache's next positions (into this layer's row of the cache,
`slot`) and attend over everything before them; `commit` on the cache decides how many stay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops
from ..weights import Weight
from .linear import Dense, Linear, take_linear


def attention_weights(p: str, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qk_norm: str | None = None,
                      norm_dtype: str = "model", bias: bool = False, sinks: bool = False,
                      gate: bool = False, k_eq_v: bool = False) -> list[Weight]:
    """Layer `p`'s attention tensors (p ends with the layer's "."). qk_norm: the norms' init ("norm" or
    "zero_norm"), None without; gate: q_proj holds a gate row block per head after its query rows;
    k_eq_v: no v_proj (the keys' projection serves as the values)."""
    a, q, kv = p + "self_attn.", heads * head_dim, kv_heads * head_dim
    table = []
    for name, rows, cols, gain in (("q_proj", q * (2 if gate else 1), hidden, 2.0), ("k_proj", kv, hidden, 2.0),
                                   ("v_proj", kv, hidden, 1.0), ("o_proj", hidden, q, 1.0)):
        if name == "v_proj" and k_eq_v:
            continue
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
    scale: float | None = None  # the softmax scale (None: head_dim^-0.5)
    cos_sin: torch.Tensor | None = None  # this layer's own rope table (None: the model's, step.cos_sin)
    norm_fp32: bool = False  # q/k norms: the fp32 weight applied before the one rounding (Gemma 4)
    k_eq_v: bool = False  # no v_proj: the values are the keys' projection (before k's norm and rope)
    v_norm: torch.Tensor | None = None  # [head_dim] fp32 ones: the values RMS-normed, unscaled

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, c, slot: int, *, bias: bool = False, gated: bool = False,
             norm_offset: bool = False, window: int | None = None, head_dim: int | None = None,
             kv_heads: int | None = None, k_eq_v: bool = False, v_norm: bool = False, scale: float | None = None,
             cos_sin: torch.Tensor | None = None, norm_fp32: bool = False) -> "Attention":
        """Pop layer `p`'s attention from `w`; `c` gives the head counts and eps (a DecoderConfig), unless
        the layer has its own `head_dim` / `kv_heads`."""
        a = p + "self_attn."
        hd, kvh = head_dim or c.head_dim, kv_heads or c.num_kv_heads
        rows = None
        if gated:  # per head: query rows, then gate rows; regrouped as [all queries | all gates]
            rows = {a + "q_proj": torch.arange(2 * c.num_heads * hd).view(c.num_heads, 2, hd).transpose(0, 1).reshape(-1)}
        qkv = take_linear(w, *(a + n + "_proj" for n in ("qk" if k_eq_v else "qkv")), bias=bias, rows=rows)
        o_proj = take_linear(w, a + "o_proj", bias=bias)
        q_norm, k_norm = w.pop(a + "q_norm.weight", None), w.pop(a + "k_norm.weight", None)
        ones = torch.ones(hd, dtype=torch.float32, device=q_norm.device) if v_norm else None
        return cls(qkv, o_proj, q_norm, k_norm, c.num_heads, kvh, hd, c.rms_norm_eps, slot, norm_offset, gated,
                   window, w.pop(a + "sinks", None), scale, cos_sin, norm_fp32, k_eq_v, ones)

    def __call__(self, h: torch.Tensor, cache, step) -> torch.Tensor:
        """h [T, H] -> [T, H]; K/V written at step.positions of cache.kv (row `slot`)."""
        return self._attend(self.qkv(h), cache, step)

    def after_norm(self, norm, x: torch.Tensor, residual: torch.Tensor | None, cache, step
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`norm(x, residual)` then this attention: (out, new residual; None where `residual` is None). On
        the fused kernels (a plain-style norm, a dense qkv) the norm, the residual add and the q/k/v
        projection are one launch (kernels/fused_linear.norm_linear), whose new residual is a new tensor
        (not `residual` updated in place); anywhere else the unfused norm, then `self`. gpt-oss's norm (its
        fp32 weight applied before the one rounding) fuses too."""
        if isinstance(self.qkv, Dense) and norm.style in ("plain", "fp32") and ops.fused_linear_applies(x):
            qkv, residual = ops.norm_linear(x, norm.weight, norm.eps, self.qkv.weight, self.qkv.bias, residual,
                                            fp32_weight=norm.style == "fp32")
            return self._attend(qkv, cache, step), residual
        h, residual = norm(x, residual)
        return self(h, cache, step), residual

    def _attend(self, qkv: torch.Tensor, cache, step) -> torch.Tensor:
        """The projected rows qkv [T, q | (gate) | k | v] -> [T, H]."""
        t, hd = qkv.shape[0], self.head_dim
        qd, kvd = self.heads * hd, self.kv_heads * hd
        if self.gated:
            q, gate, k, v = qkv.split([qd, qd, kvd, kvd], dim=-1)
        elif self.k_eq_v:
            q, k = qkv.split([qd, kvd], dim=-1)
            v = k
        else:
            q, k, v = qkv.split([qd, kvd, kvd], dim=-1)
        q, k, v = q.view(t, self.heads, hd), k.view(t, self.kv_heads, hd), v.view(t, self.kv_heads, hd)
        q_norm, k_norm = self.q_norm, self.k_norm
        if self.v_norm is not None:
            v, _ = ops.rms_norm(v, self.v_norm, self.eps, fp32_weight=True)
        if self.norm_fp32 and q_norm is not None:  # Gemma's rounding: normed · w in fp32, then once
            q, _ = ops.rms_norm(q, q_norm, self.eps, fp32_weight=True)
            k, _ = ops.rms_norm(k, k_norm, self.eps, fp32_weight=True)
            q_norm = k_norm = None
        cache_k, cache_v = cache.kv.layer(self.slot)
        gate = gate.view(t, self.heads, hd) if self.gated else None  # out × sigmoid(gate): in the kernel's merge
        cos_sin = step.cos_sin if self.cos_sin is None else self.cos_sin
        scale = hd**-0.5 if self.scale is None else self.scale
        # q/k norm, rope and the K/V write, then attention: one launch on the kernels (ops.rope_attention)
        if step.mask is not None:  # a tree verify
            out = self._tree(q, k, v, q_norm, k_norm, cos_sin, scale, cache_k, cache_v, step, gate)
        else:
            out = ops.rope_attention(q, k, v, q_norm, k_norm, self.eps, cos_sin, step.positions, cache_k, cache_v,
                                     step.kv_len, offset=self.norm_offset, causal=True, scale=scale,
                                     sliding_window=self.window, sinks=self.sinks, gate=gate)
        return self.o_proj(out.reshape(t, -1))

    def _tree(self, q, k, v, q_norm, k_norm, cos_sin, scale, cache_k, cache_v, step, gate) -> torch.Tensor:
        """A tree verify (dflash_cli/tree.py): q/k normed and rotated at each node's own position
        (anchor + depth), K/V written at the node's cache row (`step.rows`), attention over the committed keys
        and the node's ancestors (`step.mask`), within the layer's window by position. On the kernels each
        node gets the bits of decoding its path; the torch path runs the masked reference."""
        return ops.rope_tree_attention(q, k, v, q_norm, k_norm, self.eps, cos_sin, step.positions, step.rows,
                                       cache_k, cache_v, step.kv_len, step.mask, step.key_positions,
                                       offset=self.norm_offset, scale=scale, sliding_window=self.window,
                                       sinks=self.sinks, gate=gate)
