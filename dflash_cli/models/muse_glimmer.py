"""Muse-Glimmer-30B (Meta): a dense decoder with sandwich norms, gated attention and a soft-capped head.

The checkpoint is the vision-language wrapper (`MuseGlimmerForConditionalGeneration`: the text config under
`text_config`, weights under `model.language_model.*`; the vision tower is never read). What differs from
the dense family (transformers' models/muse_glimmer/modeling_muse_glimmer.py):
- the token embedding is RMS-normalised without a weight (the drafters embed without that norm);
- each layer is a sandwich: (1 + w) norms before and after the attention and the MLP, the "after" ones
  with `post_norm_eps`; the final norm applies its weight as is, in fp32;
- attention: q and k RMS-normalised per head without a weight, q then times `qk_scale_factor`, the usual
  1/sqrt(head_dim) scale, output × sigmoid(gate_proj(x)); sliding layers see the last `sliding_window`
  keys, the others everything; RoPE per layer (`layer_rope_theta`, 0: none; one table per distinct θ);
- logits × `output_multiplier`, then soft-capped: c·tanh(z / c).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from ..config import Fields
from ..errors import DflashError
from ..rope import rope_table
from . import dense
from .base import Decoder, DecoderConfig, Family, head_weights, kv_cache_bytes, layer_norm_weights
from .layers.attention import Attention, attention_weights
from .layers.linear import Linear, take_linear
from .layers.mlp import SwiGLU, mlp_weights
from .layers.norm import RMSNorm
from .weights import Weight

MODEL_TYPES = ("muse_glimmer",)
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Config(DecoderConfig):
    layer_types: tuple[str, ...]
    sliding_window: int
    layer_rope_theta: tuple[float, ...]  # per layer; 0: no rotary embedding
    qk_scale_factor: float
    output_multiplier: float
    post_norm_eps: float
    prefix: str = "model.language_model."

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def activation_width(self) -> int:
        return max(2 * self.intermediate_size, (2 * self.num_heads + 2 * self.num_kv_heads) * self.head_dim)

    @classmethod
    def from_raw(cls, raw: dict, where: Path) -> "Config":
        text = raw.get("text_config") or {}
        if not text:
            raise DflashError(f"{where}/config.json: a muse_glimmer config keeps its text model under 'text_config'")
        f = Fields(text, where)
        f.refuse("attention_bias", why="attention biases are not supported for Muse-Glimmer")
        act = text.get("hidden_activation", text.get("hidden_act", "silu"))
        if act != "silu":
            raise DflashError(f"{where}/config.json: hidden_activation '{act}' is not supported (Muse-Glimmer: silu)")
        base = DecoderConfig.shared(text, f, eps=1e-5, max_positions=131072, head_dim=128)
        base["tie_word_embeddings"] = bool(text.get("tie_word_embeddings"))
        layers, theta = base["num_layers"], base["rope_theta"]
        nope = [(layers - 1 - i) % 4 == 0 for i in range(layers)]  # MuseGlimmerTextConfig's defaults
        layer_types = tuple(text.get("layer_types") or (FULL if n else SLIDING for n in nope))
        thetas = tuple(float(t) for t in (text.get("layer_rope_theta") or (0 if n else theta for n in nope)))
        if len(layer_types) != layers or set(layer_types) - {SLIDING, FULL} or len(thetas) != layers:
            raise DflashError(f"{where}/config.json: layer_types and layer_rope_theta must give one entry for each "
                              f"of the {layers} layers (sliding_attention or full_attention; a θ, 0 for none)")
        odd = sorted({t for t in thetas if t not in (0.0, theta)})
        if odd:  # transformers 5.25 rotates every such layer with the global θ: two readings, no guess
            raise DflashError(f"{where}/config.json: layer_rope_theta gives {odd[0]:g}, neither 0 nor the global "
                              f"rope_theta {theta:g} (transformers would apply {theta:g}); not supported")
        softcap = f.opt("final_logit_softcapping", 20.0, float)
        return cls(**base, logit_softcap=softcap or None, layer_types=layer_types,
                   sliding_window=f.opt("sliding_window", 2048), layer_rope_theta=thetas,
                   qk_scale_factor=f.opt("qk_scale_factor", 3.87, float),
                   output_multiplier=f.opt("output_multiplier", 0.19611613513818404, float),
                   post_norm_eps=f.opt("post_norm_eps", 1e-8, float))


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    table = head_weights(c, c.prefix, "norm", "float32")
    for i in range(c.num_layers):
        p, h = f"{c.prefix}layers.{i}.", c.hidden_size
        table += layer_norm_weights(c, p, "zero_norm", "float32") + [
            Weight(p + name + ".weight", (h,), "zero_norm", dtype="float32")
            for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm")]
        table += attention_weights(p, h, c.num_heads, c.num_kv_heads, c.head_dim)
        table.append(Weight(p + "self_attn.gate_proj.weight", (c.num_heads * c.head_dim, h), gain=2.0))
        table += mlp_weights(p + "mlp.", h, c.intermediate_size)
    return table


@dataclass
class Sandwiched:
    """A sublayer whose output is normed before it joins the residual stream."""

    inner: object  # the attention (h, cache, step) or the MLP (h)
    norm: RMSNorm

    def __call__(self, *args) -> torch.Tensor:
        return self.norm(self.inner(*args))[0]


@dataclass
class ScaledHead:
    """The lm_head's logits times `output_multiplier` (before the Decoder's soft-cap)."""

    head: Linear
    multiplier: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.multiplier


class MuseDecoder(Decoder):
    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The token embedding, RMS-normalised without a weight (eps: rms_norm_eps)."""
        x = super().embedding(ids)
        return ops.rms_norm(x, self.unit, self.cfg.rms_norm_eps, fp32_weight=True)[0]


def rope_tables(c: Config, max_positions: int, device: torch.device) -> dict[float, torch.Tensor | None]:
    """θ -> the rope table of the layers with that θ: None for the global one (the step's own table), the
    identity (cos 1, sin 0: q and k pass unchanged, exactly) for 0, its own table for any other."""
    tables: dict[float, torch.Tensor | None] = {c.rope_theta: None}
    for theta in set(c.layer_rope_theta) - {c.rope_theta}:
        if theta == 0:
            ones = torch.ones(max_positions, c.head_dim // 2, device=device)
            tables[theta] = torch.cat((ones, torch.zeros_like(ones)), -1)
        else:
            tables[theta] = rope_table(c.head_dim, theta, c.rope_scaling, max_positions, device)
    return tables


def build(c: Config, w: dict[str, torch.Tensor], max_positions: int) -> Decoder:
    device = w[c.prefix + "embed_tokens.weight"].device
    tables = rope_tables(c, max_positions, device)
    q_norm = torch.full((c.head_dim,), c.qk_scale_factor, dtype=torch.float32, device=device)  # weightless · scale
    k_norm = torch.ones(c.head_dim, dtype=torch.float32, device=device)

    def attention(i: int, p: str) -> Attention:
        a = p + "self_attn."
        qkv = take_linear(w, a + "q_proj", a + "gate_proj", a + "k_proj", a + "v_proj")  # [q | gate | k | v]
        return Attention(qkv, take_linear(w, a + "o_proj"), q_norm, k_norm, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.rms_norm_eps, i, gated=True, window=c.window(i), cos_sin=tables[c.layer_rope_theta[i]])

    def mlp(i: int, p: str) -> Sandwiched:
        return Sandwiched(SwiGLU.take(w, p + "mlp."),
                          RMSNorm.take(w, p + "post_feedforward_layernorm.weight", c.post_norm_eps, "offset"))

    model = MuseDecoder(c, w, max_positions, norm_style="offset", mixer=attention, mlp=mlp, cache=dense.kv_cache,
                        prefix=c.prefix)
    # The Decoder reads pre-norm layers: the norm it took as post_attention becomes the attention output's
    # (post_norm_eps), and the pre-feedforward norm is the one fused with the residual.
    for i, layer in enumerate(model.layers):
        layer.mixer = Sandwiched(layer.mixer, RMSNorm(layer.post_norm.weight, c.post_norm_eps, "offset"))
        layer.post_norm = RMSNorm.take(w, f"{c.prefix}layers.{i}.pre_feedforward_layernorm.weight", c.rms_norm_eps,
                                       "offset")
    model.norm = RMSNorm(model.norm.weight, c.rms_norm_eps, "fp32")
    model.unit = torch.ones(c.hidden_size, dtype=torch.float32, device=device)
    model.head = ScaledHead(model.head, c.output_multiplier)
    return model


FAMILY = Family(MODEL_TYPES, Config, weight_table, build, kv_cache_bytes)
