"""gpt-oss-20b / 120b (research/moe-gptoss.md §2): a mixture-of-experts decoder with attention sinks,
a sliding window on alternate layers and its experts kept MXFP4-packed.

What differs from the dense family, layer by layer (§2.4): q/k/v/o have biases and no q/k norm;
every query head has a sink (one more logit in its softmax's denominator, whose share is dropped);
even layers ("sliding_attention") see only the last `sliding_window` keys (HF's q - k < window), odd
ones everything; the rope table is YaRN (factor 32, no truncation: rope.py); RMSNorm applies its
float32 weight before the one rounding; the MLP is a router with a bias over 32 or 128 experts whose
softmax runs over the top 4 logits only, then the clamped SwiGLU of experts with biases (kernels/moe.py).

Experts load as released: `*_blocks` / `*_scales` as raw u8 (17 bytes per 32 weights, dequantised
inside the expert kernel), or, for a dequantised bf16 export, transformers' dense parameters under the
same names without the suffixes ([E, in, out]: transposed once at load into the kernels' [E, out, in]).
Cache and commit are the dense family's: one static K/V cache, rolled back by its length.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..cache import KVCache
from ..config import Fields
from ..errors import DflashError
from ..rope import rope_table
from . import dense
from .weights import Weight

MODEL_TYPES = ("gpt_oss",)
THINKS = True  # gpt-oss always reasons (harmony's analysis channel): --think/--no-think set its effort
MXFP4, DENSE = "mxfp4", "dense"
cache_bytes = dense.cache_bytes

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


def _rope(raw: dict) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters") or {}
    theta = float(raw.get("rope_theta", params.get("rope_theta", DEFAULT_THETA)))
    scaling = {k: v for k, v in (raw.get("rope_scaling") or params).items() if k != "rope_theta"} or None  # a copy
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per expert
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
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
        layers, hidden, heads = f.req("num_hidden_layers"), f.req("hidden_size"), f.req("num_attention_heads")
        layer_types = tuple(raw["layer_types"])
        if len(layer_types) != layers or set(layer_types) - {"sliding_attention", "full_attention"}:
            raise DflashError(f"{where}/config.json: layer_types must give sliding_attention or full_attention "
                              f"for each of the {layers} layers")
        window = f.opt("sliding_window", None)
        if "sliding_attention" in layer_types and not window:
            raise DflashError(f"{where}/config.json: sliding_attention layers need a sliding_window")
        quantization = raw.get("quantization_config") or {}
        quant = MXFP4 if quantization.get("quant_method") == "mxfp4" else DENSE
        inter = f.req("intermediate_size")
        if quant == MXFP4 and (hidden % 32 or inter % 32):
            raise DflashError(f"{where}/config.json: MXFP4 experts need hidden_size and intermediate_size "
                              f"to be multiples of 32 (got {hidden} and {inter})")
        theta, scaling = _rope(raw)
        top_k = raw.get("num_experts_per_tok", raw.get("experts_per_token"))
        if top_k is None:
            f.req("num_experts_per_tok")
        return cls(
            vocab_size=f.req("vocab_size"), hidden_size=hidden, intermediate_size=inter, num_layers=layers,
            num_heads=heads, num_kv_heads=f.opt("num_key_value_heads", heads),
            head_dim=f.opt("head_dim", None) or hidden // heads, rms_norm_eps=f.opt("rms_norm_eps", 1e-5, float),
            rope_theta=theta, rope_scaling=scaling, max_position_embeddings=f.opt("max_position_embeddings", 131072),
            tie_word_embeddings=f.opt("tie_word_embeddings", False, bool), layer_types=layer_types,
            sliding_window=window, num_experts=f.req("num_local_experts"), top_k=int(top_k),
            swiglu_limit=f.opt("swiglu_limit", 7.0, float), swiglu_alpha=f.opt("swiglu_alpha", 1.702, float),
            quant=quant,
        )


def layout_of(names) -> str:
    """MXFP4 when the checkpoint holds packed experts, else transformers' dense parameters."""
    return MXFP4 if any(n.endswith("mlp.experts.gate_up_proj_blocks") for n in names) else DENSE


def expert_weights(c: Config, p: str, layout: str) -> list[Weight]:
    """Layer `p`'s experts (p ends with "mlp.experts.")."""
    e, h, i = c.num_experts, c.hidden_size, c.intermediate_size
    biases = [Weight(p + "gate_up_proj_bias", (e, 2 * i), "normal", 0.1),
              Weight(p + "down_proj_bias", (e, h), "normal", 0.1)]
    if layout == MXFP4:  # nn.Linear orientation [E, out, in], `in` cut into groups of 32 (16 bytes)
        return [Weight(p + "gate_up_proj_blocks", (e, 2 * i, h // 32, 16), "mxfp4_blocks", dtype="raw"),
                Weight(p + "gate_up_proj_scales", (e, 2 * i, h // 32), "mxfp4_scales", dtype="raw"),
                Weight(p + "down_proj_blocks", (e, h, i // 32, 16), "mxfp4_blocks", dtype="raw"),
                Weight(p + "down_proj_scales", (e, h, i // 32), "mxfp4_scales", dtype="raw")] + biases
    return [Weight(p + "gate_up_proj", (e, h, 2 * i), "linear_in"),  # transformers' [E, in, out]
            Weight(p + "down_proj", (e, i, h), "linear_in")] + biases


def layer_weights(c: Config, i: int, layout: str) -> list[Weight]:
    p, h, hd = f"model.layers.{i}.", c.hidden_size, c.head_dim
    q, kv = c.num_heads * hd, c.num_kv_heads * hd
    a = p + "self_attn."
    table = [Weight(p + "input_layernorm.weight", (h,), "norm", dtype="float32"),
             Weight(p + "post_attention_layernorm.weight", (h,), "norm", dtype="float32")]
    for name, rows, cols, gain in (("q_proj", q, h, 2.0), ("k_proj", kv, h, 2.0), ("v_proj", kv, h, 1.0),
                                   ("o_proj", h, q, 1.0)):
        table += [Weight(a + name + ".weight", (rows, cols), gain=gain), Weight(a + name + ".bias", (rows,), "normal", 0.1)]
    table.append(Weight(a + "sinks", (c.num_heads,), "normal", 1.0, dtype="float32"))
    table += [Weight(p + "mlp.router.weight", (c.num_experts, h), gain=4.0),
              Weight(p + "mlp.router.bias", (c.num_experts,), "normal", 0.5)]
    return table + expert_weights(c, p + "mlp.experts.", layout)


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    """layout: MXFP4 or DENSE, as `layout_of` reads the checkpoint; anything else (None, or the synthetic
    bench's "fused") means what config.json says."""
    layout = layout if layout in (MXFP4, DENSE) else c.quant
    table = [Weight("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed"),
             Weight("model.norm.weight", (c.hidden_size,), "norm", dtype="float32")]
    if not c.tie_word_embeddings:
        table.append(Weight("lm_head.weight", (c.vocab_size, c.hidden_size), gain=4.0,
                            fallback="model.embed_tokens.weight"))
    for i in range(c.num_layers):
        table += layer_weights(c, i, layout)
    return table


@dataclass
class Experts:
    """The router and its experts, gate_up [E, 2I, H] with gate/up rows interleaved and down [E, H, I]
    (or their MXFP4 blocks, with scales)."""

    router: torch.Tensor
    router_bias: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor
    gate_up_scales: torch.Tensor | None
    down_scales: torch.Tensor | None
    top_k: int
    limit: float
    alpha: float

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, c: Config) -> "Experts":
        e = p + "experts."
        if e + "gate_up_proj_blocks" in w:
            gate_up, gu_scales = w.pop(e + "gate_up_proj_blocks"), w.pop(e + "gate_up_proj_scales")
            down, dn_scales = w.pop(e + "down_proj_blocks"), w.pop(e + "down_proj_scales")
        else:  # transformers' [E, in, out]: once into the kernels' [E, out, in]
            gate_up = w.pop(e + "gate_up_proj").transpose(1, 2).contiguous()
            down = w.pop(e + "down_proj").transpose(1, 2).contiguous()
            gu_scales = dn_scales = None
        return cls(w.pop(p + "router.weight"), w.pop(p + "router.bias"), gate_up, w.pop(e + "gate_up_proj_bias"),
                   down, w.pop(e + "down_proj_bias"), gu_scales, dn_scales, c.top_k, c.swiglu_limit, c.swiglu_alpha)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = ops.moe_route(x, self.router, self.top_k, False, bias=self.router_bias, softmax_after_topk=True)
        return ops.moe_experts(x, self.gate_up, self.down, idx, weights, gate_up_bias=self.gate_up_bias,
                               down_bias=self.down_bias, gate_up_scales=self.gate_up_scales,
                               down_scales=self.down_scales, swiglu_limit=self.limit, swiglu_alpha=self.alpha)


@dataclass
class Layer:
    input_norm: torch.Tensor  # float32, as every gpt-oss norm
    qkv: torch.Tensor  # q, k and v stacked: one GEMM (with their biases)
    qkv_bias: torch.Tensor
    o_proj: torch.Tensor
    o_bias: torch.Tensor
    sinks: torch.Tensor  # [heads] float32
    window: int | None
    post_norm: torch.Tensor
    mlp: Experts

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], i: int, c: Config) -> "Layer":
        p = f"model.layers.{i}."
        a = p + "self_attn."
        return cls(w.pop(p + "input_layernorm.weight"),
                   torch.cat([w.pop(a + n + "_proj.weight") for n in "qkv"]),
                   torch.cat([w.pop(a + n + "_proj.bias") for n in "qkv"]),
                   w.pop(a + "o_proj.weight"), w.pop(a + "o_proj.bias"), w.pop(a + "sinks"), c.window(i),
                   w.pop(p + "post_attention_layernorm.weight"), Experts.take(w, p + "mlp.", c))


class Model:
    """A gpt-oss target: `forward` over a static KV cache, `commit` by moving its length."""

    def __init__(self, cfg: Config, w: dict[str, torch.Tensor], max_positions: int):
        """w: the checkpoint's tensors by name (`weight_table`); consumed."""
        self.cfg = cfg
        self.embed, self.norm = w.pop("model.embed_tokens.weight"), w.pop("model.norm.weight")
        self.lm_head = w.pop("lm_head.weight", self.embed)
        self.layers = [Layer.take(w, i, cfg) for i in range(cfg.num_layers)]
        self.max_positions = max_positions
        self.cos_sin = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, self.embed.device)
        self.scale = cfg.head_dim**-0.5

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, capacity: int, block_size: int = 1) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    def _attend(self, layer: Layer, h: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                positions: torch.Tensor, kv_len) -> torch.Tensor:
        c, t = self.cfg, h.shape[0]
        q, k, v = F.linear(h, layer.qkv, layer.qkv_bias).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        q = ops.qk_norm_rope_cache(
            q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim),
            v.view(t, c.num_kv_heads, c.head_dim), None, None, c.rms_norm_eps, self.cos_sin, positions,
            cache_k, cache_v)
        out = ops.attention(q, cache_k, cache_v, kv_len, causal=True, scale=self.scale, sliding_window=layer.window,
                            sinks=layer.sinks)
        return F.linear(out.reshape(t, -1), layer.o_proj, layer.o_bias)

    def forward(self, ids: torch.Tensor, cache: KVCache, *, logits_from: int | None = None,
                feature_layers: Sequence[int] = (), commit: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """As dense.Model.forward: logits from `logits_from` on, the outputs of `feature_layers`."""
        c, t = self.cfg, ids.shape[0]
        positions = cache.positions(t)
        kv_len = ops.kv_length(cache.length, t)
        wanted = {layer: None for layer in feature_layers}
        x = F.embedding(ids, self.embed)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                h, _ = ops.rms_norm(x, layer.input_norm, c.rms_norm_eps, fp32_weight=True)
                residual = x
            else:
                h, residual = ops.rms_norm(x, layer.input_norm, c.rms_norm_eps, residual, fp32_weight=True)
                if i - 1 in wanted:
                    wanted[i - 1] = residual.clone()
            x = self._attend(layer, h, cache.k[i], cache.v[i], positions, kv_len)
            h, residual = ops.rms_norm(x, layer.post_norm, c.rms_norm_eps, residual, fp32_weight=True)
            x = layer.mlp(h)
        h, residual = ops.rms_norm(x, self.norm, c.rms_norm_eps, residual, fp32_weight=True)
        if c.num_layers - 1 in wanted:
            wanted[c.num_layers - 1] = residual
        if commit:
            cache.commit(t)
        logits = None if logits_from is None else F.linear(h[logits_from:], self.lm_head)
        features = torch.cat(list(wanted.values()), dim=-1) if wanted else None
        return logits, features

    def commit(self, cache: KVCache, count: int | torch.Tensor) -> None:
        cache.commit(count)
