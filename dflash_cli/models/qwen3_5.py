"""Qwen3.5 / 3.6 / 3.8 hybrid decoders: Gated DeltaNet linear attention in three of every four
layers, gated full attention in the rest (research/hybrid.md §1-3), with exact rollback.

The checkpoint is the vision-language wrapper (`Qwen3_5ForConditionalGeneration`: the text config under
`text_config`, weights under `model.language_model.*`; `model.visual.*` and `mtp.*` are never read) or a
text-only export (`model.*`). Every RMSNorm is zero-centred, `(1 + w)` applied in fp32, except the gated
output norm of the linear layers. Full layers: a per-head interleaved query/gate projection, q/k norms,
rotary embedding on the first quarter of each 256-dim head, output × sigmoid(gate).

The cache holds K/V for the full layers (rolled back by its length, as a dense model's) and, for the
linear layers, an fp32 recurrent state and the conv's last K-1 inputs, which cannot be rolled back by
moving a pointer. So a verify forward does not write them: it records each token's conv input and its
(k, v, g, beta), and `commit` replays the recorded steps with the rejected ones masked out
(kernels/gated_delta.py), inside the captured step. A prefill chunk (`commit=True`) writes them directly.
Prefix reuse across turns restarts only from a snapshot taken during a prefill, never from live state.
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
from ..errors import DflashError
from ..rope import rope_table
from . import dense
from .moe import MoE, layout_of, moe_weights  # noqa: F401  (layout_of: how the loader picks the table)
from .weights import Weight

MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
THINKS = True  # the Qwen3.5 / 3.6 drafters were trained with thinking on


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # the leading dims of each head that are rotated (a quarter, by default)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]  # "linear_attention" or "full_attention" per layer
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
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    prefill_scratch = 0  # bytes a prefill allocates beyond its activations (memory.workspace_bytes)

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
        theta, scaling = rope_params(text, f)
        params = text.get("rope_parameters") or {}
        partial = float(params.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k not in ("mrope_section", "mrope_interleaved")}
        layers, hidden, heads = f.req("num_hidden_layers"), f.req("hidden_size"), f.req("num_attention_heads")
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = f.opt("full_attention_interval", 4)
            layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
        if len(layer_types) != layers or set(layer_types) - {"linear_attention", "full_attention"}:
            raise DflashError(f"{where}/config.json: layer_types must give linear_attention or full_attention "
                              f"for each of the {layers} layers")
        head_dim = f.opt("head_dim", 256)
        moe = raw.get("model_type", "").startswith("qwen3_5_moe") or text.get("num_experts")
        experts = dict(num_experts=f.req("num_experts"), top_k=f.req("num_experts_per_tok"),
                       moe_intermediate_size=f.req("moe_intermediate_size"),
                       shared_expert_intermediate_size=f.opt("shared_expert_intermediate_size", 0)) if moe else {}
        cfg = cls(
            vocab_size=f.req("vocab_size"), hidden_size=hidden,
            intermediate_size=f.opt("intermediate_size", 0) if moe else f.req("intermediate_size"),
            num_layers=layers, num_heads=heads, num_kv_heads=f.opt("num_key_value_heads", heads), head_dim=head_dim,
            rotary_dim=int(head_dim * partial), rms_norm_eps=f.opt("rms_norm_eps", 1e-6, float), rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=f.opt("max_position_embeddings", 32768),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
            layer_types=tuple(layer_types), conv_kernel=f.opt("linear_conv_kernel_dim", 4),
            key_head_dim=f.opt("linear_key_head_dim", 128), value_head_dim=f.opt("linear_value_head_dim", 128),
            num_key_heads=f.opt("linear_num_key_heads", 16), num_value_heads=f.opt("linear_num_value_heads", 32),
            prefix="model.language_model." if "text_config" in raw else "model.", **experts,
        )
        if cfg.num_value_heads % cfg.num_key_heads or cfg.rotary_dim % 2:
            raise DflashError(f"{where}/config.json: linear value heads must be a multiple of key heads, "
                              "and the rotary dims even")
        return cfg


def layer_weights(c: Config, i: int) -> list[Weight]:
    """Layer i's tensors, without its MLP."""
    p, h = f"{c.prefix}layers.{i}.", c.hidden_size
    table = [Weight(p + "input_layernorm.weight", (h,), "zero_norm", dtype="float32"),
             Weight(p + "post_attention_layernorm.weight", (h,), "zero_norm", dtype="float32")]
    if c.layer_types[i] == "linear_attention":
        a, hv = p + "linear_attn.", c.num_value_heads
        return table + [
            Weight(a + "in_proj_qkv.weight", (c.conv_dim, h)), Weight(a + "in_proj_z.weight", (c.value_dim, h)),
            Weight(a + "in_proj_b.weight", (hv, h)), Weight(a + "in_proj_a.weight", (hv, h)),
            Weight(a + "conv1d.weight", (c.conv_dim, 1, c.conv_kernel), "conv"),
            Weight(a + "A_log", (hv,), "a_log", dtype="float32"), Weight(a + "dt_bias", (hv,), "uniform", dtype="float32"),
            Weight(a + "norm.weight", (c.value_head_dim,), "norm", dtype="float32"),
            Weight(a + "out_proj.weight", (h, c.value_dim))]
    a, hd = p + "self_attn.", c.head_dim
    return table + [
        Weight(a + "q_proj.weight", (2 * c.num_heads * hd, h), gain=2.0),
        Weight(a + "k_proj.weight", (c.num_kv_heads * hd, h), gain=2.0),
        Weight(a + "v_proj.weight", (c.num_kv_heads * hd, h)), Weight(a + "o_proj.weight", (h, c.num_heads * hd)),
        Weight(a + "q_norm.weight", (hd,), "zero_norm", dtype="float32"),
        Weight(a + "k_norm.weight", (hd,), "zero_norm", dtype="float32")]


def mlp_weights(c: Config, i: int, layout: str | None = None) -> list[Weight]:
    p = f"{c.prefix}layers.{i}.mlp."
    if c.num_experts:
        return moe_weights(p, c.hidden_size, c.num_experts, c.moe_intermediate_size, layout,
                           c.shared_expert_intermediate_size)
    return dense.mlp_weights(c, p, c.intermediate_size)


def head_weights(c: Config) -> list[Weight]:
    table = [Weight(c.prefix + "embed_tokens.weight", (c.vocab_size, c.hidden_size), "embed"),
             Weight(c.prefix + "norm.weight", (c.hidden_size,), "zero_norm", dtype="float32")]
    if not c.tie_word_embeddings:  # Qwen3.5-4B ties at the top level only, and ships no lm_head
        table.append(Weight("lm_head.weight", (c.vocab_size, c.hidden_size), gain=4.0,
                            fallback=c.prefix + "embed_tokens.weight"))
    return table


def weight_table(c: Config, layout: str | None = None) -> list[Weight]:
    table = head_weights(c)
    for i in range(c.num_layers):
        table += layer_weights(c, i) + mlp_weights(c, i, layout)
    return table


def cache_bytes(c: Config, dtype: torch.dtype, block_size: int) -> tuple[int, int]:
    """K/V of the full layers per token; fixed: the linear layers' states and conv windows three times
    (the live ones, the prefix snapshot a chat keeps, and the copy a graph capture or a cost
    measurement holds while it runs), and the verify record the commit replays (hybrid.md §3: ~40 MiB
    at 27B, B = 16)."""
    size = torch.tensor([], dtype=dtype).element_size()
    n = len(c.linear_layers)
    state = n * c.num_value_heads * c.key_head_dim * c.value_head_dim * 4
    conv = n * (c.conv_kernel - 1) * c.conv_dim * size
    record = n * block_size * (c.conv_dim * size + (c.key_dim + c.value_dim + 2 * c.num_value_heads) * 4)
    return 2 * len(c.full_layers) * c.num_kv_heads * c.head_dim * size, 3 * (state + conv) + record


@dataclass
class HybridCache:
    """Full-attention K/V (static, length on the device) and the linear layers' recurrent state."""

    kv: KVCache  # [full layers, ...]
    state: torch.Tensor  # [linear layers, Hv, dk, dv] fp32: the state after the committed tokens
    conv: torch.Tensor  # [linear layers, K-1, C]: the conv's last K-1 inputs
    rec_x: torch.Tensor  # [linear layers, B, C]: a verify block's conv inputs, for the commit
    rec_k: torch.Tensor  # [linear layers, B, Hk, dk] fp32, l2-normed
    rec_v: torch.Tensor  # [linear layers, B, Hv, dv] fp32
    rec_g: torch.Tensor  # [linear layers, B, Hv] fp32
    rec_beta: torch.Tensor  # [linear layers, B, Hv] fp32
    prefix: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (position, state, conv) kept by a prefill
    recorded: int = 0  # rows of the last verify forward

    @property
    def length(self) -> torch.Tensor:
        return self.kv.length

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    def positions(self, count: int) -> torch.Tensor:
        return self.kv.positions(count)

    def reusable(self, length: int) -> int:
        """The longest prefix of at most `length` tokens this cache can restart from: its prefix
        snapshot, or nothing (a recurrent state cannot be rolled back to any other point)."""
        return self.prefix[0] if self.prefix is not None and self.prefix[0] <= length else 0

    def rollback(self, length: int) -> None:
        if length == 0:
            self.state.zero_()
            self.conv.zero_()
        else:
            assert self.prefix is not None and self.prefix[0] == length, "only to the prefix snapshot"
            self.state.copy_(self.prefix[1])
            self.conv.copy_(self.prefix[2])
        self.kv.rollback(length)

    def keep_prefix(self) -> None:
        """Snapshot the state at the current length, for the next prompt that shares this prefix."""
        self.prefix = (int(self.length), self.state.clone(), self.conv.clone())

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.kv.snapshot(), self.state.clone(), self.conv.clone()

    def restore(self, snapshot) -> None:
        length, state, conv = snapshot
        self.kv.restore(length)
        self.state.copy_(state)
        self.conv.copy_(conv)


@dataclass
class LinearAttention:
    in_proj: torch.Tensor  # [qkv | z | b | a] rows: one GEMM
    conv: torch.Tensor  # [C, K]
    a_log: torch.Tensor  # [Hv] fp32
    dt_bias: torch.Tensor  # [Hv] fp32
    norm: torch.Tensor  # [dv] fp32, applied as w (not 1 + w)
    out_proj: torch.Tensor

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str) -> "LinearAttention":
        a = p + "linear_attn."
        proj = torch.cat([w.pop(a + f"in_proj_{n}.weight") for n in ("qkv", "z", "b", "a")])
        return cls(proj, w.pop(a + "conv1d.weight")[:, 0], w.pop(a + "A_log"), w.pop(a + "dt_bias"),
                   w.pop(a + "norm.weight"), w.pop(a + "out_proj.weight"))


@dataclass
class GatedAttention:
    qgkv: torch.Tensor  # [q all heads | gate all heads | k | v] rows: one GEMM
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, c: Config) -> "GatedAttention":
        a = p + "self_attn."
        q_gate = w.pop(a + "q_proj.weight").view(c.num_heads, 2, c.head_dim, -1)  # per head: query rows, gate rows
        qgkv = torch.cat((q_gate[:, 0].reshape(-1, c.hidden_size), q_gate[:, 1].reshape(-1, c.hidden_size),
                          w.pop(a + "k_proj.weight"), w.pop(a + "v_proj.weight")))
        return cls(qgkv, w.pop(a + "q_norm.weight"), w.pop(a + "k_norm.weight"), w.pop(a + "o_proj.weight"))


@dataclass
class Layer:
    input_norm: torch.Tensor
    mixer: LinearAttention | GatedAttention
    slot: int  # index among the layers of its kind (cache row)
    post_norm: torch.Tensor
    mlp: dense.MLP | MoE


class Model:
    """A hybrid target: `forward` over a HybridCache, `commit` by masked replay."""

    def __init__(self, cfg: Config, w: dict[str, torch.Tensor], max_positions: int):
        self.cfg, p = cfg, cfg.prefix
        self.embed, self.norm = w.pop(p + "embed_tokens.weight"), w.pop(p + "norm.weight")
        self.lm_head = w.pop("lm_head.weight", self.embed)
        self.layers = []
        slots = {"linear_attention": 0, "full_attention": 0}
        for i, kind in enumerate(cfg.layer_types):
            q = f"{p}layers.{i}."
            mixer = LinearAttention.take(w, q) if kind == "linear_attention" else GatedAttention.take(w, q, cfg)
            self.layers.append(self._layer(w, q, mixer, slots[kind], i))
            slots[kind] += 1
        self.max_positions = max_positions
        self.cos_sin = rope_table(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, self.embed.device)
        self.scale = cfg.head_dim**-0.5

    def _layer(self, w: dict[str, torch.Tensor], q: str, mixer, slot: int, i: int) -> Layer:
        c, m = self.cfg, q + "mlp."
        mlp = MoE.take(w, m, c.num_experts, c.top_k, renormalize=True) if c.num_experts else dense.MLP.take(w, m)
        return Layer(w.pop(q + "input_layernorm.weight"), mixer, slot, w.pop(q + "post_attention_layernorm.weight"), mlp)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, capacity: int, block_size: int = 1) -> HybridCache:
        c, n = self.cfg, len(self.cfg.linear_layers)
        f32 = dict(dtype=torch.float32, device=self.device)

        def zeros(*shape, **kw):
            return torch.zeros(shape, **(kw or dict(dtype=self.dtype, device=self.device)))

        return HybridCache(
            kv=KVCache.allocate(len(c.full_layers), c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device),
            state=zeros(n, c.num_value_heads, c.key_head_dim, c.value_head_dim, **f32),
            conv=zeros(n, c.conv_kernel - 1, c.conv_dim), rec_x=zeros(n, block_size, c.conv_dim),
            rec_k=zeros(n, block_size, c.num_key_heads, c.key_head_dim, **f32),
            rec_v=zeros(n, block_size, c.num_value_heads, c.value_head_dim, **f32),
            rec_g=zeros(n, block_size, c.num_value_heads, **f32), rec_beta=zeros(n, block_size, c.num_value_heads, **f32))

    def forward(self, ids: torch.Tensor, cache: HybridCache, *, logits_from: int | None = None,
                feature_layers: Sequence[int] = (), commit: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ids: [T]. Returns (logits [T - logits_from, V] or None, features [T, len(layers)·H] or None),
        as the dense families do. `commit`: the T tokens join the sequence (a prefill chunk); otherwise
        (a verify block) the linear layers' steps are recorded for `commit(cache, count)`."""
        c, t = self.cfg, ids.shape[0]
        assert commit or t <= cache.rec_x.shape[1], "a verify block larger than the cache's record"
        positions = cache.positions(t)
        kv_len = ops.kv_length(cache.length, t)
        wanted = {layer: None for layer in feature_layers}
        x = F.embedding(ids, self.embed)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                h, _ = ops.rms_norm(x, layer.input_norm, c.rms_norm_eps, offset=True)
                residual = x
            else:
                h, residual = ops.rms_norm(x, layer.input_norm, c.rms_norm_eps, residual, offset=True)
                if i - 1 in wanted:
                    wanted[i - 1] = residual.clone()
            if isinstance(layer.mixer, LinearAttention):
                x = self._linear(layer.mixer, layer.slot, h, cache, commit)
            else:
                x = self._full(layer.mixer, layer.slot, h, cache, positions, kv_len)
            h, residual = ops.rms_norm(x, layer.post_norm, c.rms_norm_eps, residual, offset=True)
            x = layer.mlp(h)
        h, residual = ops.rms_norm(x, self.norm, c.rms_norm_eps, residual, offset=True)
        if c.num_layers - 1 in wanted:
            wanted[c.num_layers - 1] = residual
        if commit:
            cache.kv.commit(t)
        else:
            cache.recorded = t
        logits = None if logits_from is None else F.linear(h[logits_from:], self.lm_head)
        features = torch.cat(list(wanted.values()), dim=-1) if wanted else None
        return logits, features

    def _linear(self, m: LinearAttention, j: int, h: torch.Tensor, cache: HybridCache, commit: bool) -> torch.Tensor:
        """A Gated DeltaNet layer over T tokens from the committed state of linear layer j."""
        c, t = self.cfg, h.shape[0]
        mixed, z, b, a = F.linear(h, m.in_proj).split([c.conv_dim, c.value_dim, c.num_value_heads,
                                                       c.num_value_heads], dim=-1)
        window = torch.cat((cache.conv[j], mixed))
        qkv = ops.causal_conv(window, m.conv)
        q, k, v = qkv.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        q = ops.l2norm(q.reshape(t, c.num_key_heads, c.key_head_dim))
        k = ops.l2norm(k.reshape(t, c.num_key_heads, c.key_head_dim))
        v = v.reshape(t, c.num_value_heads, c.value_head_dim).float()
        beta = b.sigmoid().float()
        g = -m.a_log.exp() * F.softplus(a.float() + m.dt_bias)
        out, final = ops.gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], cache.state[j:j + 1],
                                          c.key_head_dim**-0.5)
        if commit:  # a prefill chunk: the state and the conv window move on
            cache.state[j].copy_(final[0])
            cache.conv[j].copy_(window[t:])
        else:  # a verify block: recorded, for `commit` to replay as far as it is accepted
            cache.rec_x[j, :t] = mixed
            cache.rec_k[j, :t], cache.rec_v[j, :t], cache.rec_g[j, :t], cache.rec_beta[j, :t] = k, v, g, beta
        out = ops.gated_rms_norm(out[0].to(h.dtype), z.reshape(t, c.num_value_heads, c.value_head_dim),
                                 m.norm, c.rms_norm_eps)
        return F.linear(out.reshape(t, -1), m.out_proj)

    def _full(self, m: GatedAttention, j: int, h: torch.Tensor, cache: HybridCache, positions: torch.Tensor,
              kv_len) -> torch.Tensor:
        c, t = self.cfg, h.shape[0]
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, gate, k, v = F.linear(h, m.qgkv).split([qd, qd, kvd, kvd], dim=-1)
        q = ops.qk_norm_rope_cache(
            q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim),
            v.view(t, c.num_kv_heads, c.head_dim), m.q_norm, m.k_norm, c.rms_norm_eps, self.cos_sin, positions,
            cache.kv.k[j], cache.kv.v[j], offset=True)
        out = ops.attention(q, cache.kv.k[j], cache.kv.v[j], kv_len, causal=True, scale=self.scale)
        return F.linear(out.reshape(t, -1) * torch.sigmoid(gate), m.o_proj)

    def commit(self, cache: HybridCache, count: int | torch.Tensor) -> None:
        """The first `count` tokens of the last verify forward join the sequence: the linear layers'
        states are replayed over them (all layers at once; rejected steps masked, fixed shapes), the
        conv windows gathered at `count`, and the length moved."""
        t = cache.recorded
        ops.gdn_replay(cache.state, cache.rec_k[:, :t], cache.rec_v[:, :t], cache.rec_g[:, :t],
                       cache.rec_beta[:, :t], count)
        ops.conv_commit(cache.conv, cache.rec_x[:, :t], count)
        cache.kv.commit(count)
