"""Dense decoders: Qwen3 and Llama 3.x, over a static KV cache.

They differ only in Qwen3's per-head q/k RMSNorm (and their rope tables, built in rope.py). Rolling back
a rejected draft is free: its K/V sits past the committed length and is overwritten by the next forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import KVCache
from ..config import Fields
from .base import Decoder, DecoderConfig, Family, head_weights, kv_cache_bytes, layer_norm_weights
from .layers.attention import Attention, attention_weights
from .layers.mlp import SwiGLU, mlp_weights
from .weights import Weight

MODEL_TYPES = ("qwen3", "llama")


@dataclass(frozen=True)
class Config(DecoderConfig):
    family: str  # "qwen3" or "llama"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @classmethod
    def from_raw(cls, raw: dict, where: Path) -> "Config":
        f = Fields(raw, where)
        f.refuse("attention_bias", "mlp_bias", why="attention/MLP biases are not supported for Qwen3/Llama")
        return cls(**DecoderConfig.shared(raw, f), family=raw["model_type"])


def layer_weights(c: Config, i: int) -> list[Weight]:
    """Layer i's norms and attention (its MLP is the family's)."""
    p = f"model.layers.{i}."
    return layer_norm_weights(c, p) + attention_weights(p, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                                        qk_norm="norm" if c.qk_norm else None)


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    table = head_weights(c)
    for i in range(c.num_layers):
        table += layer_weights(c, i) + mlp_weights(f"model.layers.{i}.mlp.", c.hidden_size, c.intermediate_size)
    return table


def kv_cache(model: Decoder, capacity: int, block_size: int) -> KVCache:
    c = model.cfg
    return KVCache.allocate(c.num_layers, c.num_kv_heads, c.head_dim, capacity, model.dtype, model.device)


def build(c: Config, w: dict[str, torch.Tensor], max_positions: int, mlp=None) -> Decoder:
    """The decoder from its tensors (consumed); `mlp(i, p)`: a family's own MLPs (default SwiGLU)."""
    return Decoder(c, w, max_positions, norm_style="plain", mixer=lambda i, p: Attention.take(w, p, c, slot=i),
                   mlp=mlp or (lambda i, p: SwiGLU.take(w, p + "mlp.")), cache=kv_cache)


FAMILY = Family(MODEL_TYPES, Config, weight_table, build, kv_cache_bytes)
