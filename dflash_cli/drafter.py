"""The DFlash drafter, as released (DESIGN §2): a few Qwen3-style layers that denoise a whole block.

Input: `[bonus, MASK × (B-1)]` at positions n .. n+B-1, embedded with the target's table. Each layer
attends over the context K/V of every committed token (within its sliding window, if it has one) plus
the block's own K/V: bidirectionally inside the block, except that a sliding_attention layer is causal
there unless the config says otherwise (`is_causal`, `dflash_config.causal`: the newest reference's and
vLLM's rule). Context K/V comes from target features: `ctx_h = hidden_norm(fc(concat(features)))`, projected
by each layer's k_proj/v_proj (k-normed and rotated) and cached once per token (`add_context`). The
block's K/V is written past the committed length and never committed, so the next draft overwrites
it. Outputs at block positions 1..B-1 go through the target's lm_head; the argmax is the draft.
The gpt-oss drafters (`attention_bias`) add biases to q/k/v/o, k's before its norm.

An engine that decodes plainly for a while (b = 1) defers the context K/V of the tokens it commits:
their target features wait in the cache (`DraftCache.defer`, at most DEFERRED of them) and go in as
one batch (`catch_up`) before the next draft, so that a plain iteration costs what plain decoding costs.

A DFlash2 drafter (`DFlash2DraftModel`, research/dflash2.md §1) is this plus two modules, in
dflash2.py: a dynamic causal conv before and after every sublayer, over the block rows, and a
candidate selector that rescores the head's top-k with a bigram term and walks a chain from the bonus.
Its walk is an argmax too: the draft stays a point mass at every temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ops
from .cache import KVCache
from .checkpoint import header_shapes, read_weights, weight_files
from .config import DrafterConfig
from .dflash2 import CandidateSelector, DynamicConv, head_logits, post_conv, pre_conv
from .errors import DflashError
from .models.base import span, span_offsets
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
        if c.attention_bias:
            table += [Weight(p + f"self_attn.{name}_proj.bias", (rows,), "normal", 0.1)
                      for name, rows in (("q", q), ("k", kv), ("v", kv), ("o", h))]
    return (table + dflash2_table(c)) if c.dflash2 else table


def dflash2_table(c: DrafterConfig) -> list[Weight]:
    """DFlash2's tensors (research/dflash2.md §1.2). The codebooks are stored without a `.weight`
    suffix; their rows are the target's vocabulary (checked against it in `check_against`)."""
    h, k, r = c.hidden_size, c.dflash2.conv_kernel_size, c.dflash2.selector_rank
    kernels = 2 * k * (h // c.dflash2.conv_group_size)
    table = []
    for i in range(c.num_layers):
        for conv in ("attention_conv", "mlp_conv"):
            p = f"layers.{i}.{conv}."
            table += [Weight(p + "base_kernel", (2, k, h), "taps"),
                      Weight(p + "kernel_projection.weight", (kernels, h), gain=0.1)]
    s = "candidate_selector."
    return table + [Weight(s + "hidden_projection.weight", (r, h)),
                    Weight(s + "predecessor_codebook", (c.vocab_size, r), "normal", gain=r**-0.25),
                    Weight(s + "successor_codebook", (c.vocab_size, r), "normal", gain=r**-0.25)]


DEFERRED = 32  # committed tokens whose context K/V may wait for one batched catch-up


@dataclass
class DraftCache(KVCache):
    """The drafter's context K/V, and the target features of up to DEFERRED committed tokens whose K/V
    is not written yet (`pending[:pending_count]`, the next positions after `length`)."""

    pending: torch.Tensor | None = None  # [DEFERRED, features]
    pending_count: torch.Tensor | None = None  # 0-d int64, on the device

    def defer(self, features: torch.Tensor) -> None:
        """Keep the first row's features for the next catch-up (no host read: the slot is on the device)."""
        self.pending.index_copy_(0, self.pending_count.view(1), features[:1])
        self.pending_count.add_(1)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.length.clone(), self.pending_count.clone()

    def restore(self, snapshot) -> None:
        self.length.copy_(snapshot[0])
        self.pending_count.copy_(snapshot[1])

    def rollback(self, length: int | torch.Tensor) -> None:
        super().rollback(length)
        self.pending_count.zero_()

    def nbytes(self) -> int:
        return super().nbytes() + self.pending.nbytes


def _narrowest(*windows: int | None) -> int | None:
    """The smallest of the sliding windows given (None: attend to the whole context)."""
    given = [w for w in windows if w is not None]
    return min(given) if given else None


def copy_bytes(c: DrafterConfig, dtype: torch.dtype) -> int:
    """Bytes the loaded drafter holds beyond its checkpoint's tensors: every layer's k/v projection rows twice
    (in its q/k/v GEMM and in the stacked context projection, `tie`)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * c.hidden_size * size


def cache_bytes(c: DrafterConfig, dtype: torch.dtype) -> int:
    """Context K/V bytes per token."""
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class DraftLayer:
    input_norm: torch.Tensor
    q_proj: torch.Tensor
    kv_proj: torch.Tensor  # this layer's rows of the stacked context projection
    qkv: torch.Tensor  # [q_proj | kv_proj]: the block's q, k and v in one GEMM (the k/v rows a copy of kv_proj's)
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    window: int | None
    causal: bool  # inside the block (sliding layers of the newer drafters)
    attention_conv: DynamicConv | None = None  # DFlash2 only
    mlp_conv: DynamicConv | None = None
    q_bias: torch.Tensor | None = None  # attention biases (gpt-oss drafters)
    kv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None


class Drafter:
    def __init__(self, cfg: DrafterConfig, fc: torch.Tensor, hidden_norm: torch.Tensor, norm: torch.Tensor,
                 layers: list[DraftLayer], w_kv: torch.Tensor, embed: torch.Tensor, lm_head: torch.Tensor,
                 max_positions: int, b_kv: torch.Tensor | None = None, selector: CandidateSelector | None = None):
        self.cfg, self.fc, self.hidden_norm, self.norm, self.layers = cfg, fc, hidden_norm, norm, layers
        self.selector = selector  # DFlash2: the draft is the selector's walk, not the head's argmax
        self.w_kv, self.b_kv, self.embed, self.lm_head = w_kv, b_kv, embed, lm_head
        self.k_norms = torch.stack([layer.k_norm for layer in layers])
        self.cos_sin = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions, embed.device)
        self.scale = cfg.head_dim**-0.5
        self.mask_ids = torch.full((cfg.block_size - 1,), cfg.mask_token_id, dtype=torch.int64, device=embed.device)
        self.offsets = span_offsets(embed.device)

    @classmethod
    def load(cls, directory: Path, cfg: DrafterConfig, embed: torch.Tensor, lm_head: torch.Tensor,
             max_positions: int) -> "Drafter":
        files = weight_files(directory)
        dtype, device = embed.dtype, embed.device
        stored = dict(cfg.renames)  # our name -> the checkpoint's, for drafters in other formats (speculators.py)
        if f"layers.{cfg.num_layers}.mlp.down_proj.weight" in files or f"layers.{cfg.num_layers - 1}.mlp.down_proj.weight" not in files:
            count = len({n.split(".")[1] for n in files if n.startswith("layers.")})
            raise DflashError(f"drafter {directory}: weights have {count} layers, config.json says {cfg.num_layers}")
        fc_name = stored.get("fc.weight", "fc.weight")
        if fc_name not in files:
            raise DflashError(f"drafter {directory}: weight '{fc_name}' is missing from the checkpoint")
        fc = header_shapes(files, [fc_name])[fc_name]
        want = (cfg.hidden_size, len(cfg.target_layer_ids) * cfg.hidden_size)
        if fc != want:
            raise DflashError(f"drafter {directory}: fc.weight is {fc}, but {len(cfg.target_layer_ids)} target "
                              f"layers × hidden {cfg.hidden_size} need {want}")
        if cfg.dflash2 and cfg.vocab_size != lm_head.shape[0]:
            raise DflashError(f"drafter {directory}: its selector's codebooks have vocab_size {cfg.vocab_size} rows, "
                              f"but the target's vocabulary is {lm_head.shape[0]}")
        table = [replace(w, name=stored.get(w.name, w.name)) for w in weight_table(cfg)]
        ours = {v: k for k, v in stored.items()}
        w = {ours.get(name, name): t for name, t in read_weights(directory, table, dtype, device).items()}
        return cls.from_weights(cfg, w, embed, lm_head, max_positions)

    @classmethod
    def from_weights(cls, cfg: DrafterConfig, w: dict[str, torch.Tensor], embed: torch.Tensor, lm_head: torch.Tensor,
                     max_positions: int) -> "Drafter":
        """The drafter from its checkpoint tensors by name (`weight_table`); `w` is consumed."""
        layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}.self_attn."
            q = f"layers.{i}."
            qkv = [w.pop(p + f"{n}_proj.weight") for n in "qkv"]
            bias = [w.pop(p + f"{n}_proj.bias") for n in "qkv"] if cfg.attention_bias else None
            layers.append(DraftLayer(
                input_norm=w.pop(q + "input_layernorm.weight"), q_proj=qkv[0], kv_proj=qkv[1],
                qkv=torch.cat(qkv), q_norm=w.pop(p + "q_norm.weight"), k_norm=w.pop(p + "k_norm.weight"),
                o_proj=w.pop(p + "o_proj.weight"), post_norm=w.pop(q + "post_attention_layernorm.weight"),
                gate_up=torch.cat((w.pop(q + "mlp.gate_proj.weight"), w.pop(q + "mlp.up_proj.weight"))),
                down=w.pop(q + "mlp.down_proj.weight"), window=cfg.sliding_windows[i], causal=cfg.causal[i],
                o_bias=w.pop(p + "o_proj.bias", None), qkv_bias=None if bias is None else torch.cat(bias)))
        w_kv, b_kv = tie(cfg, layers)
        selector = _dflash2_modules(cfg, w, layers) if cfg.dflash2 else None
        return cls(cfg, w["fc.weight"], w["hidden_norm.weight"], w["norm.weight"], layers, w_kv,
                   embed, lm_head, max_positions, b_kv, selector)

    def new_cache(self, capacity: int) -> DraftCache:
        """Context K/V for `capacity` positions; a catch-up writes DEFERRED rows past the length, so the
        engine's slack (`cache_slack`) counts them."""
        c, device = self.cfg, self.embed.device
        kv = KVCache.allocate(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.embed.dtype, device)
        return DraftCache(kv.k, kv.v, kv.length, torch.zeros(DEFERRED, self.fc.shape[1], dtype=self.fc.dtype, device=device),
                          torch.zeros((), dtype=torch.int64, device=device))

    def catch_up(self, cache: DraftCache) -> None:
        """Write the context K/V of the deferred tokens, as one batch (fixed shape: DEFERRED rows, of
        which `pending_count` are committed; the rest is padding the next write overwrites)."""
        self.add_context(cache.pending, cache, count=cache.pending_count)
        cache.pending_count.zero_()

    def add_context(self, features: torch.Tensor, cache: KVCache, count: int | torch.Tensor | None = None) -> None:
        """Cache the context K/V of the tokens whose target features are given, then commit `count`
        of them (all by default). Entries past `count` are padding the next draft overwrites."""
        ctx_h, _ = ops.rms_norm(ops.dense_linear(features, self.fc), self.hidden_norm, self.cfg.rms_norm_eps)
        ops.draft_ctx_kv(ctx_h, self.w_kv, self.k_norms, self.cfg.rms_norm_eps, self.cos_sin,
                         cache.length, cache.k, cache.v, b_kv=self.b_kv)  # the rows follow the length
        cache.commit(features.shape[0] if count is None else count)

    def draft(self, bonus: torch.Tensor, cache: KVCache, block_size: int, window: int | None = None) -> torch.Tensor:
        """bonus: [1] id at position cache.length. Returns the block_size - 1 drafted ids."""
        return self.draft_block(bonus, cache, block_size, window)[1:]

    def draft_block(self, bonus: torch.Tensor, cache: KVCache, block_size: int, window: int | None = None
                    ) -> torch.Tensor:
        """The block to verify, [bonus, d_1 .. d_(b-1)]: the drafts are written over the mask ids of the
        drafter's own input, so the block costs no launch of its own.

        The draft is the argmax (DFlash2: the selector's argmax walk): a point mass, which is what
        makes the accept rule lossless."""
        ids, x = self.block_input(bonus, block_size)
        if self.selector is None:
            torch.argmax(self.block_logits(ids, cache, window, x), -1, out=ids[1:])
        else:
            hidden = self._hidden(ids, cache, window, x)
            self.selector.walk(hidden, ops.dense_linear(hidden, self.lm_head), bonus, out=ids[1:])
        return ids

    def block_ids(self, bonus: torch.Tensor, block_size: int) -> torch.Tensor:
        """The drafter's input, [bonus, MASK × (block_size - 1)]."""
        return torch.cat((bonus, self.mask_ids[: block_size - 1]))

    def block_input(self, bonus: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(`block_ids`, their embedded rows [block_size, H]): one launch (kernels/embed_block.py) where the
        rows are the table's as they are (no input_embedding_scale)."""
        if self.cfg.input_embedding_scale == 1.0:
            return ops.embed_block(bonus, self.mask_ids[: block_size - 1], self.embed)
        ids = self.block_ids(bonus, block_size)
        return ids, F.embedding(ids, self.embed) * self.cfg.input_embedding_scale

    def draft_logits(self, bonus: torch.Tensor, cache: KVCache, block_size: int, window: int | None = None
                     ) -> torch.Tensor:
        """Logits [block_size - 1, V] for the tokens after `bonus` (with the head's multiplier and
        softcap, where the config sets them)."""
        return self.block_logits(self.block_ids(bonus, block_size), cache, window)

    def block_logits(self, ids: torch.Tensor, cache: KVCache, window: int | None = None,
                     x: torch.Tensor | None = None) -> torch.Tensor:
        """`draft_logits` of the drafter's input ids ([bonus, MASK × (b - 1)], `block_ids`); x: their
        embedded rows, when `block_input` made them already."""
        logits = ops.dense_linear(self._hidden(ids, cache, window, x), self.lm_head)
        return head_logits(logits, self.cfg.output_multiplier, self.cfg.final_logit_softcapping)

    def block_hidden(self, bonus: torch.Tensor, cache: KVCache, block_size: int, window: int | None = None
                     ) -> torch.Tensor:
        """The final normed hidden states [block_size - 1, H] of the block rows after `bonus`.
        `window`: every layer sees at most this many positions back (`--draft-window`), on top of
        its own sliding window."""
        return self._hidden(self.block_ids(bonus, block_size), cache, window)

    def _hidden(self, ids: torch.Tensor, cache: KVCache, window: int | None = None,
                x: torch.Tensor | None = None) -> torch.Tensor:
        c, block_size = self.cfg, ids.shape[0]
        positions, kv_len = span(cache.length, block_size, self.offsets)
        if x is None:
            x = F.embedding(ids, self.embed)
            if c.input_embedding_scale != 1.0:
                x = x * c.input_embedding_scale
        # On the fused kernels (DFLASH_LINEAR=invariant, kernels/fused_linear.py) each norm (with its residual
        # add) runs in the prologue of the projection after it, and SwiGLU in gate_up's epilogue, as in the
        # target's dense layer. A DFlash2 conv sits between them: the norm goes into the prologue of the conv's
        # kernel projection, the pre-conv into the loader of the projection after it, the post-conv into the merge
        # of the output projection (dflash2.DynamicConv).
        fused = ops.fused_linear_applies(x)
        q_rows = c.num_heads * c.head_dim
        added = None  # the last sublayer's output, added into the residual stream x by the next norm (fused)
        for i, layer in enumerate(self.layers):
            source = x if added is None else added
            if fused and layer.attention_conv is None:
                qkv, stream = ops.norm_linear(source, layer.input_norm, c.rms_norm_eps, layer.qkv, layer.qkv_bias,
                                              None if added is None else x)
                x, conv_kernels = x if stream is None else stream, None
            elif fused:
                h, stream, conv_kernels = layer.attention_conv.normed_kernels(source, layer.input_norm, c.rms_norm_eps,
                                                                              None if added is None else x)
                x = x if stream is None else stream
                qkv = layer.attention_conv.project(h, conv_kernels, layer.qkv, layer.qkv_bias)
            else:
                h, stream = ops.rms_norm(source, layer.input_norm, c.rms_norm_eps, None if added is None else x)
                x = x if stream is None else stream
                h, conv_kernels = pre_conv(layer.attention_conv, h)
                qkv = ops.dense_linear(h, layer.qkv, layer.qkv_bias)
            k, v = qkv[:, q_rows:].view(block_size, 2, c.num_kv_heads, c.head_dim).unbind(1)
            out = ops.rope_attention(qkv[:, :q_rows].view(block_size, c.num_heads, c.head_dim), k, v, layer.q_norm,
                                     layer.k_norm, c.rms_norm_eps, self.cos_sin, positions, cache.k[i], cache.v[i],
                                     kv_len, causal=layer.causal, scale=self.scale,
                                     sliding_window=_narrowest(layer.window, window))
            if fused and layer.attention_conv is not None:
                out = layer.attention_conv.project_out(out.reshape(block_size, -1), layer.o_proj, layer.o_bias,
                                                       conv_kernels)
            else:
                out = ops.dense_linear(out.reshape(block_size, -1), layer.o_proj, layer.o_bias)
                out = post_conv(layer.attention_conv, out, conv_kernels)
            if fused and layer.mlp_conv is None:
                act, x = ops.norm_swiglu_linear(out, layer.post_norm, c.rms_norm_eps, layer.gate_up, None, x)
                added = ops.dense_linear(act, layer.down)
                continue
            if fused:  # DFlash2: norm + kernels, pre-conv + gate_up + SwiGLU, down + post-conv
                h, x, conv_kernels = layer.mlp_conv.normed_kernels(out, layer.post_norm, c.rms_norm_eps, x)
                act = layer.mlp_conv.project(h, conv_kernels, layer.gate_up, swiglu=True)
                added = layer.mlp_conv.project_out(act, layer.down, None, conv_kernels)
                continue
            h, x = ops.rms_norm(out, layer.post_norm, c.rms_norm_eps, x)
            h, conv_kernels = pre_conv(layer.mlp_conv, h)
            act = ops.swiglu(ops.dense_linear(h, layer.gate_up))  # (unfused: the fused paths continued above)
            added = post_conv(layer.mlp_conv, ops.dense_linear(act, layer.down), conv_kernels)
        h, _ = ops.rms_norm(x[1:], self.norm, c.rms_norm_eps) if added is None else \
            ops.rms_norm(added[1:], self.norm, c.rms_norm_eps, x[1:])
        return h


def tie(cfg: DrafterConfig, layers: list[DraftLayer]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stacked context projection (w_kv, b_kv: every layer's k/v rows, one GEMM for all layers' context
    K/V) from the layers' `qkv`, the one source of their q, k and v; each layer's q_proj, kv_proj and biases
    become views. The k/v rows are held twice (in `qkv`, so the block's q, k and v are one GEMM, and in
    w_kv): a fit that trains `qkv` calls this again after each step (tests/dflash2_fit.py)."""
    q_rows = cfg.num_heads * cfg.head_dim
    w_kv = torch.cat([layer.qkv[q_rows:] for layer in layers])
    b_kv = torch.cat([layer.qkv_bias[q_rows:] for layer in layers]) if layers[0].qkv_bias is not None else None
    rows = w_kv.shape[0] // len(layers)
    for i, layer in enumerate(layers):
        layer.q_proj, layer.kv_proj = layer.qkv[:q_rows], w_kv[i * rows:(i + 1) * rows]
        if b_kv is not None:
            layer.q_bias, layer.kv_bias = layer.qkv_bias[:q_rows], b_kv[i * rows:(i + 1) * rows]
    return w_kv, b_kv


def _dflash2_modules(cfg: DrafterConfig, w: dict[str, torch.Tensor], layers: list[DraftLayer]) -> CandidateSelector:
    """Attach each layer's two convs and return the selector, popping their tensors from `w`."""
    for i, layer in enumerate(layers):
        p = f"layers.{i}."
        layer.attention_conv, layer.mlp_conv = (
            DynamicConv(w.pop(p + conv + ".base_kernel"), w.pop(p + conv + ".kernel_projection.weight"))
            for conv in ("attention_conv", "mlp_conv"))
    s = "candidate_selector."
    return CandidateSelector(w.pop(s + "hidden_projection.weight"), w.pop(s + "predecessor_codebook"),
                             w.pop(s + "successor_codebook"), cfg.dflash2.selector_top_k,
                             cfg.output_multiplier, cfg.final_logit_softcapping)
