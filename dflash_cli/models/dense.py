"""Dense decoders: Qwen3 and Llama 3.x, over a static KV cache.

One forward serves prefill chunks, the verify block and plain decoding: it takes T >= 1 tokens at the
positions after the cache's committed length, writes their K/V, and returns logits only for the
positions asked for and the residual stream only of the layers the drafter reads. Qwen3 and Llama
differ only in Qwen3's per-head q/k RMSNorm (and their rope tables, built in rope.py). Rolling back a
rejected draft is free: its K/V sits past the committed length and is overwritten by the next forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..cache import KVCache
from ..config import Fields, rope_params
from ..rope import rope_table
from .weights import Weight

MODEL_TYPES = ("qwen3", "llama")


@dataclass(frozen=True)
class Config:
    family: str  # "qwen3" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    prefill_scratch = 0  # bytes a prefill allocates beyond its activations (memory.workspace_bytes)

    @property
    def activation_width(self) -> int:
        """The widest per-token activation of a forward, in elements (for the memory plan)."""
        return max(2 * self.intermediate_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)

    @classmethod
    def from_raw(cls, raw: dict, where: Path) -> "Config":
        f = Fields(raw, where)
        f.refuse("attention_bias", "mlp_bias", why="attention/MLP biases are not supported for Qwen3/Llama")
        theta, scaling = rope_params(raw, f)
        hidden, heads = f.req("hidden_size"), f.req("num_attention_heads")
        return cls(
            family=raw["model_type"], vocab_size=f.req("vocab_size"), hidden_size=hidden,
            intermediate_size=f.req("intermediate_size"), num_layers=f.req("num_hidden_layers"), num_heads=heads,
            num_kv_heads=f.opt("num_key_value_heads", heads), head_dim=f.opt("head_dim", None) or hidden // heads,
            rms_norm_eps=f.opt("rms_norm_eps", 1e-6, float), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=f.opt("max_position_embeddings", 4096),
            tie_word_embeddings=f.opt("tie_word_embeddings", False, bool),
        )


def head_weights(c, prefix: str = "model.") -> list[Weight]:
    """Embedding, final norm and lm_head (absent when tied: the embedding serves)."""
    table = [Weight(prefix + "embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed")]
    table.append(Weight(prefix + "norm.weight", (c.hidden_size,), "norm"))
    if not c.tie_word_embeddings:  # a checkpoint without one is tied after all (Qwen3.5-4B ships none)
        table.append(Weight("lm_head.weight", (c.vocab_size, c.hidden_size), gain=4.0,
                            fallback=prefix + "embed_tokens.weight"))
    return table


def attention_weights(c: Config, p: str) -> list[Weight]:
    hd, q, kv = c.head_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    table = [Weight(p + "self_attn.q_proj.weight", (q, c.hidden_size), gain=2.0),
             Weight(p + "self_attn.k_proj.weight", (kv, c.hidden_size), gain=2.0),
             Weight(p + "self_attn.v_proj.weight", (kv, c.hidden_size)),
             Weight(p + "self_attn.o_proj.weight", (c.hidden_size, q))]
    if c.qk_norm:
        table += [Weight(p + "self_attn.q_norm.weight", (hd,), "norm"), Weight(p + "self_attn.k_norm.weight", (hd,), "norm")]
    return table


def layer_weights(c, i: int) -> list[Weight]:
    """Layer i's norms and attention (its MLP is the family's)."""
    p = f"model.layers.{i}."
    return [Weight(p + "input_layernorm.weight", (c.hidden_size,), "norm"),
            Weight(p + "post_attention_layernorm.weight", (c.hidden_size,), "norm")] + attention_weights(c, p)


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    table = head_weights(c)
    for i in range(c.num_layers):
        table += layer_weights(c, i) + mlp_weights(c, f"model.layers.{i}.mlp.", c.intermediate_size)
    return table


def cache_bytes(c: Config, dtype: torch.dtype, block_size: int) -> tuple[int, int]:
    """(bytes per token of context, fixed bytes) of this target's cache."""
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size(), 0


@dataclass
class Attention:
    qkv: torch.Tensor  # q, k and v projections stacked: one GEMM
    o_proj: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str) -> "Attention":
        a = p + "self_attn."
        return cls(torch.cat([w.pop(a + n + "_proj.weight") for n in "qkv"]), w.pop(a + "o_proj.weight"),
                   w.pop(a + "q_norm.weight", None), w.pop(a + "k_norm.weight", None))


def attend(c, attn: Attention, h: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
           cos_sin: torch.Tensor, positions: torch.Tensor, kv_len, scale: float) -> torch.Tensor:
    """Causal GQA self-attention of T new tokens over the cache (their K/V written at `positions`)."""
    t = h.shape[0]
    q, k, v = F.linear(h, attn.qkv).split(
        [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
    q = ops.qk_norm_rope_cache(
        q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim),
        v.view(t, c.num_kv_heads, c.head_dim), attn.q_norm, attn.k_norm, c.rms_norm_eps,
        cos_sin, positions, cache_k, cache_v)
    out = ops.attention(q, cache_k, cache_v, kv_len, causal=True, scale=scale)
    return F.linear(out.reshape(t, -1), attn.o_proj)


@dataclass
class MLP:
    gate_up: torch.Tensor  # gate and up projections stacked: one GEMM
    down: torch.Tensor

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str) -> "MLP":
        return cls(torch.cat((w.pop(p + "gate_proj.weight"), w.pop(p + "up_proj.weight"))), w.pop(p + "down_proj.weight"))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(ops.swiglu(F.linear(h, self.gate_up)), self.down)


def mlp_weights(c, p: str, inter: int) -> list[Weight]:
    return [Weight(p + "gate_proj.weight", (inter, c.hidden_size)), Weight(p + "up_proj.weight", (inter, c.hidden_size)),
            Weight(p + "down_proj.weight", (c.hidden_size, inter))]


@dataclass
class Layer:
    input_norm: torch.Tensor
    attn: Attention
    post_norm: torch.Tensor
    mlp: object  # MLP, or a family's own (models/moe.py): h [T, H] -> [T, H]


class Model:
    """A dense target: `forward` over a static KV cache, `commit` by moving its length."""

    def __init__(self, cfg: Config, w: dict[str, torch.Tensor], max_positions: int):
        """w: the checkpoint's tensors by name (`weight_table`); consumed. max_positions: the rope
        table's length, the most cache slots any engine will use."""
        self.cfg = cfg
        self.embed, self.norm = w.pop("model.embed_tokens.weight"), w.pop("model.norm.weight")
        self.lm_head = w.pop("lm_head.weight", self.embed)
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(Layer(w.pop(p + "input_layernorm.weight"), Attention.take(w, p),
                                     w.pop(p + "post_attention_layernorm.weight"), self._mlp(w, p + "mlp.", i)))
        self.max_positions = max_positions
        self.cos_sin = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, self.embed.device)
        self.scale = cfg.head_dim**-0.5

    def _mlp(self, w: dict[str, torch.Tensor], p: str, i: int):
        return MLP.take(w, p)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, capacity: int, block_size: int = 1) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    def forward(self, ids: torch.Tensor, cache: KVCache, *, logits_from: int | None = None,
                feature_layers: Sequence[int] = (), commit: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ids: [T]. Returns (logits [T - logits_from, V] or None, features [T, len(layers)·H] or None).

        Features are the outputs of decoder layers `feature_layers` (the residual stream before the
        final norm), concatenated in the order given: the drafter's context input. With `commit` the
        T tokens join the sequence at once (a prefill chunk); otherwise `commit(cache, count)` decides
        how many of them do (a verify block)."""
        c, t = self.cfg, ids.shape[0]
        positions = cache.positions(t)
        kv_len = ops.kv_length(cache.length, t)
        wanted = {layer: None for layer in feature_layers}
        x = F.embedding(ids, self.embed)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                h, _ = ops.rms_norm(x, layer.input_norm, c.rms_norm_eps)
                residual = x
            else:
                h, residual = ops.rms_norm(x, layer.input_norm, c.rms_norm_eps, residual)
                if i - 1 in wanted:
                    wanted[i - 1] = residual.clone()
            x = attend(c, layer.attn, h, cache.k[i], cache.v[i], self.cos_sin, positions, kv_len, self.scale)
            h, residual = ops.rms_norm(x, layer.post_norm, c.rms_norm_eps, residual)
            x = layer.mlp(h)
        h, residual = ops.rms_norm(x, self.norm, c.rms_norm_eps, residual)
        if c.num_layers - 1 in wanted:
            wanted[c.num_layers - 1] = residual
        if commit:
            cache.commit(t)
        logits = None if logits_from is None else F.linear(h[logits_from:], self.lm_head)
        features = torch.cat(list(wanted.values()), dim=-1) if wanted else None
        return logits, features

    def commit(self, cache: KVCache, count: int | torch.Tensor) -> None:
        """The first `count` tokens of the last forward join the sequence; the rest of its K/V is
        overwritten by the next one."""
        cache.commit(count)
