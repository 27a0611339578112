"""Qwen3-MoE decoders (Qwen3-Coder-30B-A3B): Qwen3's attention, a mixture of experts for the MLP.

128 experts, 8 per token, renormalised (`norm_topk_prob`); no shared expert, no expert biases. Layers in
`mlp_only_layers`, or off the `decoder_sparse_step`, keep a dense MLP. Everything else (attention, cache,
commit) is the dense family's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Fields
from . import dense
from .base import Decoder, Family, head_weights, kv_cache_bytes
from .layers.mlp import MoE, SwiGLU, mlp_weights, moe_layout_of, moe_weights
from .weights import Weight

MODEL_TYPES = ("qwen3_moe",)


@dataclass(frozen=True)
class Config(dense.Config):
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    dense_layers: tuple[int, ...]  # layers with a dense MLP instead of experts

    @property
    def qk_norm(self) -> bool:
        return True

    @property
    def activation_width(self) -> int:
        return max(super().activation_width, 2 * self.top_k * self.moe_intermediate_size)

    @classmethod
    def from_raw(cls, raw: dict, where: Path) -> "Config":
        base = dense.Config.from_raw(raw | {"intermediate_size": raw.get("intermediate_size") or 0}, where)
        f = Fields(raw, where)
        layers, step = base.num_layers, f.opt("decoder_sparse_step", 1)
        only = set(raw.get("mlp_only_layers") or [])
        dense_layers = tuple(i for i in range(layers) if i in only or (i + 1) % step)
        if dense_layers and not base.intermediate_size:
            f.req("intermediate_size")  # a dense layer needs its size: one line naming the key
        return cls(**vars(base), num_experts=f.req("num_experts"), top_k=f.req("num_experts_per_tok"),
                   moe_intermediate_size=f.req("moe_intermediate_size"),
                   norm_topk_prob=f.opt("norm_topk_prob", False, bool), dense_layers=dense_layers)


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    table = head_weights(c)
    for i in range(c.num_layers):
        p = f"model.layers.{i}.mlp."
        mlp = mlp_weights(p, c.hidden_size, c.intermediate_size) if i in c.dense_layers else \
            moe_weights(p, c.hidden_size, c.num_experts, c.moe_intermediate_size, layout)
        table += dense.layer_weights(c, i) + mlp
    return table


def build(c: Config, w: dict[str, torch.Tensor], max_positions: int) -> Decoder:
    def mlp(i: int, p: str):
        if i in c.dense_layers:
            return SwiGLU.take(w, p + "mlp.")
        return MoE.take(w, p + "mlp.", c.num_experts, c.top_k, c.norm_topk_prob)

    return dense.build(c, w, max_positions, mlp)


FAMILY = Family(MODEL_TYPES, Config, weight_table, build, kv_cache_bytes, layout_of=moe_layout_of)
