"""The training attention on the GPU branch (gpu-review-2 F7): a call a fused CUDA kernel takes (K/V
at the query heads, an additive mask in the query's dtype, shared by the layers), the same loss and
gradients as the CPU branch, a memory plan that counts what autograd really keeps, and `dflash
train` end to end on the stand-in GPU."""
from __future__ import annotations

import contextlib
import dataclasses
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from dflash_cli import cuda
from dflash_cli.cli import main
from dflash_cli.rope import rope_table
from dflash_cli.synthetic import configs
from dflash_cli.train import command, objective
from dflash_cli.train.loop import Schedule, TrainOptions, activation_parts, memory_plan
from dflash_cli.train.model import DraftNet
from dflash_cli.train.objective import Batch, block_hidden, block_loss

from .fake_cuda import stand_in
from .tiny import target_config, write_target

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


def _kept(net: DraftNet, gpu: bool) -> tuple[int, int]:
    """(bytes, masks) autograd keeps for the backward of block_hidden, as the trainer runs it on
    that branch: every saved tensor's storage, once, the drafter's own parameters left out."""
    batch, embed, _, cos_sin = _inputs(net)
    with stand_in() if gpu else contextlib.nullcontext():
        with cuda.autocast(batch.ids.device, torch.bfloat16):
            out = block_hidden(net, embed, cos_sin, batch)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages, masks, todo, seen = {}, set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
        for name in dir(node):
            if name.startswith("_saved_") and isinstance(t := getattr(node, name), torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    storages[ptr] = t.untyped_storage().nbytes()
                    if name == "_saved_attn_mask":
                        masks.add(ptr)
    return sum(storages.values()), len(masks)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_the_memory_plan_counts_what_autograd_keeps_per_layer(gpu):
    """Per draft layer (two layers less one: the first layer's input needs no gradient), the plan
    and what autograd holds agree: on the GPU branch expanded K/V, bf16 copies of each projection's
    input beside an fp32 residual stream; on the CPU branch SDPA's fp32 copy of the mask per layer."""
    (one, masks_one), (two, masks_two) = (_kept(_net(layers), gpu) for layers in (1, 2))
    opts = TrainOptions(Schedule(steps=1), batch=Q, anchors=N)

    def planned(layers: int) -> int:
        return memory_plan(_net(layers), 512, S, opts, 2 if gpu else 4, gpu)["activations"]

    assert planned(2) - planned(1) == pytest.approx(two - one, rel=0.03)
    assert masks_two == (1 if gpu else 2)  # shared by the layers on the GPU, SDPA's own per layer on a CPU


def test_the_memory_plan_counts_the_gpu_branchs_keys_values_and_mask():
    net = _net(layers=3, sliding=True)  # two kinds of layer: two masks
    rows, keys = Q * N * 4, S + N * 4  # 48 queries; 64 keys per sequence
    for ckpt in (False, True):
        opts = TrainOptions(Schedule(steps=1), batch=Q, anchors=N, grad_checkpoint=ckpt)
        live = 1 if ckpt else 3
        gpu, cpu = (activation_parts(net, 512, S, opts, 2, True), activation_parts(net, 512, S, opts, 4, False))
        assert gpu["keys and values"] == live * (Q * S + rows) * 2 * (8 * 16) * 2  # at the 8 query heads, bf16
        assert cpu["keys and values"] == live * (Q * S + rows) * 2 * (2 * 16) * 4  # at the 2 KV heads, fp32
        assert gpu["masks"] == 2 * rows * keys * 2  # bf16, once per kind whatever the layers (64: aligned)
        assert cpu["masks"] == 2 * rows * keys + live * rows * keys * 4  # bool per kind, fp32 per layer
        assert "scores" not in gpu and "scores" not in cpu
    odd = DraftNet(dataclasses.replace(net.cfg, head_dim=12))  # 24 bytes a head: no fused CUDA kernel
    opts = TrainOptions(Schedule(steps=1), batch=Q, anchors=N)
    assert activation_parts(odd, 512, S, opts, 2, True)["scores"] == 3 * 8 * rows * keys * 2
    assert activation_parts(net, 512, S + 1, opts, 2, True)["masks"] == 2 * rows * 80 * 2  # 65 keys, padded


def test_train_on_the_stand_in_gpu_writes_a_bf16_drafter_under_the_gpu_memory_plan(capsys, monkeypatch, tmp_path):
    target = write_target(tmp_path / "target", target_config("llama", layers=4, tie=False), seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe little dog ran\nTom and Sue went to the park\nThe sun was hot\n")
    plans = []

    def plan(*args):
        plans.append((args, memory_plan(*args)))
        return plans[-1][1]

    monkeypatch.setattr(command, "memory_plan", plan)
    sdpa = SdpaCalls(monkeypatch)
    out = tmp_path / "drafter"
    with stand_in():
        assert main(["train", "--target", str(target), "--prompts", str(prompts), "--out", str(out),
                     "--block-size", "4", "--draft-layers", "2", "--max-answer-tokens", "24", "--anchors", "8",
                     "--batch", "3", "--eval-tokens", "8", "--device", "cuda", "--lr", "3e-3", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    (net, vocab, longest, opts, dtype_bytes, gpu), used = plans[-1]
    assert gpu and dtype_bytes == 2
    shown = re.search(r"memory plan: drafter ([\d.]+) MiB \+ AdamW ([\d.]+) MiB \+ activations ≈ ([\d,]+) MiB", err)
    assert shown and float(shown[3].replace(",", "")) == round(used["activations"] / 2**20)
    assert sdpa.calls and all(k.shape[1] == q.shape[1] for q, k, _, _ in sdpa.calls)  # the GPU branch trained
