"""The DFlash drafter, as released (DESIGN §2): a few Qwen3-style layers that denoise a whole block.

Input: `[bonus, MASK × (B-1)]` at positions n .. n+B-1, embedded with the target's table. Each layer
attends over the context K/V of every committed token (within its sliding window, if it has one) plus
the block's own K/V: bidirectionally inside the block, except that a sliding_attention layer is causal
there unless the config says otherwise (`is_causal`, `dflash_config.causal`: the newest reference's and
vLLM's rule). Context K/V comes from target features: `ctx_h = hidden_norm(fc(concat(features)))`, projected
by each layer's k_proj/v_proj (k-normed and rotated) and cached once per token (`add_context`). The
block's K/V is written past the committed length and never committed, so the next draft overwrites
it. Outputs at block positions 1..B-1 go through the target's lm_head; the argmax is the draft.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ops
from .cache import KVCache
from .checkpoint import header_shapes, read_weights, weight_files
from .config import DrafterConfig
from .errors import DflashError
from .models.weights import Weight
from .rope import rope_table


def weight_table(c: DrafterConfig) -> list[Weight]:
    """The released drafter's tensors (DESIGN §2): unprefixed, no embedding and no lm_head."""
    h, d, q, kv = c.hidden_size, c.head_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    table = [Weight("fc.weight", (h, len(c.target_layer_ids) * h)), Weight("hidden_norm.weight", (h,), "norm"),
             Weight("norm.weight", (h,), "norm")]
    for i in range(c.num_layers):
        p = f"layers.{i}."
        table += [Weight(p + "input_layernorm.weight", (h,), "norm"),
                  Weight(p + "post_attention_layernorm.weight", (h,), "norm"),
                  Weight(p + "self_attn.q_proj.weight", (q, h)), Weight(p + "self_attn.k_proj.weight", (kv, h)),
                  Weight(p + "self_attn.v_proj.weight", (kv, h)), Weight(p + "self_attn.o_proj.weight", (h, q)),
                  Weight(p + "self_attn.q_norm.weight", (d,), "norm"), Weight(p + "self_attn.k_norm.weight", (d,), "norm"),
                  Weight(p + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                  Weight(p + "mlp.up_proj.weight", (c.intermediate_size, h)),
                  Weight(p + "mlp.down_proj.weight", (h, c.intermediate_size))]
    return table


def _narrowest(*windows: int | None) -> int | None:
    """The smallest of the sliding windows given (None: attend to the whole context)."""
    given = [w for w in windows if w is not None]
    return min(given) if given else None


def cache_bytes(c: DrafterConfig, dtype: torch.dtype) -> int:
    """Context K/V bytes per token."""
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class DraftLayer:
    input_norm: torch.Tensor
    q_proj: torch.Tensor
    kv_proj: torch.Tensor  # this layer's rows of the stacked context projection
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    window: int | None
    causal: bool  # inside the block (sliding layers of the newer drafters)


class Drafter:
    def __init__(self, cfg: DrafterConfig, fc: torch.Tensor, hidden_norm: torch.Tensor, norm: torch.Tensor,
                 layers: list[DraftLayer], w_kv: torch.Tensor, embed: torch.Tensor, lm_head: torch.Tensor,
                 max_positions: int):
        self.cfg, self.fc, self.hidden_norm, self.norm, self.layers = cfg, fc, hidden_norm, norm, layers
        self.w_kv, self.embed, self.lm_head = w_kv, embed, lm_head
        self.k_norms = torch.stack([layer.k_norm for layer in layers])
        self.cos_sin = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, embed.device)
        self.scale = cfg.head_dim**-0.5
        self.mask_ids = torch.full((cfg.block_size - 1,), cfg.mask_token_id, dtype=torch.int64, device=embed.device)

    @classmethod
    def load(cls, directory: Path, cfg: DrafterConfig, embed: torch.Tensor, lm_head: torch.Tensor,
             max_positions: int) -> "Drafter":
        files = weight_files(directory)
        dtype, device = embed.dtype, embed.device
        if f"layers.{cfg.num_layers}.mlp.down_proj.weight" in files or f"layers.{cfg.num_layers - 1}.mlp.down_proj.weight" not in files:
            count = len({n.split(".")[1] for n in files if n.startswith("layers.")})
            raise DflashError(f"drafter {directory}: weights have {count} layers, config.json says {cfg.num_layers}")
        fc = header_shapes(files, ["fc.weight"])["fc.weight"]
        want = (cfg.hidden_size, len(cfg.target_layer_ids) * cfg.hidden_size)
        if fc != want:
            raise DflashError(f"drafter {directory}: fc.weight is {fc}, but {len(cfg.target_layer_ids)} target "
                              f"layers × hidden {cfg.hidden_size} need {want}")
        return cls.from_weights(cfg, read_weights(directory, weight_table(cfg), dtype, device), embed, lm_head,
                                max_positions)

    @classmethod
    def from_weights(cls, cfg: DrafterConfig, w: dict[str, torch.Tensor], embed: torch.Tensor, lm_head: torch.Tensor,
                     max_positions: int) -> "Drafter":
        """The drafter from its checkpoint tensors by name (`weight_table`); `w` is consumed."""
        kv, layers = [], []
        for i in range(cfg.num_layers):
            p = f"layers.{i}.self_attn."
            kv.append(torch.cat((w.pop(p + "k_proj.weight"), w.pop(p + "v_proj.weight"))))
            q = f"layers.{i}."
            layers.append(DraftLayer(
                input_norm=w.pop(q + "input_layernorm.weight"), q_proj=w.pop(p + "q_proj.weight"), kv_proj=kv[-1],
                q_norm=w.pop(p + "q_norm.weight"), k_norm=w.pop(p + "k_norm.weight"), o_proj=w.pop(p + "o_proj.weight"),
                post_norm=w.pop(q + "post_attention_layernorm.weight"),
                gate_up=torch.cat((w.pop(q + "mlp.gate_proj.weight"), w.pop(q + "mlp.up_proj.weight"))),
                down=w.pop(q + "mlp.down_proj.weight"), window=cfg.sliding_windows[i], causal=cfg.causal[i]))
        w_kv = torch.cat(kv)
        rows = w_kv.shape[0] // cfg.num_layers
        for i, layer in enumerate(layers):  # share the stacked tensor rather than keep two copies
            layer.kv_proj = w_kv[i * rows:(i + 1) * rows]
        return cls(cfg, w["fc.weight"], w["hidden_norm.weight"], w["norm.weight"], layers, w_kv,
                   embed, lm_head, max_positions)

    def new_cache(self, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.embed.dtype, self.embed.device)

    def add_context(self, features: torch.Tensor, cache: KVCache, count: int | torch.Tensor | None = None) -> None:
        """Cache the context K/V of the tokens whose target features are given, then commit `count`
        of them (all by default). Entries past `count` are padding the next draft overwrites."""
        ctx_h, _ = ops.rms_norm(F.linear(features, self.fc), self.hidden_norm, self.cfg.rms_norm_eps)
        ops.draft_ctx_kv(ctx_h, self.w_kv, self.k_norms, self.cfg.rms_norm_eps, self.cos_sin,
                         cache.positions(features.shape[0]), cache.k, cache.v)
        cache.commit(features.shape[0] if count is None else count)

    def draft(self, bonus: torch.Tensor, cache: KVCache, block_size: int, window: int | None = None) -> torch.Tensor:
        """bonus: [1] id at position cache.length. Returns the block_size - 1 drafted ids.

        The draft is the argmax: a point mass, which is what makes the accept rule lossless."""
        return self.draft_logits(bonus, cache, block_size, window).argmax(-1)

    def draft_logits(self, bonus: torch.Tensor, cache: KVCache, block_size: int, window: int | None = None
                     ) -> torch.Tensor:
        """Logits [block_size - 1, V] for the tokens after `bonus`. `window`: every layer sees at most
        this many positions back (`--draft-window`), on top of its own sliding window."""
        c = self.cfg
        ids = torch.cat((bonus, self.mask_ids[: block_size - 1]))
        positions, kv_len = cache.positions(block_size), cache.length + block_size
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            h, _ = ops.rms_norm(x, layer.input_norm, c.rms_norm_eps)
            k, v = F.linear(h, layer.kv_proj).view(block_size, 2, c.num_kv_heads, c.head_dim).unbind(1)
            q = ops.qk_norm_rope_cache(F.linear(h, layer.q_proj).view(block_size, c.num_heads, c.head_dim),
                                       k, v, layer.q_norm, layer.k_norm, c.rms_norm_eps, self.cos_sin,
                                       positions, cache.k[i], cache.v[i])
            out = ops.attention(q, cache.k[i], cache.v[i], kv_len, causal=layer.causal, scale=self.scale,
                                sliding_window=_narrowest(layer.window, window))
            x = x + F.linear(out.reshape(block_size, -1), layer.o_proj)
            h, _ = ops.rms_norm(x, layer.post_norm, c.rms_norm_eps)
            x = x + F.linear(ops.swiglu(F.linear(h, layer.gate_up)), layer.down)
        h, _ = ops.rms_norm(x[1:], self.norm, c.rms_norm_eps)
        return F.linear(h, self.lm_head)
