"""Gemma 4 (12B, 31B, 26B-A4B): the text decoder of `gemma4` / `gemma4_unified` (weights under
`model.language_model.*`, the text config under `text_config`; the vision and audio towers are never
read) and of a text-only export (`gemma4_text`, `gemma4_unified_text`: `model.*`).

What differs from the dense family: layers are `layer_types` (five sliding layers of window
`sliding_window`, then one global; the last is always global); global layers have their own head
geometry (`global_head_dim`, `num_global_key_value_heads`: two K/V shapes, one cache group each), with
`attention_k_eq_v` no v_proj (the keys' projection is the values too) and a "proportional" rope (the
first quarter of the frequency pairs of a 512-dim head rotate, the rest pass through: rope.py); every
layer RMS-normalises q and k (weights applied in fp32) and v (unscaled), and attends with scale 1.0.
Norms apply their fp32 weight as is (not 1 + w). A layer is sandwiched: norm → attention → norm, added
to the stream; norm → GELU-tanh MLP (in 26B-A4B plus, in parallel, 128 routed experts, each branch
with its own norms) → norm, added; then the whole stream times the layer's `layer_scalar`. Embeddings
are scaled by √hidden; logits are soft-capped (`final_logit_softcapping`, 30).
Per-layer embeddings and KV sharing (E2B/E4B only) are refused by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import GroupedKVCache
from ..config import Fields
from ..errors import DflashError
from ..rope import rope_table
from .base import Decoder, DecoderConfig, Family, StepPlan, head_weights, layer_norm_weights
from .layers.attention import Attention, attention_weights
from .layers.mlp import FUSED, PER_EXPERT, GeluGLU, GemmaExperts, gemma_expert_weights, mlp_weights
from .layers.norm import RMSNorm
from .weights import Weight

MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
SLIDING, FULL = "sliding_attention", "full_attention"
# What transformers' Gemma4TextConfig fills in when config.json leaves it out (configuration_gemma4.py).
DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
DEFAULT_WINDOW = {"gemma4_text": 512, "gemma4_unified_text": 1024}


def default_layer_types(layers: int) -> list[str]:
    """Five sliding layers, then a global one; the last layer global whatever the pattern says."""
    return [SLIDING if (i + 1) % 6 else FULL for i in range(layers - 1)] + [FULL]


@dataclass(frozen=True)
class Config(DecoderConfig):
    prefix: str  # "model.language_model." (a wrapper) or "model." (a text-only export)
    layer_types: tuple[str, ...]
    sliding_window: int
    global_head_dim: int
    global_kv_heads: int
    k_eq_v: bool  # global layers: no v_proj
    global_rope_theta: float
    global_rope_scaling: dict | None
    num_experts: int = 0  # 26B-A4B: routed experts beside the dense MLP in every layer
    top_k: int = 0
    moe_intermediate_size: int = 0

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == FULL

    def kv_shape(self, layer: int) -> tuple[int, int]:
        """(kv heads, head dim) of layer `layer`."""
        return (self.global_kv_heads, self.global_head_dim) if self.is_global(layer) else \
            (self.num_kv_heads, self.head_dim)

    @property
    def activation_width(self) -> int:
        qkv = max((self.num_heads + 2 * kv) * d for kv, d in map(self.kv_shape, range(self.num_layers)))
        return max(2 * self.intermediate_size, qkv, 2 * self.moe_intermediate_size + self.num_experts)

    @property
    def prefill_scratch(self) -> int:
        """A verify/decode step gathers one rank's expert matrices per token (GATHER_ROWS tokens at most)."""
        return 32 * 3 * self.moe_intermediate_size * self.hidden_size * 4 if self.num_experts else 0

    @classmethod
    def from_raw(cls, raw: dict, where: Path) -> "Config":
        wrapper = raw.get("model_type") in ("gemma4", "gemma4_unified")
        text = raw.get("text_config") if wrapper else raw
        if not isinstance(text, dict):
            raise DflashError(f"{where}/config.json: a {raw.get('model_type')} checkpoint needs a text_config")
        text_type = text.get("model_type") or (
            "gemma4_unified_text" if "unified" in raw["model_type"] else "gemma4_text")
        f = Fields(text, where)
        layers = f.req("num_hidden_layers")
        # Per-layer embeddings default on in Gemma4TextConfig (256): a config that leaves the key out has them.
        ple = text.get("hidden_size_per_layer_input", 256 if text_type == "gemma4_text" else 0)
        for key, value in (("hidden_size_per_layer_input", ple),
                           ("num_kv_shared_layers", text.get("num_kv_shared_layers", 0))):
            if value:
                raise DflashError(f"{where}/config.json: '{key}' = {value} (per-layer embeddings / KV sharing, the "
                                  "Gemma 4 E2B/E4B models) is not supported by this version")
        f.refuse("attention_bias", why="attention biases are not supported for Gemma 4")
        if text.get("use_bidirectional_attention") == "all":
            raise DflashError(f"{where}/config.json: use_bidirectional_attention 'all' (a non-causal Gemma 4) "
                              "is not supported")
        act = text.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise DflashError(f"{where}/config.json: hidden_activation '{act}' is not supported (Gemma 4 uses "
                              "gelu_pytorch_tanh)")
        layer_types = list(text.get("layer_types") or default_layer_types(layers))
        if len(layer_types) != layers or set(layer_types) - {SLIDING, FULL}:
            raise DflashError(f"{where}/config.json: layer_types must give {SLIDING} or {FULL} "
                              f"for each of the {layers} layers")
        layer_types[-1] = FULL  # as transformers forces it
        rope = text.get("rope_parameters") or DEFAULT_ROPE
        if not all(isinstance(rope.get(t), dict) for t in set(layer_types)):
            raise DflashError(f"{where}/config.json: rope_parameters must give the rope of "
                              f"{' and '.join(sorted(set(layer_types)))} layers")
        (theta, scaling), (g_theta, g_scaling) = (_rope(rope.get(t) or DEFAULT_ROPE[t], where)
                                                  for t in (SLIDING, FULL))
        k_eq_v = f.opt("attention_k_eq_v", False, bool)
        kv_heads = f.opt("num_key_value_heads", f.req("num_attention_heads"))
        global_kv = f.opt("num_global_key_value_heads", None) if k_eq_v else None
        global_head_dim = f.opt("global_head_dim", 512)
        if text.get("per_layer_config") is not None:  # how transformers >= 5.2x saves the global geometry
            global_head_dim, global_kv = _per_layer_geometry(text["per_layer_config"], layer_types,
                                                             f.opt("head_dim", 256), kv_heads, where)
        moe = f.opt("enable_moe_block", False, bool)
        base = dict(
            vocab_size=f.req("vocab_size"), hidden_size=f.req("hidden_size"),
            intermediate_size=f.req("intermediate_size"),
            num_layers=layers, num_heads=f.req("num_attention_heads"), num_kv_heads=kv_heads,
            head_dim=f.opt("head_dim", 256), rms_norm_eps=f.opt("rms_norm_eps", 1e-6, float), rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=f.opt("max_position_embeddings", 131072),
            tie_word_embeddings=Fields(raw, where).opt("tie_word_embeddings", text.get("tie_word_embeddings", True),
                                                       bool),
            logit_softcap=f.opt("final_logit_softcapping", None, float) or None)
        return cls(**base, prefix="model.language_model." if wrapper else "model.", layer_types=tuple(layer_types),
                   sliding_window=f.opt("sliding_window", DEFAULT_WINDOW.get(text_type, 512)),
                   global_head_dim=global_head_dim, global_kv_heads=global_kv or kv_heads,
                   k_eq_v=k_eq_v, global_rope_theta=g_theta, global_rope_scaling=g_scaling,
                   num_experts=f.req("num_experts") if moe else 0, top_k=f.req("top_k_experts") if moe else 0,
                   moe_intermediate_size=f.req("moe_intermediate_size") if moe else 0)



def _per_layer_geometry(overrides, layer_types: list[str], head_dim: int, kv_heads: int,
                        where: Path) -> tuple[int, int]:
    """(global head_dim, global KV heads) from `per_layer_config` ({layer: {attribute: value}}), which is how
    transformers' Gemma4TextConfig saves `global_head_dim` / `num_global_key_value_heads`: one override
    per global layer. Anything else it could say (another attribute, a sliding layer of its own shape,
    global layers of different shapes) is not a Gemma 4 dflash runs, and is refused by name."""
    if not isinstance(overrides, dict):
        raise DflashError(f"{where}/config.json: per_layer_config must map layer indices to overrides")
    shapes = {}
    for key, value in overrides.items():
        if not (str(key).isdigit() and int(key) < len(layer_types) and isinstance(value, dict)):
            raise DflashError(f"{where}/config.json: per_layer_config['{key}'] must be the overrides of one of "
                              f"the {len(layer_types)} layers")
        unknown = set(value) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise DflashError(f"{where}/config.json: per_layer_config['{key}'] overrides "
                              f"{', '.join(sorted(unknown))}; dflash reads only head_dim and num_key_value_heads")
        shapes[int(key)] = (int(value.get("head_dim", head_dim)), int(value.get("num_key_value_heads", kv_heads)))
    per_layer = [shapes.get(i, (head_dim, kv_heads)) for i in range(len(layer_types))]
    sliding = {per_layer[i] for i, t in enumerate(layer_types) if t == SLIDING}
    full = {per_layer[i] for i, t in enumerate(layer_types) if t == FULL}
    if sliding - {(head_dim, kv_heads)} or len(full) != 1:
        raise DflashError(f"{where}/config.json: per_layer_config gives layers of one type different shapes; "
                          "dflash runs one head shape for sliding and one for global layers")
    return full.pop()


def _rope(params: dict, where: Path) -> tuple[float, dict | None]:
    """(theta, scaling or None) of one layer type's rope_parameters."""
    if params.get("rope_theta") is None:
        raise DflashError(f"{where}/config.json: rope_parameters is missing 'rope_theta'")
    return float(params["rope_theta"]), None if params.get("rope_type", "default") == "default" else dict(params)


def layout_of(names) -> str:
    """The routed experts' layout: transformers' fused stacks (`experts.gate_up_proj`, as released or stored
    quantized) or, as quantizing at load writes them, per expert (`experts.{e}.gate_proj.weight_packed`...)."""
    return PER_EXPERT if any(re.search(r"(^|\.)experts\.\d+\.gate_proj\.", n) for n in names) else FUSED


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    table = head_weights(c, c.prefix, norm_dtype="float32")
    for i in range(c.num_layers):
        p = f"{c.prefix}layers.{i}."
        kv, hd = c.kv_shape(i)
        table += layer_norm_weights(c, p, norm_dtype="float32") + attention_weights(
            p, c.hidden_size, c.num_heads, kv, hd, qk_norm="norm", norm_dtype="float32",
            k_eq_v=c.k_eq_v and c.is_global(i))
        norms = ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if c.num_experts:
            norms += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
            experts = gemma_expert_weights(p, c.hidden_size, c.num_experts, c.moe_intermediate_size)
            if layout == PER_EXPERT:  # quantized at load: one projection per expert (quant/quantize.py)
                experts = [x for x in experts if ".router." in x.name] + [
                    x for e in range(c.num_experts)
                    for x in mlp_weights(f"{p}experts.{e}.", c.hidden_size, c.moe_intermediate_size)]
            table += experts
        table += [Weight(p + n + ".weight", (c.hidden_size,), "norm", dtype="float32") for n in norms]
        table += mlp_weights(p + "mlp.", c.hidden_size, c.intermediate_size)
        table.append(Weight(p + "layer_scalar", (1,), "norm"))
    return table


@dataclass
class FeedForward:
    """The second half of a Gemma 4 layer, from the attention's normed output `a` and the stream `x`."""

    pre_norm: RMSNorm
    mlp: GeluGLU
    post_norm: RMSNorm
    scalar: torch.Tensor  # [1]: the layer's output (the whole stream) times this
    experts: GemmaExperts | None = None  # 26B-A4B: with the three norms of its branch
    pre_norm_2: RMSNorm | None = None
    post_norm_1: RMSNorm | None = None
    post_norm_2: RMSNorm | None = None

    def __call__(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + a
        h, _ = self.pre_norm(x)
        m = self.mlp(h)
        if self.experts is not None:
            h2, _ = self.pre_norm_2(x)
            m = self.post_norm_1(m)[0] + self.post_norm_2(self.experts(h2, x))[0]
        m, _ = self.post_norm(m)
        return (x + m) * self.scalar


class Gemma4Decoder(Decoder):
    """The shared Decoder with Gemma's sandwiched layers (no fused residual: the layer scalar multiplies
    the whole stream)."""

    def run_layers(self, x: torch.Tensor, cache, step: StepPlan, wanted: dict[int, torch.Tensor | None]
                   ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h, _ = layer.input_norm(x)
            a, _ = layer.post_norm(layer.mixer(h, cache, step))
            x = layer.mlp(a, x)
            if i in wanted:
                wanted[i] = x
        h, _ = self.norm(x)
        return h


def kv_cache(model: Decoder, capacity: int, block_size: int) -> GroupedKVCache:
    c = model.cfg
    return GroupedKVCache.allocate_groups([c.kv_shape(i) for i in range(c.num_layers)], capacity, model.dtype,
                                          model.device)


def cache_bytes(c: Config, dtype: torch.dtype, block_size: int) -> tuple[int, int]:
    """K/V bytes per token over both layer shapes (every layer keeps the whole context)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * kv * d * size for kv, d in map(c.kv_shape, range(c.num_layers))), 0


def build(c: Config, w: dict[str, torch.Tensor], max_positions: int) -> Decoder:
    device = w[c.prefix + "embed_tokens.weight"].device
    global_table = rope_table(c.global_head_dim, c.global_rope_theta, c.global_rope_scaling, max_positions, device)
    eps = c.rms_norm_eps

    def mixer(i: int, p: str) -> Attention:
        kv, hd = c.kv_shape(i)
        glob = c.is_global(i)
        return Attention.take(w, p, c, slot=i, window=None if glob else c.sliding_window, head_dim=hd, kv_heads=kv,
                              k_eq_v=c.k_eq_v and glob, v_norm=True, scale=1.0,
                              cos_sin=global_table if glob else None, norm_fp32=True)

    def mlp(i: int, p: str) -> FeedForward:
        def norm(name: str) -> RMSNorm:
            return RMSNorm.take(w, p + name + ".weight", eps, "fp32")

        ff = FeedForward(norm("pre_feedforward_layernorm"), GeluGLU.take(w, p + "mlp."),
                         norm("post_feedforward_layernorm"), w.pop(p + "layer_scalar"))
        if c.num_experts:
            ff.experts = GemmaExperts.take(w, p, c.top_k, eps)
            ff.pre_norm_2, ff.post_norm_1, ff.post_norm_2 = (norm(n) for n in (
                "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"))
        return ff

    return Gemma4Decoder(c, w, max_positions, norm_style="fp32", mixer=mixer, mlp=mlp, cache=kv_cache, prefix=c.prefix)


# Gemma 4 thinks when its system turn starts with <|think|> (formats/gemma4.py).
FAMILY = Family(MODEL_TYPES, Config, weight_table, build, cache_bytes, layout_of=layout_of)
