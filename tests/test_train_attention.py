"""The training attention on the GPU branch (gpu-review-2 F7): a call a fused CUDA kernel takes (K/V
at the query heads, an additive mask in the query's dtype, shared by the layers), and the same loss
and gradients as the CPU branch."""
from __future__ import annotations

import contextlib
import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from dflash_cli import cuda
from dflash_cli.rope import rope_table
from dflash_cli.synthetic import configs
from dflash_cli.train import objective
from dflash_cli.train.model import DraftNet
from dflash_cli.train.objective import Batch, block_loss

from .fake_cuda import stand_in

Q, S, N = 2, 40, 6  # sequences, context tokens, anchors per sequence


def _net(layers: int = 2, sliding: bool = False, seed: int = 0) -> DraftNet:
    """A drafter with 8 query heads over 2 KV heads (the released drafters' 4:1), block 4."""
    c = dataclasses.replace(configs("tiny")[2], hidden_size=64, intermediate_size=96, num_layers=layers,
                            num_heads=8, num_kv_heads=2, head_dim=16, block_size=4,
                            sliding_windows=(5,) + (None,) * (layers - 1) if sliding else (None,) * layers,
                            causal=(True,) + (False,) * (layers - 1) if sliding else (False,) * layers)
    net = DraftNet(c)
    net.reset_parameters(seed=seed, std=0.2)  # large enough that every part of the forward matters
    return net


def _inputs(net: DraftNet) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of anchors over random features, the target's embedding and head, and the rope table."""
    c, g = net.cfg, torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (Q, S), generator=g)
    anchors = torch.stack([torch.randperm(S - 5, generator=g)[:N].sort().values + 1 for _ in range(Q)])
    labels = torch.randint(0, 500, (Q, N, c.block_size - 1), generator=g)
    valid = torch.ones(Q, N, c.block_size - 1, dtype=torch.bool)
    batch = Batch(ids, torch.randn(Q, S, 2 * c.hidden_size, generator=g), anchors, valid, labels)
    embed, head = torch.randn(512, c.hidden_size, generator=g), torch.randn(512, c.hidden_size, generator=g)
    return batch, embed, head, rope_table(c.head_dim, c.rope_theta, None, 64)


class SdpaCalls:
    """Records the trainer's calls into F.scaled_dot_product_attention (not the engine's), and makes them."""

    def __init__(self, monkeypatch):
        self.calls, self.real = [], F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, **kwargs):
        if sys._getframe(1).f_globals["__name__"] == objective.__name__:
            self.calls.append((q, k, v, kwargs))
        return self.real(q, k, v, **kwargs)


def test_the_gpu_branch_calls_sdpa_in_a_form_a_fused_cuda_kernel_takes(monkeypatch):
    """Flash refuses any mask and the memory-efficient kernel has no GQA: with enable_gqa and a bool
    mask, CUDA runs the math kernel, which materialises every score. The GPU branch expands K/V to
    the query heads and passes one additive mask in the query's dtype, its rows aligned (else SDPA
    pad-copies it per call), to every layer."""
    net = _net()
    batch, embed, head, cos_sin = _inputs(net)
    sdpa = SdpaCalls(monkeypatch)
    with stand_in(), cuda.autocast(batch.ids.device, torch.bfloat16):
        block_loss(net, embed, head, cos_sin, batch, gamma=3.0).loss.backward()
    assert len(sdpa.calls) == net.cfg.num_layers
    for q, k, v, kwargs in sdpa.calls:
        mask = kwargs["attn_mask"]
        assert k.shape[1] == v.shape[1] == q.shape[1] == 8 and not kwargs.get("enable_gqa", False)
        assert mask.dtype == q.dtype == k.dtype == v.dtype == torch.bfloat16
        assert mask.stride(-1) == 1 and all(st % 16 == 0 for st in mask.stride()[:-1])
        assert mask is sdpa.calls[0][3]["attn_mask"]  # built once per batch, shared by the layers

    sdpa.calls.clear()  # the CPU branch keeps the fused CPU kernel's call: GQA and the bool mask
    block_loss(net, embed, head, cos_sin, batch, gamma=3.0)
    for q, k, v, kwargs in sdpa.calls:
        assert k.shape[1] == 2 and kwargs["enable_gqa"] and kwargs["attn_mask"].dtype == torch.bool


@pytest.mark.parametrize("sliding", [False, True], ids=["full", "sliding-causal"])
def test_the_gpu_branch_trains_as_the_cpu_branch(sliding):
    net = _net(sliding=sliding)
    batch, embed, head, cos_sin = _inputs(net)
    results = []
    for gpu in (False, True):
        net.zero_grad()
        with stand_in() if gpu else contextlib.nullcontext():
            loss = block_loss(net, embed, head, cos_sin, batch, gamma=3.0).loss
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(net.named_parameters(), gpu_grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
