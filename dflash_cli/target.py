"""The target model: Qwen3 and Llama 3.x dense decoders over a static KV cache.

One forward serves prefill chunks, the verify block and plain decoding: it takes T >= 1 tokens at
the positions after the cache's committed length, writes their K/V, and returns logits only for
the positions asked for and the residual stream only of the layers the drafter reads. Qwen3 and
Llama differ only in Qwen3's per-head q/k RMSNorm (and their rope tables, built in rope.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import ops
from .cache import KVCache
from .checkpoint import load_tensors, weight_files
from .config import TargetConfig
from .errors import DflashError
from .rope import rope_table


@dataclass
class TargetLayer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: one GEMM
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked: one GEMM
    down: torch.Tensor


class Target:
    def __init__(self, cfg: TargetConfig, embed: torch.Tensor, layers: list[TargetLayer],
                 norm: torch.Tensor, lm_head: torch.Tensor, max_positions: int):
        self.cfg, self.embed, self.layers, self.norm, self.lm_head = cfg, embed, layers, norm, lm_head
        self.cos_sin = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, embed.device)
        self.scale = cfg.head_dim**-0.5

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def load(cls, directory: Path, cfg: TargetConfig, dtype: torch.dtype, device: torch.device,
             max_positions: int) -> "Target":
        """max_positions: the rope table's length, the most cache slots any engine will use."""
        files = weight_files(directory)

        def read(*names: str) -> list[torch.Tensor]:
            got = load_tensors(files, names, dtype, device)
            return [got[n] for n in names]

        (embed, norm) = read("model.embed_tokens.weight", "model.norm.weight")
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in files
        lm_head = embed if tied else read("lm_head.weight")[0]
        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            names = [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                     "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                     "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                     "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
            if cfg.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            w = read(*names)
            layers.append(TargetLayer(
                input_norm=w[0], post_norm=w[1], qkv=torch.cat(w[2:5]), o_proj=w[5],
                gate_up=torch.cat(w[6:8]), down=w[8],
                q_norm=w[9] if cfg.qk_norm else None, k_norm=w[10] if cfg.qk_norm else None,
            ))
            del w
        _check_shapes(cfg, embed, layers, directory)
        return cls(cfg, embed, layers, norm, lm_head, max_positions)

    def new_cache(self, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    def forward(self, ids: torch.Tensor, cache: KVCache, *, logits_from: int | None = None,
                feature_layers: Sequence[int] = ()) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ids: [T]. Returns (logits [T - logits_from, V] or None, features [T, len(layers)·H] or None).

        Features are the outputs of decoder layers `feature_layers` (the residual stream before the
        final norm), concatenated in the order given: the drafter's context input.
        """
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
            x = self._attention(i, layer, h, positions, kv_len, cache)
            h, residual = ops.rms_norm(x, layer.post_norm, c.rms_norm_eps, residual)
            x = F.linear(ops.swiglu(F.linear(h, layer.gate_up)), layer.down)
        h, residual = ops.rms_norm(x, self.norm, c.rms_norm_eps, residual)
        if c.num_layers - 1 in wanted:
            wanted[c.num_layers - 1] = residual
        logits = None if logits_from is None else F.linear(h[logits_from:], self.lm_head)
        features = torch.cat(list(wanted.values()), dim=-1) if wanted else None
        return logits, features

    def commit(self, cache: KVCache, count: int | torch.Tensor) -> None:
        """Make the first `count` tokens of the last forward part of the sequence (the rest of its
        K/V is overwritten by the next one)."""
        cache.commit(count)

    def _attention(self, i: int, layer: TargetLayer, h: torch.Tensor, positions: torch.Tensor,
                   kv_len: torch.Tensor | int, cache: KVCache) -> torch.Tensor:
        c, t = self.cfg, h.shape[0]
        q, k, v = F.linear(h, layer.qkv).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        q = ops.qk_norm_rope_cache(
            q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim),
            v.view(t, c.num_kv_heads, c.head_dim), layer.q_norm, layer.k_norm, c.rms_norm_eps,
            self.cos_sin, positions, cache.k[i], cache.v[i])
        out = ops.attention(q, cache.k[i], cache.v[i], kv_len, causal=True, scale=self.scale)
        return F.linear(out.reshape(t, -1), layer.o_proj)


def _check_shapes(cfg: TargetConfig, embed: torch.Tensor, layers: list[TargetLayer], directory: Path) -> None:
    """config.json and the weights must agree; third-party checkpoints sometimes do not."""
    expect = {
        "embed_tokens": (embed.shape, (cfg.vocab_size, cfg.hidden_size)),
        "qkv_proj": (layers[0].qkv.shape, ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size)),
        "gate_up_proj": (layers[0].gate_up.shape, (2 * cfg.intermediate_size, cfg.hidden_size)),
    }
    for name, (got, want) in expect.items():
        if tuple(got) != want:
            raise DflashError(f"{directory}: {name} has shape {tuple(got)}, config.json implies {want}")
