"""gpt-oss-20b / 120b: a mixture-of-experts decoder with attention sinks, a sliding window on alternate
layers and its experts kept MXFP4-packed.

What differs from the dense family, layer by layer: q/k/v/o have biases and no q/k norm; every query
head has a sink (one more logit in its softmax's denominator, whose share is dropped); even layers
("sliding_attention") see only the last `sliding_window` keys (HF's q - k < window), odd ones
everything; the rope table is YaRN (factor 32, no truncation: rope.py); RMSNorm applies its float32
weight before the one rounding; the MLP is gpt-oss's experts (models/layers/mlp.py). Cache and commit
are the dense family's: one static K/V cache, rolled back by its length.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Fields
from ..errors import DflashError
from . import dense
from .base import Decoder, DecoderConfig, Family, head_weights, kv_cache_bytes, layer_norm_weights
from .layers.attention import Attention, attention_weights
from .layers.mlp import DENSE, MXFP4, GptOssExperts, gpt_oss_expert_weights, gpt_oss_layout_of
from .weights import Weight

MODEL_TYPES = ("gpt_oss",)
layout_of = gpt_oss_layout_of

# What transformers' GptOssConfig fills in when config.json leaves it out (configuration_gpt_oss.py).
DEFAULT_THETA = 150000.0
DEFAULT_WINDOW = 128
DEFAULT_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def default_layer_types(num_layers: int) -> list[str]:
    """Even layers slide, odd ones see everything (GptOssConfig's default, and the released configs')."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def with_transformers_defaults(raw: dict) -> dict:
    """A gpt_oss config.json as transformers' AutoConfig reads it: the keys it leaves out take
    GptOssConfig's defaults (alternating sliding layers of 128, YaRN factor 32, θ 150000). The gpt-oss
    DFlash drafters ship such a config (no rope or window keys): this is what SGLang sees."""
    out = dict(raw)
    out.setdefault("layer_types", default_layer_types(int(raw.get("num_hidden_layers") or 0)))
    out.setdefault("sliding_window", DEFAULT_WINDOW)
    params = raw.get("rope_parameters") or {}
    out.setdefault("rope_theta", params.get("rope_theta", DEFAULT_THETA))
    if not raw.get("rope_scaling") and not params:
        out["rope_scaling"] = dict(DEFAULT_YARN)
    return out


@dataclass(frozen=True)
class Config(DecoderConfig):
    layer_types: tuple[str, ...]
    sliding_window: int | None
    num_experts: int
    top_k: int
    swiglu_limit: float
    swiglu_alpha: float
    quant: str  # MXFP4 (the release) or DENSE (a dequantised export)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def activation_width(self) -> int:
        return max((self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                   2 * self.top_k * self.intermediate_size, self.num_experts)

    @property
    def prefill_scratch(self) -> int:
        """A long prefill chunk dequantises one MXFP4 expert at a time (kernels/moe.py
        experts_by_expert): its gate_up [2I, H] through float32 values and int32 nibble indices (about
        12 bytes an element at the peak), with the dequantised copies of both matrices alive."""
        if self.quant != MXFP4:
            return 0
        elements = self.intermediate_size * self.hidden_size
        return 12 * 2 * elements + 2 * 3 * elements

    @classmethod
    def from_raw(cls, raw: dict, where: Path) -> "Config":
        raw = with_transformers_defaults(raw)
        f = Fields(raw, where)
        layers, hidden = f.req("num_hidden_layers"), f.req("hidden_size")
        layer_types = tuple(raw["layer_types"])
        if len(layer_types) != layers or set(layer_types) - {"sliding_attention", "full_attention"}:
            raise DflashError(f"{where}/config.json: layer_types must give sliding_attention or full_attention "
                              f"for each of the {layers} layers")
        window = f.opt("sliding_window", None)
        if "sliding_attention" in layer_types and not window:
            raise DflashError(f"{where}/config.json: sliding_attention layers need a sliding_window")
        quant = MXFP4 if (raw.get("quantization_config") or {}).get("quant_method") == "mxfp4" else DENSE
        base = DecoderConfig.shared(raw, f, eps=1e-5, max_positions=131072, rope_drop=("rope_theta",))
        inter = base["intermediate_size"]
        if quant == MXFP4 and (hidden % 32 or inter % 32):
            raise DflashError(f"{where}/config.json: MXFP4 experts need hidden_size and intermediate_size "
                              f"to be multiples of 32 (got {hidden} and {inter})")
        top_k = raw.get("num_experts_per_tok", raw.get("experts_per_token"))
        if top_k is None:
            f.req("num_experts_per_tok")
        return cls(**base, layer_types=layer_types, sliding_window=window, num_experts=f.req("num_local_experts"),
                   top_k=int(top_k), swiglu_limit=f.opt("swiglu_limit", 7.0, float),
                   swiglu_alpha=f.opt("swiglu_alpha", 1.702, float), quant=quant)


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    """layout: MXFP4 or DENSE, as `layout_of` reads the checkpoint; anything else (None, or the synthetic
    bench's "fused") means what config.json says."""
    layout = layout if layout in (MXFP4, DENSE) else c.quant
    table = head_weights(c, norm_dtype="float32")
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        table += layer_norm_weights(c, p, norm_dtype="float32") + attention_weights(
            p, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, bias=True, sinks=True)
        table += gpt_oss_expert_weights(p + "mlp.", c.hidden_size, c.num_experts, c.intermediate_size, layout)
    return table


def build(c: Config, w: dict[str, torch.Tensor], max_positions: int) -> Decoder:
    return Decoder(c, w, max_positions, norm_style="fp32",
                   mixer=lambda i, p: Attention.take(w, p, c, slot=i, bias=True, window=c.window(i)),
                   mlp=lambda i, p: GptOssExperts.take(w, p + "mlp.", c.top_k, c.swiglu_limit, c.swiglu_alpha),
                   cache=dense.kv_cache)


# gpt-oss always reasons (harmony's analysis channel): --think/--no-think set its effort.
FAMILY = Family(MODEL_TYPES, Config, weight_table, build, kv_cache_bytes, layout_of=layout_of,
                drafter_defaults=with_transformers_defaults)
