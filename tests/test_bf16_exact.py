"""Exact in bfloat16 (issue 24): on the kernel path with the batch-invariant linear layers
(DFLASH_KERNELS=triton, DFLASH_LINEAR=invariant), a verify row rounds exactly as the decode step of the
same token, so speculative output equals plain decoding token for token in bf16, not only in fp32.

For every family of tests/families.py, in bf16, through the kernels (Triton's interpreter on a CPU):
1. the logits of a verify block's rows equal, bit for bit (torch.equal), the logits of the decode steps
   that take the same tokens one at a time;
2. greedy speculative output at b = 1, 2, 4, B and with the block size switched every iteration equals
   plain decoding token for token.
And the tests have teeth: a linear layer whose accumulation order follows the row count M (as cuBLAS's
kernel and split-K choices do) makes the logits of check 1 differ.

Interpreted kernels are slow (seconds per step on 2 cores): tiny models, few tokens. The fast tier keeps
the dense family's logits check, the counter-test and the seam check; whole generations (about 5 minutes
for the dense pair) and the other families are marked slow.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dflash_cli import loader, ops
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS
from .kernels.conftest import DEVICE
from .test_adaptive import Scripted
from .tiny import qwen3_moe_config, qwen35_config, qwen35_moe_config, write_qwen35, write_target
from .tiny_gpt_oss import gpt_oss_config, write_gpt_oss

# family: (the pair fixture, the block B of the verify check and of the largest speculative runs, new tokens)
# The hybrid and dense families run the interpreter's small pairs (tests/conftest.py), the others their own.
CASES = {
    "dense": ("qwen3_kernel_pair", 4, 8),
    "hybrid": ("qwen35_kernel_pair", 4, 8),
    "moe": ("qwen3_moe_pair", 8, 8),
    "hybrid-moe": ("qwen35_moe_pair", 8, 8),
    "gpt-oss": ("gpt_oss_pair", 8, 8),
    "dflash2": ("dflash2_pair", 8, 8),
}
FAST = {"dense"}
PROMPT = HYBRID_PROMPTS[1][:13]  # ids below 500: inside every tiny vocabulary


def cases(fast=FAST):
    return [pytest.param(name, id=name, marks=[] if name in fast else [pytest.mark.slow]) for name in CASES]


@pytest.fixture
def exact_path(monkeypatch):
    """The path issue 24 makes exact: the kernels, and the invariant linear layers for a step's rows."""
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")


# The targets of those pairs, written without their drafters (the logits check needs none, and fitting one
# costs minutes): the same writers, configs and seeds as tests/conftest.py's pair fixtures.
TARGETS = {
    "moe": lambda d: write_target(d, qwen3_moe_config(), seed=13),
    "hybrid-moe": lambda d: write_qwen35(d, qwen35_moe_config(), seed=17, slow_decay=True, layout="fused"),
    "gpt-oss": lambda d: write_gpt_oss(d, gpt_oss_config(), seed=19),
    "dflash2": lambda d: write_qwen35(d, qwen35_config(), seed=11, slow_decay=True),  # qwen35_pair's target
}


def _load(request, name: str, drafter: bool = True):
    pair, block, tokens = CASES[name]
    if not drafter and name in TARGETS:
        target = TARGETS[name](request.getfixturevalue("tmp_path") / name)
        return loader.load(target, None, device=DEVICE, dtype="bfloat16"), block, tokens
    target, drafter_dir = request.getfixturevalue(pair)
    return loader.load(target, drafter_dir if drafter else None, device=DEVICE, dtype="bfloat16"), block, tokens


def verify_and_steps(target, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits of `block` tokens verified at once, those of the same tokens decoded one per step),
    both from the committed prefix PROMPT."""
    ids = torch.tensor(PROMPT[:5] + PROMPT[5:5 + block], device=DEVICE)
    prefix, tokens = ids[:5], ids[5:5 + block]
    cache = target.new_cache(64, block)
    target.forward(prefix, cache, logits_from=0, commit=True)
    verified, _ = target.forward(tokens, cache, logits_from=0)
    cache = target.new_cache(64, block)
    target.forward(prefix, cache, logits_from=0, commit=True)
    steps = [target.forward(tokens[i:i + 1], cache, logits_from=0, commit=True)[0] for i in range(block)]
    return verified, torch.cat(steps)


@pytest.mark.parametrize("name", cases())
def test_bf16_verify_rows_are_the_decode_steps_bit_for_bit(name, request, exact_path):
    model, block, _ = _load(request, name, drafter=False)
    assert model.target.embed.dtype == torch.bfloat16
    verified, steps = verify_and_steps(model.target, block)
    assert verified.dtype == torch.bfloat16 and verified.shape == steps.shape == (block, model.target.cfg.vocab_size)
    differ = (verified != steps).any(-1).nonzero().flatten().tolist()
    assert torch.equal(verified, steps), f"{name}: verify rows {differ} differ from their decode steps"


def _answer(engine: Engine, n: int) -> list[int]:
    return [t for s in engine.generate(Request(PROMPT, n, sampling=SamplingParams())) for t in s.tokens]


@pytest.mark.parametrize("name", cases(fast=set()))  # whole generations: minutes each in the interpreter
def test_bf16_speculative_output_is_plain_decoding_at_every_block_size(name, request, exact_path):
    model, block, n = _load(request, name)
    plain = _answer(Engine(model.target), n)
    assert len(plain) == n
    for b in sorted({1, 2, 4, block}):
        assert _answer(Engine(model.target, model.drafter, block_size=b), n) == plain, f"{name}: block size {b}"
    switching = Engine(model.target, model.drafter, block_size=block)
    switching.policy = Scripted([block, 1, 2, block, 1, 4])
    assert _answer(switching, n) == plain, f"{name}: the block size switched every iteration"


# ---- the tests have teeth ----------------------------------------------------------------------------------
def m_dependent_linear(kernel):
    """A linear layer as cuBLAS behaves: alone (M = 1) it is the invariant kernel; a block of rows has its K
    cut in two slices merged high half first (a split-K chosen by M), rounded once as the kernel rounds."""
    def linear(x, w, b=None):
        if x.numel() == x.shape[-1]:
            return kernel(x, w, b)
        half = w.shape[1] // 2
        hi = kernel(x[..., half:].float(), w[:, half:].float())
        out = hi + kernel(x[..., :half].float(), w[:, :half].float())
        return (out if b is None else out + b.float()).to(x.dtype)
    return linear


def test_an_m_dependent_linear_kernel_fails_the_logits_check(request, exact_path, monkeypatch):
    model, block, _ = _load(request, "dense", drafter=False)  # exact with the invariant kernel (the test above)
    monkeypatch.setattr(ops, "invariant_linear", m_dependent_linear(ops.invariant_linear))
    verified, steps = verify_and_steps(model.target, block)
    assert not torch.equal(verified, steps), "a split-K that follows M went unnoticed"


# ---- the drafters' projections take the seam -------------------------------------------------------------
@pytest.mark.parametrize("name", ["dense", pytest.param("dflash2", marks=pytest.mark.slow)])
def test_every_projection_of_a_step_goes_through_the_linear_seam(name, request, monkeypatch):
    """The target's, the drafter's (its context K/V included) and DFlash2's (convs and selector): no raw
    F.linear on the step path, so DFLASH_LINEAR=invariant covers them all. On the torch path (the seam is
    the same on both; the interpreter would only make it slow)."""
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    model, block, _ = _load(request, name)
    seam = ops.dense_linear
    inside = []

    def through_seam(x, w, b=None):
        inside.append(w)
        return seam(x, w, b)

    raw = F.linear

    def no_raw_linear(x, w, b=None):
        assert inside and inside[-1] is w, "F.linear called outside ops.dense_linear"
        return raw(x, w, b)

    monkeypatch.setattr(ops, "dense_linear", through_seam)
    monkeypatch.setattr(F, "linear", no_raw_linear)
    _answer(Engine(model.target, model.drafter, block_size=block), 3)
    seen = {id(w) for w in inside}
    d = model.drafter
    wanted = {"fc": d.fc, "lm_head": d.lm_head, "context k/v": d.w_kv}
    for i, layer in enumerate(d.layers):
        wanted |= {f"{i}.{n}": getattr(layer, n) for n in ("qkv", "o_proj", "gate_up", "down")}
        if d.selector is not None:
            wanted |= {f"{i}.attention_conv": layer.attention_conv.projection, f"{i}.mlp_conv": layer.mlp_conv.projection}
    if d.selector is not None:
        wanted["selector"] = d.selector.hidden_projection
    missed = [n for n, w in wanted.items() if id(w) not in seen]
    assert not missed, f"{name}: projections not through the seam: {missed}"
