"""KV caches are sized from free memory before loading; a request that cannot fit is one line."""
from __future__ import annotations

import pytest
import torch

from dflash_cli.errors import DflashError
from dflash_cli.memory import GiB, kv_bytes_per_token, plan_context, weight_bytes
from dflash_cli.synthetic import SHAPES

Q8, Q8_DRAFT, _ = SHAPES["qwen3-8b"]


def test_qwen3_8b_sizes_are_what_the_design_notes_say():
    assert 15.0 * GiB < weight_bytes(Q8, None, torch.bfloat16) < 15.5 * GiB  # 8.2B params, untied head
    # 36 target layers + 5 draft layers, 8 KV heads of 128, K and V, bf16
    assert kv_bytes_per_token(Q8, Q8_DRAFT, torch.bfloat16) == 2 * (36 + 5) * 8 * 128 * 2


def test_context_fills_free_memory_up_to_the_model_limit():
    assert plan_context(Q8, Q8_DRAFT, torch.bfloat16, None, 139 * GiB) == Q8.max_position_embeddings
    on_24gb = plan_context(Q8, Q8_DRAFT, torch.bfloat16, None, 23 * GiB)
    assert 20_000 < on_24gb < Q8.max_position_embeddings


def test_a_request_that_cannot_fit_says_what_would():
    with pytest.raises(DflashError, match=r"--max-context 40000 needs .* GiB is free: use --max-context \d+ or less"):
        plan_context(Q8, Q8_DRAFT, torch.bfloat16, 40000, 20 * GiB)


def test_weights_that_do_not_fit_are_named():
    with pytest.raises(DflashError, match="not enough GPU memory: the weights need 17.2 GiB"):
        plan_context(Q8, Q8_DRAFT, torch.bfloat16, None, 12 * GiB)


def test_cpu_uses_the_request_or_a_default():
    assert plan_context(Q8, Q8_DRAFT, torch.float32, None, None) == 8192
    assert plan_context(Q8, Q8_DRAFT, torch.float32, 100, None) == 100
    with pytest.raises(DflashError, match="beyond the model's 40960 positions"):
        plan_context(Q8, Q8_DRAFT, torch.float32, 50000, None)
