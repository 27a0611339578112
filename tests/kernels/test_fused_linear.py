"""The fused linear kernels (issue 26): the invariant linear kernel with the SwiGLU epilogue and the RMSNorm
(+ residual) prologue. Each equals the unfused kernels it replaces (invariant_linear + swiglu: bit for bit;
rms_norm + invariant_linear: to the rounding of the normed row, kernels/fused_linear.py says why), matches
its torch reference, and rounds a row the same launched alone or in a block of 2..32 rows."""
from __future__ import annotations

import pytest
import torch

from dflash_cli import ops
from dflash_cli.kernels.fused_linear import (norm_linear, norm_linear_ref, norm_swiglu_linear, swiglu_linear,
                                             swiglu_linear_ref)
from dflash_cli.kernels.invariant_linear import invariant_linear, splits
from dflash_cli.kernels.rmsnorm import rms_norm
from dflash_cli.kernels.swiglu import swiglu

from .conftest import DEVICE, TOL
from .test_invariant_linear import MAX_M, first_variant_row, near_ties

DTYPES = [torch.float32, torch.bfloat16]
# (intermediate I, K): one slice (DIRECT), and a K reduced in slices (the merge kernel's epilogue)
SHAPES = [(67, 131), (40, 1031)]


def gate_up(i: int, k: int, dtype, bias: bool):
    w = (torch.randn(2 * i, k, device=DEVICE) / k**0.5).to(dtype)
    return w, (torch.randn(2 * i, device=DEVICE).to(dtype) if bias else None)


def test_the_shapes_cover_both_paths():
    assert splits(2 * 67, 131) == 1 and splits(2 * 40, 1031) > 1
    assert splits(3, 520) == splits(6, 520) == 2 and splits(10, 333) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("i,k", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_swiglu_epilogue_is_the_unfused_pair_bit_for_bit(seed, dtype, i, k, bias):
    x = torch.randn(5, k, device=DEVICE).to(dtype)
    w, b = gate_up(i, k, dtype, bias)
    got = swiglu_linear(x, w, b)
    assert got.shape == (5, i) and got.dtype == dtype
    assert torch.equal(got, swiglu(invariant_linear(x, w, b))), f"seed {seed}"
    torch.testing.assert_close(got, swiglu_linear_ref(x, w, b), **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("i,k", SHAPES, ids=str)
@pytest.mark.parametrize("swiglu_out", [False, True], ids=["linear", "swiglu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_norm_prologue_matches_the_unfused_path(seed, dtype, i, k, swiglu_out, with_residual):
    """Against rms_norm then the invariant linear (then swiglu): the new residual bit for bit (and the one
    passed in untouched), the output to the rounding of the normed row; and against the torch reference."""
    x = torch.randn(6, k, device=DEVICE).to(dtype)
    res = torch.randn(6, k, device=DEVICE).to(dtype) if with_residual else None
    before = None if res is None else res.clone()
    nw = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    w, b = gate_up(i, k, dtype, True)
    got, new_res = norm_linear(x, nw, 1e-6, w, b, res, swiglu=swiglu_out)
    if res is None:
        assert new_res is None
    else:
        assert torch.equal(res, before), "the residual passed in is not written (other programs still read it)"
    unfused_res = None if res is None else res.clone()
    h, unfused_res = rms_norm(x, nw, 1e-6, unfused_res)
    want = invariant_linear(h, w, b)
    want = swiglu(want) if swiglu_out else want
    if res is not None:
        assert torch.equal(new_res, unfused_res), f"seed {seed}"
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    ref, ref_res = norm_linear_ref(x, nw, 1e-6, w, b, res, swiglu=swiglu_out)
    torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    if res is not None:  # (Triton's interpreter rounds fp32 -> bf16 toward zero, torch to nearest: close, not equal)
        torch.testing.assert_close(new_res, ref_res, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_prologue_rounds_the_normed_row_as_the_unfused_path(seed, dtype):
    """With the row's statistic exact in either order (entries ±1 and ±2: the squares are small integers,
    summed exactly in any order), the fused output is the unfused one bit for bit: the normed row is rounded
    to x's dtype, scaled by the norm weight and rounded again exactly as kernels/rmsnorm.py does, then the
    same GEMM. (Checked: dropping the first rounding fails the bf16 case.)"""
    k, i = 1031, 40
    sign = torch.randint(0, 2, (4, k), device=DEVICE) * 2 - 1
    x = (sign * torch.randint(1, 3, (4, k), device=DEVICE)).to(dtype)
    nw = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    w, b = gate_up(i, k, dtype, True)
    got, _ = norm_swiglu_linear(x, nw, 1e-6, w, b)
    h, _ = rms_norm(x, nw, 1e-6)
    assert torch.equal(got, swiglu(invariant_linear(h, w, b))), f"seed {seed}"


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_gpt_oss_norm_prologue_rounds_once_as_the_unfused_path(seed, with_residual):
    """gpt-oss's norm (fp32 weight, applied to the fp32 normed row before the one rounding): with the row's
    statistic exact in either order, the fused q/k/v equals rms_norm(fp32_weight) then the invariant linear
    bit for bit, with its bias, and the new residual too. (The plain style's double rounding fails it.)"""
    k, n, dtype = 1031, 40, torch.bfloat16
    sign = torch.randint(0, 2, (4, k), device=DEVICE) * 2 - 1
    x = (sign * torch.randint(1, 3, (4, k), device=DEVICE)).to(dtype)
    res = torch.zeros(4, k, device=DEVICE, dtype=dtype) if with_residual else None
    nw = 1 + 0.1 * torch.randn(k, device=DEVICE)  # float32, as gpt-oss keeps its norms
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype)
    got, new_res = norm_linear(x, nw, 1e-5, w, b, res, fp32_weight=True)
    h, want_res = rms_norm(x, nw, 1e-5, None if res is None else res.clone(), fp32_weight=True)
    assert torch.equal(got, invariant_linear(h, w, b)), f"seed {seed}"
    if res is not None:
        assert torch.equal(new_res, want_res)
    ref, _ = norm_linear_ref(x, nw, 1e-5, w, b, res, fp32_weight=True)
    torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


def as_linear(fused):
    """A (x, w, b) launcher over a fused kernel, for first_variant_row (gate_up from w: [n, k] stacked twice
    over, perturbed so gate and up differ)."""
    def run(x, w, b):
        wu = torch.cat([w, w.flip(0)])
        bu = None if b is None else torch.cat([b, b.flip(0)])
        return fused(x, wu, bu)
    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias", [(3, 520, True), (5, 333, False),
                                      pytest.param(67, 1031, True, marks=pytest.mark.slow)],  # ~4 min in all
                         ids=["3x520 split-K bias", "5x333 one slice", "67x1031 split-K bias"])
@pytest.mark.parametrize("kind", ["swiglu", "norm", "norm+swiglu+residual"])
def test_a_row_is_bit_identical_alone_and_in_any_block(seed, dtype, n, k, bias, kind):
    x, w, b = near_ties(n, k, dtype, bias)
    nw = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    if kind == "swiglu":
        run = as_linear(swiglu_linear)
    elif kind == "norm":
        run = lambda x, w, b: norm_linear(x, nw, 1e-6, w, b)[0]  # noqa: E731
    else:
        def run(x, w, b):
            res = x.flip(-1) * 0.5  # a residual per row (row i's whatever the block)
            out, new_res = as_linear(lambda x, wu, bu: norm_swiglu_linear(x, nw, 1e-6, wu, bu, res))(x, w, b)
            return torch.cat([out, new_res], dim=-1)  # the residual written is invariant too
    assert first_variant_row(run, x, w, b) is None, f"seed {seed}"


def test_a_split_count_from_m_would_be_caught(seed):
    """The invariance test can fail: a split count that follows M rounds a row differently."""
    x, w, b = near_ties(67, 1031, torch.float32, True)
    wu = torch.cat([w, w])
    planted = lambda x, w, b: swiglu_linear(x, wu, None, n_splits=1 if x.shape[0] == 1 else 4)  # noqa: E731
    assert first_variant_row(planted, x, w, b) is not None


def test_leading_dims_and_empty_rows(seed):
    x, w = torch.randn(2, 3, 40, device=DEVICE), torch.randn(14, 40, device=DEVICE)
    assert swiglu_linear(x, w).shape == (2, 3, 7)
    torch.testing.assert_close(swiglu_linear(x, w), swiglu_linear_ref(x, w), **TOL[torch.float32])
    out, res = norm_swiglu_linear(x[:, :0], torch.ones(40, device=DEVICE), 1e-6, w, None, x[:, :0])
    assert out.shape == (2, 0, 7) and res.shape == (2, 0, 40)


# ---- the model's seam ---------------------------------------------------------------------------------------
def dense_mlp(h: int, i: int, dtype):
    from dflash_cli.models.layers.linear import Dense
    from dflash_cli.models.layers.mlp import SwiGLU
    from dflash_cli.models.layers.norm import RMSNorm

    mlp = SwiGLU(Dense((torch.randn(2 * i, h, device=DEVICE) / h**0.5).to(dtype)),
                 Dense((torch.randn(h, i, device=DEVICE) / i**0.5).to(dtype)))
    return mlp, RMSNorm((1 + 0.1 * torch.randn(h, device=DEVICE)).to(dtype), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_dense_mlp_takes_the_fused_kernels_under_invariant_linear(seed, dtype, monkeypatch):
    """DFLASH_LINEAR=invariant on the kernels: SwiGLU and the post-norm run inside the GEMM (ops.swiglu and
    ops.rms_norm are not called) and give the unfused path's output and residual; more rows than a step's
    (a prefill chunk) take the unfused path."""
    mlp, norm = dense_mlp(96, 40, dtype)
    x, res = torch.randn(4, 96, device=DEVICE).to(dtype), torch.randn(4, 96, device=DEVICE).to(dtype)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    want_res = res.clone()
    h, want_res = norm(x, want_res)
    want = mlp(h)  # DFLASH_LINEAR unset (cublas): the unfused ops
    calls = []
    for name in ("swiglu", "rms_norm"):
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _f=getattr(ops, name), **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    got, got_res = mlp.after_norm(norm, x, res.clone())
    assert calls == [] and torch.equal(got_res, want_res)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(mlp(h), mlp.down(swiglu(invariant_linear(h, mlp.gate_up.weight))))
    long = torch.randn(ops.MAX_INVARIANT_ROWS + 1, 96, device=DEVICE).to(dtype)
    mlp.after_norm(norm, long, long.clone())
    assert calls == ["rms_norm", "swiglu"]


def dense_attention(h: int, dtype, *, bias: bool):
    from dflash_cli.models.layers.attention import Attention
    from dflash_cli.models.layers.linear import Dense
    from dflash_cli.models.layers.norm import RMSNorm

    heads, kv_heads, hd = 4, 2, 16
    rows = (heads + 2 * kv_heads) * hd

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)

    attn = Attention(Dense(rand(rows, h, scale=h**-0.5), rand(rows, scale=0.1) if bias else None),
                     Dense(rand(h, heads * hd, scale=(heads * hd)**-0.5)), 1 + rand(hd, scale=0.1),
                     1 + rand(hd, scale=0.1), heads, kv_heads, hd, 1e-6, slot=0)
    return attn, RMSNorm(1 + rand(h, scale=0.1), 1e-6)


def attention_step(t: int, dtype):
    from dflash_cli.cache import KVCache
    from dflash_cli.models.base import StepPlan
    from dflash_cli.rope import rope_table

    cache = KVCache.allocate(1, 2, 16, 64, dtype, torch.device(DEVICE))
    g = torch.Generator(DEVICE).manual_seed(0)  # earlier keys the new rows attend to, the same each call
    cache.k.copy_(torch.randn(cache.k.shape, generator=g, device=DEVICE)), cache.v.copy_(torch.randn(cache.v.shape, generator=g, device=DEVICE))
    cache.prefilled(5)
    step = StepPlan(5 + torch.arange(t, device=DEVICE), ops.kv_length(cache.length, t),
                    rope_table(16, 10000.0, None, 64, DEVICE), False)
    return cache, step


def count_calls(monkeypatch, *names: str) -> list[str]:
    calls = []
    for name in names:
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _f=getattr(ops, name), **k: calls.append(_n) or _f(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["first layer", "residual"])
def test_the_dense_attention_takes_the_norm_prologue_under_invariant_linear(seed, dtype, with_residual, monkeypatch):
    """DFLASH_LINEAR=invariant on the kernels: the input norm (+ residual add) runs inside the q/k/v GEMM
    (ops.rms_norm is not called) and gives the unfused path's output, K/V rows and new residual (None for
    the first layer, which has no residual); `residual` itself is left as it was."""
    attn, norm = dense_attention(96, dtype, bias=True)
    x = torch.randn(4, 96, device=DEVICE).to(dtype)
    res = torch.randn(4, 96, device=DEVICE).to(dtype) if with_residual else None
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    want_cache, step = attention_step(4, dtype)
    h, want_res = norm(x, None if res is None else res.clone())
    want = attn(h, want_cache, step)  # DFLASH_LINEAR unset (cublas): the unfused ops
    calls = count_calls(monkeypatch, "rms_norm", "norm_linear")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    cache, _ = attention_step(4, dtype)
    before = None if res is None else res.clone()
    got, got_res = attn.after_norm(norm, x, res, cache, step)
    assert calls == ["norm_linear"]
    if res is None:
        assert got_res is None
    else:
        assert torch.equal(got_res, want_res) and got_res is not res and torch.equal(res, before)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(cache.k, want_cache.k, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(cache.v, want_cache.v, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


def test_the_attention_falls_back_to_the_unfused_norm_where_the_prologue_does_not_apply(seed, monkeypatch):
    """The unfused norm, then the attention, wherever the fused kernel does not apply: more rows than a
    step's (a prefill chunk), DFLASH_LINEAR=cublas, the torch references, the offset norm style, a q/k/v
    that is not one dense weight (a quantized or concatenated projection). Each gives what `norm` then the
    attention give."""
    from dataclasses import replace

    from dflash_cli.models.layers.linear import Concat, Dense

    attn, norm = dense_attention(96, torch.float32, bias=False)
    split = Concat([Dense(part) for part in attn.qkv.weight.split([64, 64])])
    cases = {"prefill chunk": (attn, norm, ops.MAX_INVARIANT_ROWS + 1, {}),
             "cublas": (attn, norm, 4, {"DFLASH_LINEAR": "cublas"}),
             "torch kernels": (attn, norm, 4, {"DFLASH_KERNELS": "torch"}),
             "offset norm": (attn, replace(norm, style="offset"), 4, {}),
             "not dense": (replace(attn, qkv=split), norm, 4, {})}
    for case, (a, n, t, env) in cases.items():
        monkeypatch.setenv("DFLASH_KERNELS", "triton")
        monkeypatch.setenv("DFLASH_LINEAR", "invariant")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        x, res = torch.randn(t, 96, device=DEVICE), torch.randn(t, 96, device=DEVICE)
        want_cache, step = attention_step(t, torch.float32)
        h, want_res = n(x, res.clone())
        want = a(h, want_cache, step)
        with monkeypatch.context() as m:
            calls = count_calls(m, "rms_norm", "norm_linear")
            cache, _ = attention_step(t, torch.float32)
            got, got_res = a.after_norm(n, x, res.clone(), cache, step)
        assert calls == ["rms_norm"], case
        assert torch.equal(got, want) and torch.equal(got_res, want_res) and torch.equal(cache.k, want_cache.k), case


def test_the_dense_decoder_runs_both_norms_as_prologues_under_invariant_linear(seed, monkeypatch):
    """The Decoder's layer loop hands each layer's input norm to its attention and its post-attention norm to
    its MLP: under DFLASH_LINEAR=invariant on the kernels, only the final norm runs as ops.rms_norm, and the
    logits and the feature taps (the residual stream after a layer) are the unfused forward's."""
    from pathlib import Path

    from dflash_cli.models import family_of
    from dflash_cli.models.weights import random_weights

    from ..tiny import target_config

    raw = target_config("qwen3", layers=3)
    family = family_of(raw, Path("tiny"))
    cfg = family.Config.from_raw(raw, Path("tiny"))
    model = family.build(cfg, random_weights(family.weight_table(cfg), seed=seed), 64)
    ids = torch.randint(0, 512, (6,))
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    runs = []
    for linear in ("cublas", "invariant"):
        monkeypatch.setenv("DFLASH_LINEAR", linear)
        with monkeypatch.context() as m:
            calls = count_calls(m, "rms_norm", "norm_linear", "norm_swiglu_linear")
            runs.append(model.forward(ids, model.new_cache(16), logits_from=0, feature_layers=(0, 1), commit=True))
        runs[-1] += (calls,)
    (want, want_f, unfused), (got, got_f, fused) = runs
    assert unfused == ["rms_norm"] * 7 and fused == ["norm_linear", "norm_swiglu_linear"] * 3 + ["rms_norm"]
    torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(got_f, want_f, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")
