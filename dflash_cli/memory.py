"""Memory planning: how many tokens of KV cache fit next to the weights, decided before loading.

On CUDA the caches are sized from free device memory (and --max-context); a request that cannot
fit is a one-line error that says what is needed and what is free, instead of an out-of-memory
traceback halfway through loading.
"""
from __future__ import annotations

import torch

from .config import DrafterConfig, TargetConfig
from .engine import cache_slack
from .errors import DflashError

GiB = 1 << 30
CPU_DEFAULT_CONTEXT = 8192


def kv_bytes_per_token(target: TargetConfig, drafter: DrafterConfig | None, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    per = target.num_layers * target.num_kv_heads * target.head_dim
    if drafter is not None:
        per += drafter.num_layers * drafter.num_kv_heads * drafter.head_dim
    return 2 * per * size  # K and V


def weight_bytes(target: TargetConfig, drafter: DrafterConfig | None, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    h = target.hidden_size
    attn = h * (target.num_heads + 2 * target.num_kv_heads) * target.head_dim + target.num_heads * target.head_dim * h
    mlp = 3 * h * target.intermediate_size
    params = target.num_layers * (attn + mlp) + target.vocab_size * h * (1 if target.tie_word_embeddings else 2)
    if drafter is not None:
        d = drafter
        d_attn = h * (d.num_heads + 2 * d.num_kv_heads) * d.head_dim + d.num_heads * d.head_dim * h
        params += d.num_layers * (d_attn + 3 * h * d.intermediate_size) + len(d.target_layer_ids) * h * h
    return params * size


def workspace_bytes(target: TargetConfig, block_size: int, prefill_chunk: int = 512) -> int:
    """Activations of the largest forward (a prefill chunk) and the verify logits, with headroom."""
    chunk = prefill_chunk * (4 * target.hidden_size + 2 * target.intermediate_size) * 4
    return chunk + block_size * target.vocab_size * 4 + GiB // 2


def plan_context(target: TargetConfig, drafter: DrafterConfig | None, dtype: torch.dtype,
                 requested: int | None, free_bytes: int | None) -> int:
    """The context length (prompt + answer tokens) to allocate caches for.

    `free_bytes` is None on CPU, where the cache is sized by the request (default 8192 tokens)."""
    ceiling = target.max_position_embeddings
    if requested is not None and requested > ceiling:
        raise DflashError(f"--max-context {requested} is beyond the model's {ceiling} positions")
    if free_bytes is None:
        return requested or min(ceiling, CPU_DEFAULT_CONTEXT)
    block = drafter.block_size if drafter else 1
    slack = cache_slack(block)
    weights = weight_bytes(target, drafter, dtype)
    per_token = kv_bytes_per_token(target, drafter, dtype)
    spare = free_bytes - weights - workspace_bytes(target, block)
    fits = max(0, spare // per_token - slack)
    if requested is not None:
        if requested > fits:
            need = weights + workspace_bytes(target, block) + (requested + slack) * per_token
            raise DflashError(f"--max-context {requested} needs {need / GiB:.1f} GiB on the GPU "
                              f"(weights {weights / GiB:.1f} GiB, KV cache {(requested + slack) * per_token / GiB:.1f} GiB), "
                              f"{free_bytes / GiB:.1f} GiB is free: use --max-context {fits} or less")
        return requested
    if fits < 256:
        raise DflashError(f"not enough GPU memory: the weights need {weights / GiB:.1f} GiB and "
                          f"{free_bytes / GiB:.1f} GiB is free (close other GPU programs, or use a smaller model)")
    return min(ceiling, fits)


def free_device_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free
