"""Memory planning: how many tokens of context fit next to the weights, decided before loading.

What is counted comes from the model itself, not from a dense-model formula: the weights are the
family's weight table (every tensor the loader will allocate, in its load dtype: experts, packed
MXFP4 bytes and fp32 state parameters included), and the caches are what the family and the
drafter say they hold per token of context and in fixed state (a hybrid's recurrent state, its
verify scratch and its prefix snapshot). On CUDA the context is sized from free device memory (or
--max-context); a request that cannot fit is a one-line error that says what is needed and what is
free, instead of an out-of-memory traceback halfway through loading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import cuda
from .errors import DflashError

GiB = 1 << 30
CPU_DEFAULT_CONTEXT = 8192


@dataclass(frozen=True)
class MemoryNeeds:
    weights: int  # target + drafter weights, as loaded
    per_token: int  # cache bytes per token of context (target + drafter)
    fixed: int  # cache bytes that do not grow with the context (recurrent states, scratch)
    workspace: int  # activations of the largest forward, verify logits, the CUDA-graph pool, headroom
    slack: int  # cache slots past the context limit (the verify blocks in flight)

    def total(self, context: int) -> int:
        return self.weights + self.fixed + self.workspace + (context + self.slack) * self.per_token


def needs_for(family, target_cfg, drafter_cfg, dtype: torch.dtype, block_size: int, slack: int,
              target_weights: int | None = None) -> MemoryNeeds:
    """What a target of `family` and its drafter (or None) need, from their weight tables and caches.
    `target_weights`: the target's bytes as its checkpoint stores them, where that is not its table in
    `dtype` (a quantized target: packed words, scales and zeros; checkpoint.weight_bytes)."""
    from . import drafter
    from .models.weights import table_bytes

    weights = table_bytes(family.weight_table(target_cfg), dtype) if target_weights is None else target_weights
    per_token, fixed = family.cache_bytes(target_cfg, dtype, block_size)
    if drafter_cfg is not None:
        weights += table_bytes(drafter.weight_table(drafter_cfg), dtype) + drafter.copy_bytes(drafter_cfg, dtype)
        per_token += drafter.cache_bytes(drafter_cfg, dtype)
    return MemoryNeeds(weights, per_token, fixed, workspace_bytes(target_cfg, block_size), slack)


# Weight formats a target can be held in on the GPU ("bf16": as released). The drafter stays bf16.
FORMATS = ("bf16", "fp8", "int8", "int4")
INT4_GROUP = 128  # input columns per int4 scale (quantize at load; most int4 checkpoints use the same)
# Never quantized (issue 25; what Qwen, GPTQ and AutoRound checkpoints keep in bf16): the embedding and the
# head (the drafter reads both; DFlash2's selector needs the dense head), norms, routers and gates, Gated
# DeltaNet's small in_proj_a/in_proj_b, A_log, dt_bias and conv. What is quantized: the projections.
_KEPT = ("in_proj_a", "in_proj_b")


def quantizable(w) -> bool:
    """Whether the loader holds weight `w` (a `models.weights.Weight`) quantized when the target is: a
    2-D or stacked-expert projection (q_proj, in_proj_qkv, experts' down_proj: a name with "proj") in the
    run's dtype, not one of `_KEPT`."""
    module = w.name.removesuffix(".weight")  # transformers' fused experts have no ".weight": experts.down_proj
    last = module.rpartition(".")[2]
    return (w.dtype == "model" and len(w.shape) >= 2 and "proj" in last and not last.endswith("bias")
            and last not in _KEPT and ".router." not in f".{module}")  # Gemma 4's router.proj: a router


def quantized_weight_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of one projection [..., out, in] held in `fmt` as quantizing at load writes it (quant/quantize.py),
    scales included: int4: codes packed eight to an int32 word and a bf16 scale per group of INT4_GROUP
    inputs, symmetric (an asymmetric checkpoint adds a byte of zero point per group, about 0.2%);
    int8 and fp8: a byte per weight and a bf16 scale per output row (Qwen's FP8 blocks of 128 × 128 hold
    fewer scales)."""
    *lead, out, inn = shape
    stack = math.prod(lead)
    if fmt == "int4":
        return stack * out * (-(-inn // 8) * 4 + -(-inn // INT4_GROUP) * 2)
    if fmt in ("int8", "fp8"):
        return stack * out * (inn + 2)
    raise ValueError(f"unknown weight format {fmt!r}")


def quantized_bytes(table, fmt: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a target's weight table takes with its projections in `fmt` and the rest as loaded."""
    from .models.weights import table_bytes

    if fmt == "bf16":  # as released
        return table_bytes(table, dtype)
    kept = [w for w in table if not quantizable(w)]
    return table_bytes(kept, dtype) + sum(quantized_weight_bytes(w.shape, fmt) for w in table if quantizable(w))


# Fixed costs of running on a GPU at all, beside weights, caches and activations (gpu-review-2 F9): a
# cuBLAS workspace for each stream that runs GEMMs (the default one and the captures' side stream; up to
# 32 MiB each on Hopper), and the loaded Triton modules with fla's autotuning buffers.
CUBLAS_WORKSPACES = 2 * (32 << 20)
KERNEL_MODULES = 64 << 20


def workspace_bytes(cfg, block_size: int, prefill_chunk: int = 512) -> int:
    """Activations of the largest forward (a prefill chunk, and what the family's prefill allocates
    for itself, `cfg.prefill_scratch`), the verify and draft logits in float32, what the captured steps
    allocate from the graph pool (one per block size an adaptive engine may use, `adaptive.candidates`:
    counted as if none reused another's scratch, which the shared pool allows), the cuBLAS workspaces
    and kernel modules, and half a GiB for the allocator."""
    from .adaptive import candidates

    chunk = prefill_chunk * (4 * cfg.hidden_size + cfg.activation_width) * 4 + cfg.prefill_scratch
    logits = 2 * block_size * cfg.vocab_size * 4
    graph_pool = sum(_step_scratch(cfg, b) for b in candidates(block_size))
    return chunk + logits + graph_pool + CUBLAS_WORKSPACES + KERNEL_MODULES + GiB // 2


def _step_scratch(cfg, block_size: int) -> int:
    """What one captured step at this block size allocates: sampler buffers, step activations."""
    return 2 * (2 * block_size * cfg.vocab_size * 4) + 64 * block_size * cfg.activation_width * 4


def plan_context(needs: MemoryNeeds, ceiling: int, requested: int | None, free_bytes: int | None) -> int:
    """The context length (prompt + answer tokens) to allocate caches for.

    `ceiling`: the model's positions. `free_bytes` is None on CPU, where the cache is sized by the
    request (default 8192 tokens)."""
    if requested is not None and requested > ceiling:
        raise DflashError(f"--max-context {requested} is beyond the model's {ceiling} positions")
    if free_bytes is None:
        return requested or min(ceiling, CPU_DEFAULT_CONTEXT)
    spare = free_bytes - needs.weights - needs.fixed - needs.workspace
    fits = max(0, spare // needs.per_token - needs.slack)
    if requested is not None:
        if requested > fits:
            need = needs.total(requested)
            cache = (requested + needs.slack) * needs.per_token + needs.fixed
            raise DflashError(f"--max-context {requested} needs {need / GiB:.1f} GiB on the GPU "
                              f"(weights {needs.weights / GiB:.1f} GiB, caches {cache / GiB:.1f} GiB), "
                              f"{free_bytes / GiB:.1f} GiB is free: use --max-context {fits} or less")
        return requested
    if fits < 256:
        raise DflashError(f"not enough GPU memory: the weights need {needs.weights / GiB:.1f} GiB and "
                          f"{free_bytes / GiB:.1f} GiB is free (close other GPU programs, or use a smaller model)")
    return min(ceiling, fits)


def free_device_memory(device: torch.device) -> int | None:
    if not cuda.is_gpu(device):
        return None
    free, _ = cuda.mem_get_info(device)
    return free
