"""The one dispatch point between the Triton kernels and their torch references.

Model code calls `ops.<name>`; on CUDA that is the fused Triton kernel, on CPU the plain-torch
reference that the kernel is tested against. `DFLASH_KERNELS=triton` forces the kernels (on CPU
together with `TRITON_INTERPRET=1`, which is how the end-to-end losslessness test runs them);
`DFLASH_KERNELS=torch` forces the references everywhere.
"""
from __future__ import annotations

import importlib
import os
from functools import cache
from typing import Callable

import torch
import torch.nn.functional as F

from . import cuda

_MODULES = {
    "rms_norm": "rmsnorm",
    "swiglu": "swiglu",
    "qk_norm_rope_cache": "rope_cache",
    "attention": "attention",
    "draft_ctx_kv": "draft_kv",
    "sample": "accept",
    "accept": "accept",
    "verdict": "accept",
    "dynamic_conv": "dynamic_conv",
    "selector": "selector",
    "tree_build": "tree_build",  # kernels/tree_build.py: a drafted tree's best-first build and its walk
    "tree_verdict": "tree_build",
    "tree_mask": "tree_build",
    "embed_block": "embed_block",
    "gdn_commit": "gdn_replay",
    "causal_conv": "gated_delta",
    "gated_delta_rule": "gated_delta",
    "replay": "gdn_replay",  # kernels/gdn_replay.py: the commit in one launch (the reference: gated_delta.replay_ref)
    "conv_commit": "gated_delta",
    "gated_rms_norm": "gated_delta",
    "l2norm": "gated_delta",
    "route": "moe",
    "experts": "moe",
    "invariant_linear": "invariant_linear",
    "int4_linear": "quant_linear",
    "int8_linear": "quant_linear",
    "fp8_linear": "quant_linear",
}


def kernel_mode() -> str:
    mode = os.environ.get("DFLASH_KERNELS", "auto")
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"DFLASH_KERNELS must be auto, torch or triton, not {mode!r}")
    return mode


@cache
def _impl(name: str, triton: bool) -> Callable:
    module = importlib.import_module(f"dflash_cli.kernels.{_MODULES[name]}")
    return getattr(module, name if triton else f"{name}_ref")


def _pick(name: str, device: torch.device) -> Callable:
    mode = kernel_mode()
    return _impl(name, mode == "triton" or (mode == "auto" and cuda.is_gpu(device)))


def rms_norm(x, weight, eps, residual=None, offset=False, fp32_weight=False):
    if fp32_weight:  # gpt-oss's convention; the others call with the arguments they always did
        return _pick("rms_norm", x.device)(x, weight, eps, residual, offset, fp32_weight)
    return _pick("rms_norm", x.device)(x, weight, eps, residual, offset)


def swiglu(gate_up):
    return _pick("swiglu", gate_up.device)(gate_up)


def qk_norm_rope_cache(q, k, v, q_norm, k_norm, eps, cos_sin, positions, k_cache, v_cache, offset=False, rows=None):
    extra = {} if rows is None else {"rows": rows}  # a tree verify's cache rows (its positions repeat)
    return _pick("qk_norm_rope_cache", q.device)(q, k, v, q_norm, k_norm, eps, cos_sin, positions, k_cache, v_cache,
                                                 offset, **extra)


# The split-K kernel is shaped for decode, verify and draft (a few query rows, many keys). Prefill
# chunks are long and run once, eagerly: torch's SDPA (flash attention on CUDA) serves them, when it
# can take its flash path: bf16/fp16, causal without a window, GQA through a lower-right causal bias.
# Otherwise SDPA would fall back to its math kernel, whose memory grows with chunk × context (an OOM
# near 4k context on a 24 GB card in fp32), so such chunks go through the split-K kernel, whose
# scratch is a few MB at any length. Up to MAX_KERNEL_Q_LEN queries (decode, verify, draft) the kernel
# is batch-invariant: a row's output does not depend on how many queries share the launch
# (kernels/attention.py's MAX_INVARIANT_Q_LEN, the same number).
MAX_KERNEL_Q_LEN = 32


def kv_length(cache_length: torch.Tensor, q_len: int) -> torch.Tensor | int:
    """The `kv_len` to give `attention` for q_len new tokens. Decode, verify and draft keep it on
    the device (graph-safe, no sync). A prefill chunk reads it back once here, rather than once per
    layer in the reference, which slices the cache with it."""
    return int(cache_length) + q_len if q_len > MAX_KERNEL_Q_LEN else cache_length + q_len


def flash_prefill(q: torch.Tensor, causal: bool, sliding_window: int | None) -> bool:
    """Whether SDPA takes its flash path (O(n) memory) for this prefill chunk."""
    from .kernels.attention import _LOWER_RIGHT_GQA

    return q.dtype in (torch.bfloat16, torch.float16) and sliding_window is None and causal and _LOWER_RIGHT_GQA


def attention(q, k_cache, v_cache, kv_len, *, causal, scale, sliding_window=None, sinks=None, gate=None):
    # keywords only when used: families without sinks or an output gate see none
    extra = {name: x for name, x in (("sinks", sinks), ("gate", gate)) if x is not None}
    if q.shape[0] > MAX_KERNEL_Q_LEN:
        # SDPA has no sinks: with the kernels on, a long chunk with sinks runs through the split kernel too
        kernels = _pick("attention", q.device) is not _impl("attention", False)
        if kernels and (sinks is not None or (cuda.is_gpu(q.device) and not flash_prefill(q, causal, sliding_window))):
            return _impl("attention", True)(q, k_cache, v_cache, torch.as_tensor(kv_len, device=q.device),
                                            causal=causal, scale=scale, sliding_window=sliding_window, **extra)
        return _impl("attention", False)(
            q, k_cache, v_cache, kv_len, causal=causal, scale=scale, sliding_window=sliding_window, **extra)
    return _pick("attention", q.device)(
        q, k_cache, v_cache, kv_len, causal=causal, scale=scale, sliding_window=sliding_window, **extra
    )


def tree_attention(q, k_cache, v_cache, kv_len, mask, positions, key_positions, *, scale, sliding_window=None,
                   sinks=None, gate=None):
    """A tree verify's attention (Decoder.forward(tree=...)): node t, at positions[t], sees the committed keys
    and its ancestors (mask [T, capacity]), within the window by position (key_positions [capacity]). The
    kernel reads the tree from the mask's new rows and gives each node the bits of decoding its path."""
    extra = {name: x for name, x in (("sinks", sinks), ("gate", gate)) if x is not None}
    if _pick("attention", q.device) is _impl("attention", False):
        if sliding_window is not None:
            mask = mask & (positions[:, None] - key_positions[None, :] < sliding_window)
        return _impl("attention", False)(q, k_cache, v_cache, kv_len, causal=True, scale=scale, mask=mask, **extra)
    return _impl("attention", True)(q, k_cache, v_cache, torch.as_tensor(kv_len, device=q.device), causal=True,
                                    scale=scale, sliding_window=sliding_window, tree=(mask, positions), **extra)


# The attention prologue (issue 26): on the kernels a step's rows (decode, verify, draft, a tree) take one launch
# for q/k-norm, rope, the KV-cache write and attention: the attention kernel's programs norm and rotate the q rows
# they read, and the new K/V rows when they read them, before their keys (kernels/attention.py, `Rope`). The torch
# path, and a prefill chunk on the kernels, run `qk_norm_rope_cache` then the attention, as two ops.
def rope_attention(q, k, v, q_norm, k_norm, eps, cos_sin, positions, k_cache, v_cache, kv_len, *, offset=False,
                   causal, scale, sliding_window=None, sinks=None, gate=None):
    """`qk_norm_rope_cache` (the new tokens' K/V at `positions`, which are kv_len - T + t) then `attention`."""
    extra = {name: x for name, x in (("sinks", sinks), ("gate", gate)) if x is not None}
    if q.shape[0] <= MAX_KERNEL_Q_LEN and _pick("attention", q.device) is not _impl("attention", False):
        from .kernels.attention import Rope

        return _impl("attention", True)(q, k_cache, v_cache, kv_len, causal=causal, scale=scale,
                                        sliding_window=sliding_window, **extra,
                                        rope=Rope(k, v, q_norm, k_norm, eps, cos_sin, positions, offset))
    q = qk_norm_rope_cache(q, k, v, q_norm, k_norm, eps, cos_sin, positions, k_cache, v_cache, offset)
    return attention(q, k_cache, v_cache, kv_len, causal=causal, scale=scale, sliding_window=sliding_window, **extra)


def rope_tree_attention(q, k, v, q_norm, k_norm, eps, cos_sin, positions, rows, k_cache, v_cache, kv_len, mask,
                        key_positions, *, offset=False, scale, sliding_window=None, sinks=None, gate=None):
    """A tree verify's `qk_norm_rope_cache` (its nodes at `positions`, their K/V at cache `rows`, which are
    kv_len - T + t: Decoder.forward's) then `tree_attention`."""
    extra = {name: x for name, x in (("sinks", sinks), ("gate", gate)) if x is not None}
    if _pick("attention", q.device) is not _impl("attention", False):
        from .kernels.attention import Rope

        return _impl("attention", True)(q, k_cache, v_cache, torch.as_tensor(kv_len, device=q.device), causal=True,
                                        scale=scale, sliding_window=sliding_window, tree=(mask, positions), **extra,
                                        rope=Rope(k, v, q_norm, k_norm, eps, cos_sin, positions, offset))
    q = qk_norm_rope_cache(q, k, v, q_norm, k_norm, eps, cos_sin, positions, k_cache, v_cache, offset, rows=rows)
    return tree_attention(q, k_cache, v_cache, kv_len, mask, positions, key_positions, scale=scale,
                          sliding_window=sliding_window, **extra)


def draft_ctx_kv(ctx_h, w_kv, k_norm, eps, cos_sin, positions, k_cache, v_cache, b_kv=None):
    extra = {} if b_kv is None else {"b_kv": b_kv}  # the gpt-oss drafters' k/v biases
    return _pick("draft_ctx_kv", ctx_h.device)(ctx_h, w_kv, k_norm, eps, cos_sin, positions, k_cache, v_cache,
                                               **extra)


def sample(logits, rows, **params):
    return _pick("sample", logits.device)(logits, rows, **params)


def accept(logits, block_ids, cache_len, **params):
    return _pick("accept", logits.device)(logits, block_ids, cache_len, **params)


def dynamic_conv(z, base, dynamic):
    """DFlash2's dynamic causal conv over the block rows (kernels/dynamic_conv.py)."""
    return _pick("dynamic_conv", z.device)(z, base, dynamic)


def selector(p, logits, anchor, predecessor, successor, top_k, multiplier=1.0, softcap=None, out=None):
    """DFlash2's candidate selector: each row's top-k, the bigram rescoring and the greedy walk from the
    anchor, in one launch (kernels/selector.py)."""
    return _pick("selector", logits.device)(p, logits, anchor, predecessor, successor, top_k, multiplier, softcap,
                                            out)


def embed_block(bonus, mask_ids, table):
    """The drafter's input ids [bonus, mask_ids] and their embedding rows, in one launch (kernels/embed_block.py)."""
    return _pick("embed_block", table.device)(bonus, mask_ids, table)


def verdict(logits, block_ids, cache_len, **params):
    """`accept`, packed for the engine (kernels/accept.Verdict): no launch beyond accept's."""
    return _pick("verdict", logits.device)(logits, block_ids, cache_len, **params)


# ---- Gated DeltaNet (the hybrid family's linear layers) -------------------------------------------------
def l2norm(x):
    return _pick("l2norm", x.device)(x)


def causal_conv(window, weight):
    return _pick("causal_conv", window.device)(window, weight)


def gated_delta_rule(q, k, v, g, beta, state, scale):
    return _pick("gated_delta_rule", q.device)(q, k, v, g, beta, state, scale)


def tree_build(anchor, logp, ids, budget):
    """The best-first tree over per-depth candidates (dflash_cli/tree.py), one launch."""
    return _pick("tree_build", logp.device)(anchor, logp, ids, budget)


def tree_mask(ancestors, depths, length, capacity):
    """A tree verify's attention mask over the cache and its key positions (dflash_cli/tree.py), one launch."""
    return _pick("tree_mask", length.device)(ancestors, depths, length, capacity)


def tree_verdict(tokens, parents, targets, depth_max):
    """The target's walk down a drafted tree and what a tree iteration packs and commits (dflash_cli/tree.py),
    one launch."""
    return _pick("tree_verdict", targets.device)(tokens, parents, targets, depth_max)


def gdn_replay(state, k, v, g, beta, count):
    return _pick("replay", state.device)(state, k, v, g, beta, count)


def gdn_commit(state, k, v, g, beta, conv, x, count, path=None):
    """The hybrid commit: `gdn_replay` and `conv_commit` in one launch (kernels/gdn_replay.py); `path`: a tree's
    accepted rows, gathered in the launch."""
    return _pick("gdn_commit", state.device)(state, k, v, g, beta, conv, x, count, path)


def conv_commit(conv, x, count):
    return _pick("conv_commit", conv.device)(conv, x, count)


def gated_rms_norm(x, z, weight, eps):
    return _pick("gated_rms_norm", x.device)(x, z, weight, eps)


# kernels/gdn_glue.py: a linear-attention layer's glue in two launches (issue 26)
_MODULES.update(gdn_prologue="gdn_glue", gdn_rule_norm="gdn_glue")


def gdn_prologue(proj, conv, weight, a_log, dt_bias, heads_k, k, v, g, beta, x=None, windows=None):
    extra = {} if windows is None else {"windows": windows}  # a tree's nodes: each its own conv window
    return _pick("gdn_prologue", proj.device)(proj, conv, weight, a_log, dt_bias, heads_k, k, v, g, beta, x, **extra)


def gdn_rule_norm(q, k, v, g, beta, state, scale, z, norm_weight, eps, write_state):
    return _pick("gdn_rule_norm", q.device)(q, k, v, g, beta, state, scale, z, norm_weight, eps, write_state)


# ---- Mixture of experts -----------------------------------------------------------------------------------
def moe_route(x, router, top_k, renormalize, **variant):
    """variant: the router's `bias`, `softmax_after_topk` (gpt-oss; kernels/moe.py)."""
    return _pick("route", x.device)(x, router, top_k, renormalize, **variant)


def moe_experts(x, gate_up, down, idx, weights, **variant):
    """variant: expert biases, MXFP4 scales, the clamped SwiGLU (gpt-oss; kernels/moe.py)."""
    return _pick("experts", x.device)(x, gate_up, down, idx, weights, **variant)


# ---- Linear layers ------------------------------------------------------------------------------------------
# DFLASH_LINEAR picks how a step's projections run. `cublas` (the default, until a GPU has measured the
# kernel against cuBLAS): F.linear, whose kernel and split-K follow M, so a verify row and the decode of
# the same token may round differently in bf16. `invariant`: kernels/invariant_linear.py for up to
# MAX_INVARIANT_ROWS rows, which rounds a row the same whatever M is (issue 24).
LINEAR_MODES = ("cublas", "invariant")
MAX_INVARIANT_ROWS = 32  # decode (1), verify (b ≤ 16), the draft block: the rows a step sees


def linear_mode() -> str:
    """The one place DFLASH_LINEAR is read."""
    mode = os.environ.get("DFLASH_LINEAR", "cublas")
    if mode not in LINEAR_MODES:
        raise ValueError(f"DFLASH_LINEAR must be cublas or invariant, not {mode!r}")
    return mode


def invariant_linear(x, w, b=None):
    """x @ w.T + b with fp32 accumulation, rounded once to x's dtype: the Triton kernel on CUDA (or with
    DFLASH_KERNELS=triton), else its torch reference (which is not itself batch-invariant)."""
    return _pick("invariant_linear", x.device)(x, w, b)


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """A dense projection, as the models' `Linear` seam (models/layers/linear.Dense) calls it. Under DFLASH_LINEAR=invariant a step's rows go through `invariant_linear`;
    longer prefill chunks stay on F.linear (cuBLAS), as prefill is shared by plain and speculative
    decoding and needs no invariance. Under cublas, F.linear always."""
    if linear_mode() == "invariant" and x.numel() <= MAX_INVARIANT_ROWS * x.shape[-1]:
        return invariant_linear(x, w, b)
    return F.linear(x, w, b)


# ---- Quantized linear ------------------------------------------------------------------------------------
# Weight-only int4 (W4A16), int8 (W8A16) and FP8 e4m3 projections (dflash_cli/quant). A step's rows (up to
# MAX_INVARIANT_ROWS) run kernels/quant_linear.py on the kernel path (CUDA, or DFLASH_KERNELS=triton),
# which dequantizes in registers and rounds a row the same whatever M is; its torch reference elsewhere.
# There is no cuBLAS int4/int8/fp8 path to switch to, so DFLASH_LINEAR does not apply. Longer prefill chunks
# (shared by plain and speculative decoding, so no invariance needed) dequantize the whole weight into the
# activations' dtype and run F.linear (cuBLAS): one transient weight-sized buffer per call.
def _step_rows(x: torch.Tensor) -> bool:
    return x.numel() <= MAX_INVARIANT_ROWS * x.shape[-1]


def int4_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x @ W.T + b for an Int4Linear `layer` (a single projection, not a stack of experts)."""
    if not _step_rows(x):
        return layer.forward(x)  # the layout's reference: the whole weight dequantized, F.linear
    return _pick("int4_linear", x.device)(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.bias,
                                          layer.input_perm)


def int8_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x @ W.T + b for an Int8Linear `layer` (a single projection, not a stack of experts)."""
    if not _step_rows(x):
        return layer.forward(x)  # the layout's reference: the whole weight dequantized, F.linear
    return _pick("int8_linear", x.device)(x, layer.weight, layer.scale, layer.bias)


def fp8_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x @ W.T + b for an Fp8Linear `layer` (a single projection, not a stack of experts)."""
    if not _step_rows(x):
        return layer.forward(x)  # the layout's reference: the whole weight dequantized, F.linear
    return _pick("fp8_linear", x.device)(x, layer.weight, layer.scale, layer.block, layer.bias)


# ---- Fused linear -------------------------------------------------------------------------------------------
# kernels/fused_linear.py: the invariant linear kernel with the RMSNorm (+ residual) prologue and the SwiGLU
# epilogue fused in (issue 26), one launch where the unfused path has two or three. Taken where the
# invariant kernel itself is (DFLASH_LINEAR=invariant, a step's rows) and the kernels run (CUDA, or
# DFLASH_KERNELS=triton); anywhere else the callers run the unfused ops, which the fused ones equal.
_MODULES.update(swiglu_linear="fused_linear", norm_linear="fused_linear", norm_swiglu_linear="fused_linear")


def fused_linear_applies(x: torch.Tensor) -> bool:
    """Whether a projection of `x`'s rows runs on the fused kernels."""
    mode = kernel_mode()
    return (linear_mode() == "invariant" and x.numel() <= MAX_INVARIANT_ROWS * x.shape[-1]
            and (mode == "triton" or (mode == "auto" and cuda.is_gpu(x.device))))


def swiglu_linear(x, w, b=None):
    """silu(gate) · up of gate_up = x @ w.T + b (w: gate rows, then up rows), in one launch."""
    return _impl("swiglu_linear", True)(x, w, b)


def norm_linear(x, norm_w, eps, w, b=None, residual=None, fp32_weight=False):
    """RMSNorm (plain style, or with `fp32_weight` gpt-oss's) of x (+ residual), then x @ w.T + b on the
    invariant kernel, in one launch: (out, new residual, None without a residual)."""
    if fp32_weight:  # the others call with the arguments they always did
        return _impl("norm_linear", True)(x, norm_w, eps, w, b, residual, fp32_weight=True)
    return _impl("norm_linear", True)(x, norm_w, eps, w, b, residual)


def norm_swiglu_linear(x, norm_w, eps, w, b=None, residual=None):
    """RMSNorm (plain style) of x (+ residual), then `swiglu_linear`, in one launch: (out, new residual)."""
    return _impl("norm_swiglu_linear", True)(x, norm_w, eps, w, b, residual)


# DFlash2's drafter layer (dflash2.DynamicConv): its dynamic conv inside the projections around it.
_MODULES.update(norm_linear_rows="fused_linear", conv_linear="fused_linear", linear_conv="fused_linear")


def norm_linear_rows(x, norm_w, eps, w, residual=None):
    """`norm_linear`, and the normed rows: (out, new residual or None, normed rows), in one launch."""
    return _impl("norm_linear_rows", True)(x, norm_w, eps, w, None, residual)


def conv_linear(z, base, dynamic, w, b=None, swiglu=False):
    """The projection (SwiGLU with `swiglu`) of dynamic_conv(z, base, dynamic), in one launch."""
    return _impl("conv_linear", True)(z, base, dynamic, w, b, swiglu)


def linear_conv(x, w, b, base, dynamic):
    """dynamic_conv(x @ w.T + b, base, dynamic), in one launch."""
    return _impl("linear_conv", True)(x, w, b, base, dynamic)


# ---- Tree verification on a hybrid target ---------------------------------------------------------------
# kernels/gated_delta_tree.py: the gated delta rule down a drafted tree, each node from its parent's state,
# with the chain's gated norm as epilogue.
_MODULES.update(tree_rule_norm="gated_delta_tree", tree_windows="gated_delta_tree")


def gdn_tree_windows(mask, rows, keep):
    """The tree's parents and each node's conv window, read from a tree verify's mask, in one launch."""
    return _pick("tree_windows", mask.device)(mask, rows, keep)


def gdn_tree_rule_norm(q, k, v, g, beta, state, parents, scale, z, norm_weight, eps):
    return _pick("tree_rule_norm", q.device)(q, k, v, g, beta, state, parents, scale, z, norm_weight, eps)
