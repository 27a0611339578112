"""Qwen3.5 / 3.6 / 3.8 hybrid decoders: Gated DeltaNet linear attention in three of every four layers,
gated full attention in the rest, with exact rollback (models/layers/gated_delta.py).

The checkpoint is the vision-language wrapper (`Qwen3_5ForConditionalGeneration`: the text config under
`text_config`, weights under `model.language_model.*`; `model.visual.*` and `mtp.*` are never read) or a
text-only export (`model.*`). Every RMSNorm is zero-centred, `(1 + w)` applied in fp32, except the gated
output norm of the linear layers. Full layers: a per-head interleaved query/gate projection, q/k norms,
rotary embedding on the first quarter of each 256-dim head, output × sigmoid(gate).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import KVCache
from ..config import Fields
from ..errors import DflashError
from .base import Decoder, DecoderConfig, Family, head_weights, kv_cache_bytes, layer_norm_weights
from .layers.attention import Attention, attention_weights
from .layers.gated_delta import GatedDeltaNet, GatedDeltaShape, HybridCache, RecurrentCache, gated_delta_weights
from .layers.mlp import MoE, SwiGLU, mlp_weights, moe_layout_of, moe_weights
from .weights import Weight

MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True)
class Config(DecoderConfig):
    rotary_dim: int  # the leading dims of each head that are rotated (a quarter, by default)
    layer_types: tuple[str, ...]  # LINEAR or FULL per layer
    conv_kernel: int
    key_head_dim: int
    value_head_dim: int
    num_key_heads: int
    num_value_heads: int
    prefix: str  # "model.language_model." (the VL wrapper) or "model." (a text-only export)
    num_experts: int = 0  # the MoE variant (35B-A3B): experts in every layer, renormalised, plus a shared expert
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    @property
    def gdn(self) -> GatedDeltaShape:
        return GatedDeltaShape(self.num_key_heads, self.num_value_heads, self.key_head_dim, self.value_head_dim,
                               self.conv_kernel)

    @property
    def key_dim(self) -> int:
        return self.gdn.key_dim

    @property
    def value_dim(self) -> int:
        return self.gdn.value_dim

    @property
    def conv_dim(self) -> int:
        return self.gdn.conv_dim

    @property
    def activation_width(self) -> int:
        return max(2 * self.intermediate_size, self.conv_dim + self.value_dim + 2 * self.num_value_heads,
                   (2 * self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                   2 * self.top_k * self.moe_intermediate_size, 2 * self.shared_expert_intermediate_size)

    @classmethod
    def from_raw(cls, raw: dict, where: Path) -> "Config":
        text = raw.get("text_config") or raw
        f = Fields(text, where)
        f.refuse("attention_bias", why="attention biases are not supported for Qwen3.5")
        if text.get("attn_output_gate") is False:
            raise DflashError(f"{where}: attn_output_gate false is not supported (every released Qwen3.5 gates)")
        moe = raw.get("model_type", "").startswith("qwen3_5_moe") or text.get("num_experts")
        base = DecoderConfig.shared(text, f, max_positions=32768, head_dim=256, intermediate=not moe,
                                    rope_drop=("mrope_section", "mrope_interleaved"))
        base["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        partial = float((text.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                                 text.get("partial_rotary_factor", 0.25)))
        layers = base["num_layers"]
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = f.opt("full_attention_interval", 4)
            layer_types = [LINEAR if (i + 1) % interval else FULL for i in range(layers)]
        if len(layer_types) != layers or set(layer_types) - {LINEAR, FULL}:
            raise DflashError(f"{where}/config.json: layer_types must give linear_attention or full_attention "
                              f"for each of the {layers} layers")
        experts = dict(num_experts=f.req("num_experts"), top_k=f.req("num_experts_per_tok"),
                       moe_intermediate_size=f.req("moe_intermediate_size"),
                       shared_expert_intermediate_size=f.opt("shared_expert_intermediate_size", 0)) if moe else {}
        cfg = cls(**base, rotary_dim=int(base["head_dim"] * partial), layer_types=tuple(layer_types),
                  conv_kernel=f.opt("linear_conv_kernel_dim", 4), key_head_dim=f.opt("linear_key_head_dim", 128),
                  value_head_dim=f.opt("linear_value_head_dim", 128), num_key_heads=f.opt("linear_num_key_heads", 16),
                  num_value_heads=f.opt("linear_num_value_heads", 32),
                  prefix="model.language_model." if "text_config" in raw else "model.", **experts)
        if cfg.num_value_heads % cfg.num_key_heads or cfg.rotary_dim % 2:
            raise DflashError(f"{where}/config.json: linear value heads must be a multiple of key heads, "
                              "and the rotary dims even")
        return cfg


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    table = head_weights(c, c.prefix, "zero_norm", "float32")
    for i in range(c.num_layers):
        p, h = f"{c.prefix}layers.{i}.", c.hidden_size
        table += layer_norm_weights(c, p, "zero_norm", "float32")
        if c.layer_types[i] == LINEAR:
            table += gated_delta_weights(p, h, c.gdn)
        else:
            table += attention_weights(p, h, c.num_heads, c.num_kv_heads, c.head_dim, qk_norm="zero_norm",
                                       norm_dtype="float32", gate=True)
        table += moe_weights(p + "mlp.", h, c.num_experts, c.moe_intermediate_size, layout,
                             c.shared_expert_intermediate_size) if c.num_experts else \
            mlp_weights(p + "mlp.", h, c.intermediate_size)
    return table


def cache_bytes(c: Config, dtype: torch.dtype, block_size: int) -> tuple[int, int]:
    """K/V of the full layers per token; fixed: the linear layers' states and conv windows three times
    (the live ones, the prefix snapshot a chat keeps, and the copy a graph capture or a cost
    measurement holds while it runs), and the verify record the commit replays (~40 MiB at 27B, B = 16)."""
    size = torch.tensor([], dtype=dtype).element_size()
    n, s = len(c.linear_layers), c.gdn
    state, conv = n * s.state_bytes(), n * (s.conv_kernel - 1) * s.conv_dim * size
    record = n * block_size * s.record_bytes(size)
    return kv_cache_bytes(c, dtype, block_size, len(c.full_layers))[0], 3 * (state + conv) + record


def hybrid_cache(model: Decoder, capacity: int, block_size: int) -> HybridCache:
    c = model.cfg
    return HybridCache(KVCache.allocate(len(c.full_layers), c.num_kv_heads, c.head_dim, capacity, model.dtype,
                                        model.device),
                       RecurrentCache.allocate(len(c.linear_layers), c.gdn, block_size, model.dtype, model.device))


def build(c: Config, w: dict[str, torch.Tensor], max_positions: int) -> Decoder:
    def mixer(i: int, p: str):
        if c.layer_types[i] == LINEAR:
            return GatedDeltaNet.take(w, p, c.gdn, c.rms_norm_eps, slot=c.linear_layers.index(i))
        return Attention.take(w, p, c, slot=c.full_layers.index(i), gated=True, norm_offset=True)

    def mlp(i: int, p: str):
        if c.num_experts:
            return MoE.take(w, p + "mlp.", c.num_experts, c.top_k, renormalize=True)
        return SwiGLU.take(w, p + "mlp.")

    return Decoder(c, w, max_positions, norm_style="offset", mixer=mixer, mlp=mlp, cache=hybrid_cache,
                   prefix=c.prefix, rotary_dim=c.rotary_dim)


# The Qwen3.5 / 3.6 drafters were trained with thinking on.
FAMILY = Family(MODEL_TYPES, Config, weight_table, build, cache_bytes, layout_of=moe_layout_of)
