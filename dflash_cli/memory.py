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
    tree_nodes: int = 0  # the largest verified tree's nodes (--tree-budget; 0: the chain), counted in the above
    tree_per_token: int = 0  # of per_token: the tree verify's buffers that grow with the context
    tree_bytes: int = 0  # of fixed + workspace: what the tree verify adds that does not (records, step scratch)

    def total(self, context: int) -> int:
        return self.weights + self.fixed + self.workspace + (context + self.slack) * self.per_token

    def tree_total(self, context: int) -> int:
        """Of `total(context)`: what verifying trees of `tree_nodes` nodes adds over the chain."""
        return self.tree_bytes + (context + self.slack) * self.tree_per_token


def tree_nodes(tree_budget: int | str) -> int:
    """Nodes of the largest tree a --tree-budget verifies: the budget, or for "auto" the most the engine may
    pick (adaptive.tree_budgets: ops.MAX_KERNEL_Q_LEN, 32)."""
    from .adaptive import tree_budgets

    return max(tree_budgets(1 << 30)) if tree_budget == "auto" else int(tree_budget)


def verified_tree_nodes(drafter_cfg, block_size: int, tree_budget: int | str) -> int:
    """Nodes of the largest tree the engine verifies with this drafter at --tree-budget `tree_budget`; 0 where it
    verifies the chain (no drafter, block size 1, or a DFlash2 drafter, which keeps its selector's chain, as
    Engine decides)."""
    trees = drafter_cfg is not None and block_size > 1 and getattr(drafter_cfg, "dflash2", None) is None
    return tree_nodes(tree_budget) if trees else 0


def needs_for(family, target_cfg, drafter_cfg, dtype: torch.dtype, block_size: int, slack: int,
              target_weights: int | None = None, tree_budget: int | str = 0) -> MemoryNeeds:
    """What a target of `family` and its drafter (or None) need, from their weight tables and caches.
    `target_weights`: the target's bytes as its checkpoint stores them, where that is not its table in
    `dtype` (a quantized target: packed words, scales and zeros; checkpoint.weight_bytes). `tree_budget`:
    the engine's --tree-budget (N nodes, or "auto"), whose verify buffers are counted (`tree_verify_bytes`);
    `slack` is then the caches' for max(block_size, N) rows (engine.cache_slack)."""
    from . import drafter
    from .models.weights import table_bytes

    nodes = verified_tree_nodes(drafter_cfg, block_size, tree_budget)
    rows = max(block_size, nodes)  # the verify rows the caches record (a hybrid's per-row records)
    weights = table_bytes(family.weight_table(target_cfg), dtype) if target_weights is None else target_weights
    per_token, fixed = family.cache_bytes(target_cfg, dtype, rows)
    if drafter_cfg is not None:
        weights += table_bytes(drafter.weight_table(drafter_cfg), dtype) + drafter.copy_bytes(drafter_cfg, dtype)
        per_token += drafter.cache_bytes(drafter_cfg, dtype)
    workspace = workspace_bytes(target_cfg, block_size)
    tree_per_token = tree_fixed = 0
    if nodes:
        steps = _auto_budgets(nodes) if tree_budget == "auto" else (nodes,)  # a captured step per budget
        tree_per_token, step_scratch = tree_verify_bytes(target_cfg, block_size, steps)
        tree_fixed = fixed - family.cache_bytes(target_cfg, dtype, block_size)[1] + step_scratch
        per_token += tree_per_token
        workspace += step_scratch
    return MemoryNeeds(weights, per_token, fixed, workspace, slack, nodes, tree_per_token, tree_fixed)


def _auto_budgets(nodes: int) -> tuple[int, ...]:
    from .adaptive import tree_budgets

    return tree_budgets(nodes)


# The tree verify's attention (kernels/attention.py, tree=...) splits every key range at SPLIT keys and keeps
# an fp32 partial (the head's accumulator and its max and sum) per node, query head and split.
ATTENTION_SPLIT = 256  # kernels/attention.SPLIT (not imported: that would import Triton to plan memory)


def tree_verify_bytes(cfg, block_size: int, budgets: tuple[int, ...]) -> tuple[int, int]:
    """(bytes per token of context, bytes that do not grow with it) that verifying trees of these node budgets
    needs beyond the chain, each budget its own captured step (counted as if none reused another's scratch,
    as `workspace_bytes` counts the chain's). Per token: the largest tree's ancestor mask over the cache
    [N, capacity] bool, its key positions and the committed-key row (int64), and the attention's split
    partials. Per step: the N rows' logits, sampling and activations (`_step_scratch` at N rows), the
    drafter's logits and their log-softmax for the top-K, the ancestors [N, N], and for a hybrid one linear
    layer's per-node states at a time (kernels/gated_delta_tree: [N, Hv, dk, dv] fp32). The per-node records
    the commit replays are the cache's own (family.cache_bytes at N rows)."""
    most = max(budgets)
    width = max(16, 1 << (cfg.head_dim - 1).bit_length())  # the kernel's head tile
    partials = cfg.num_heads * most * (width + 2) * 4
    per_token = most + 3 * 8 + -(-partials // ATTENTION_SPLIT)
    gdn = getattr(cfg, "gdn", None)
    states = 0 if gdn is None else gdn.heads_v * gdn.dk * gdn.dv * 4
    scratch = sum(_step_scratch(cfg, n) + 2 * block_size * cfg.vocab_size * 4 + n * n + n * states for n in budgets)
    return per_token, scratch


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
            tree = (f", the --tree-budget {needs.tree_nodes} verify {needs.tree_total(requested) / GiB:.1f} GiB"
                    if needs.tree_nodes else "")
            fix = f"use --max-context {fits} or less" + (" or a smaller --tree-budget" if needs.tree_nodes else "")
            raise DflashError(f"--max-context {requested} needs {need / GiB:.1f} GiB on the GPU "
                              f"(weights {needs.weights / GiB:.1f} GiB, caches {cache / GiB:.1f} GiB{tree}), "
                              f"{free_bytes / GiB:.1f} GiB is free: {fix}")
        return requested
    if fits < 256:
        if needs.tree_nodes:
            raise DflashError(f"not enough GPU memory for a --tree-budget {needs.tree_nodes} verify: the weights need "
                              f"{needs.weights / GiB:.1f} GiB, the tree's buffers {needs.tree_total(256) / GiB:.1f} GiB "
                              f"at 256 tokens, and {free_bytes / GiB:.1f} GiB is free (use a smaller --tree-budget, "
                              f"or --tree-budget 0 for the chain)")
        raise DflashError(f"not enough GPU memory: the weights need {needs.weights / GiB:.1f} GiB and "
                          f"{free_bytes / GiB:.1f} GiB is free (close other GPU programs, or use a smaller model)")
    return min(ceiling, fits)


def free_device_memory(device: torch.device) -> int | None:
    if not cuda.is_gpu(device):
        return None
    free, _ = cuda.mem_get_info(device)
    return free
