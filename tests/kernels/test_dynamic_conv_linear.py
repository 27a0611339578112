"""DFlash2's dynamic conv fused into the drafter layer's projections (issue 26, kernels/fused_linear.py):
`norm_linear_rows` (the norm prologue of the conv's kernel projection, the normed rows stored),
`conv_linear` (the pre-conv as the loader of the projection after it, with or without SwiGLU) and
`linear_conv` (the post-conv in the merge of the output projection). The convs equal the unfused
kernels (dynamic_conv, then invariant_linear [+ swiglu], or the other way round) bit for bit in fp32 and
bf16, weights in one slice or in several, row tiles crossed.

Batch invariance here: a conv row reads the rows above it in the block by design, so a row cannot be its
launch alone. What holds instead: for every block length L = 1..16, the L rows of a launch are the unfused
path's bits, and the first rows of a longer block (row t depends on rows ≤ t only, through the same sums).
"""
from __future__ import annotations

import pytest
import torch

from dflash_cli.kernels import invariant_linear as il
from dflash_cli.kernels.dynamic_conv import dynamic_conv
from dflash_cli.kernels.fused_linear import (conv_linear, conv_linear_ref, linear_conv, linear_conv_ref, norm_linear,
                                             norm_linear_rows, norm_linear_rows_ref)
from dflash_cli.kernels.invariant_linear import invariant_linear, splits
from dflash_cli.kernels.rmsnorm import rms_norm
from dflash_cli.kernels.swiglu import swiglu

from .conftest import DEVICE, TOL

DTYPES = [torch.float32, torch.bfloat16]
# (K, N, taps, groups, rows): one slice; K reduced in slices (the merge by ticket); an N of several column tiles;
# 20 rows: two row tiles (a conv row reads the tile above)
PRE = [(64, 48, 3, 4, 20), (1031, 40, 4, 1, 5), (128, 136, 2, 8, 5)]
POST = [(64, 48, 3, 4, 5), (1031, 40, 4, 1, 20), (128, 136, 2, 8, 20)]


def conv_inputs(m: int, width: int, taps: int, groups: int, dtype):
    """base [taps, width] and one side of the [m, 2, taps, groups] kernels (a strided view, as the drafter has)."""
    base = torch.randn(2, taps, width, device=DEVICE).to(dtype)
    dynamic = torch.randn(m, 2, taps, groups, device=DEVICE).to(dtype)
    return base[1], dynamic[:, 1]


def test_the_shapes_cover_both_paths():
    assert splits(48, 64) == 1 and splits(40, 1031) > 1 and splits(136, 128) == 1 and -(-136 // il.BLOCK_N) > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,taps,groups,m", PRE, ids=str)
@pytest.mark.parametrize("swiglu_out", [False, True], ids=["linear", "swiglu"])
def test_the_pre_conv_in_the_loader_is_the_unfused_pair_bit_for_bit(seed, dtype, k, n, taps, groups, m, swiglu_out):
    z = torch.randn(m, k, device=DEVICE).to(dtype)
    base, dynamic = conv_inputs(m, k, taps, groups, dtype)
    w = (torch.randn(2 * n if swiglu_out else n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(w.shape[0], device=DEVICE).to(dtype)
    got = conv_linear(z, base, dynamic, w, b, swiglu=swiglu_out)
    want = invariant_linear(dynamic_conv(z, base, dynamic), w, b)
    want = swiglu(want) if swiglu_out else want
    assert got.shape == want.shape == (m, n) and got.dtype == dtype
    assert torch.equal(got, want), f"seed {seed}"
    torch.testing.assert_close(got, conv_linear_ref(z, base, dynamic, w, b, swiglu_out), **TOL[dtype],
                               msg=lambda msg: f"seed {seed}: {msg}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,taps,groups,m", POST, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_the_post_conv_in_the_merge_is_the_unfused_pair_bit_for_bit(seed, dtype, k, n, taps, groups, m, bias):
    """Row t's conv reads the merged rows t - 1, t - 2, ... back from the partials (of another row tile too,
    at 20 rows): the last program of the column merges them; the tickets are left zeroed."""
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    base, dynamic = conv_inputs(m, n, taps, groups, dtype)
    got = linear_conv(x, w, b, base, dynamic)
    assert got.shape == (m, n) and got.dtype == dtype
    assert torch.equal(got, dynamic_conv(invariant_linear(x, w, b), base, dynamic)), f"seed {seed}"
    torch.testing.assert_close(got, linear_conv_ref(x, w, b, base, dynamic), **TOL[dtype],
                               msg=lambda msg: f"seed {seed}: {msg}")
    assert not il.tickets(x.device, 1).any(), "every column's ticket is put back to 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(64, 48), (1031, 40)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_the_norm_prologue_stores_the_rows_it_projected(seed, dtype, k, n, with_residual):
    """norm_linear's output and residual bit for bit, and the rows stored are the ones it multiplied (the
    invariant GEMM of them is its output); against rms_norm to the rounding of the normed row (the fused
    norm's statistic is summed in another order: kernels/fused_linear.py)."""
    x = torch.randn(6, k, device=DEVICE).to(dtype)
    res = torch.randn(6, k, device=DEVICE).to(dtype) if with_residual else None
    nw = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    out, new_res, rows = norm_linear_rows(x, nw, 1e-6, w, None, res)
    want, want_res = norm_linear(x, nw, 1e-6, w, None, res)
    assert torch.equal(out, want) and (new_res is None if res is None else torch.equal(new_res, want_res))
    assert rows.shape == x.shape and rows.dtype == dtype
    assert torch.equal(invariant_linear(rows, w), out), f"seed {seed}"
    h, _ = rms_norm(x, nw, 1e-6, None if res is None else res.clone())
    torch.testing.assert_close(rows, h, **TOL[dtype])
    ref_out, _, ref_rows = norm_linear_rows_ref(x, nw, 1e-6, w, None, res)
    torch.testing.assert_close(rows, ref_rows, **TOL[dtype])
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_normed_rows_are_rms_norms_bits_where_the_statistic_is_exact(seed, dtype):
    """Entries ±1 and ±2: the squares are small integers, summed exactly in either order, so the stored rows are
    rms_norm's bit for bit (the rounding to x's dtype, the weight, the rounding again)."""
    k = 1031
    sign = torch.randint(0, 2, (4, k), device=DEVICE) * 2 - 1
    x = (sign * torch.randint(1, 3, (4, k), device=DEVICE)).to(dtype)
    nw = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    _, _, rows = norm_linear_rows(x, nw, 1e-6, torch.randn(40, k, device=DEVICE).to(dtype))
    assert torch.equal(rows, rms_norm(x, nw, 1e-6)[0]), f"seed {seed}"


@pytest.mark.parametrize("dtype,k,n", [(torch.bfloat16, 64, 48),  # ~15 s: the others in the slow tier
                                        pytest.param(torch.float32, 64, 48, marks=pytest.mark.slow),
                                        pytest.param(torch.bfloat16, 520, 3, marks=pytest.mark.slow),
                                        pytest.param(torch.float32, 520, 3, marks=pytest.mark.slow)],
                         ids=["bf16 one slice", "fp32 one slice", "bf16 split-K", "fp32 split-K"])
def test_every_block_length_is_the_unfused_paths_bits_and_a_prefix_of_the_longer_block(seed, dtype, k, n):
    """Launched over the first L rows, L = 1..16, each fused conv gives the unfused path's 16-row output's first L
    rows (which the unfused path gives at L too: checked at two lengths)."""
    assert splits(n, k) == (1 if k == 64 else 2)
    z = torch.randn(16, k, device=DEVICE).to(dtype)
    base_in, dyn_in = conv_inputs(16, k, 4, 4, dtype)
    base_out, dyn_out = conv_inputs(16, n, 4, 1, dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype)
    unfused_in = lambda L: invariant_linear(dynamic_conv(z[:L], base_in, dyn_in[:L]), w, b)  # noqa: E731
    unfused_out = lambda L: dynamic_conv(invariant_linear(z[:L], w, b), base_out, dyn_out[:L])  # noqa: E731
    want_in, want_out = unfused_in(16), unfused_out(16)
    for length in (1, 7):
        assert torch.equal(unfused_in(length), want_in[:length]) and torch.equal(unfused_out(length), want_out[:length])
    for length in range(1, 17):
        assert torch.equal(conv_linear(z[:length], base_in, dyn_in[:length], w, b), want_in[:length]), length
        assert torch.equal(linear_conv(z[:length], w, b, base_out, dyn_out[:length]), want_out[:length]), length


@pytest.mark.parametrize("fused", ["pre", "post"])
def test_a_rounding_order_other_than_the_references_is_caught(seed, fused):
    """The bit-for-bit checks can fail: the same conv with the dynamic term added before the base term
    (one tap's two sums swapped) differs from the kernel in bf16."""
    m, k, n, taps, dtype = 8, 64, 48, 3, torch.bfloat16
    z = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    width = k if fused == "pre" else n
    base, dynamic = conv_inputs(m, width, taps, 4, dtype)

    def conv_swapped(v):
        out = torch.zeros_like(v)
        for o in range(taps):
            shifted = torch.cat([torch.zeros(o, width, dtype=dtype, device=DEVICE), v[: m - o]])
            out = out + dynamic[:, o].repeat_interleave(width // 4, dim=1) * shifted
            out = out + base[o] * shifted
        return out

    if fused == "pre":
        got, wrong = conv_linear(z, base, dynamic, w), invariant_linear(conv_swapped(z), w)
    else:
        got, wrong = linear_conv(z, w, None, base, dynamic), conv_swapped(invariant_linear(z, w))
    assert not torch.equal(got, wrong), f"seed {seed}"


def test_empty_rows_and_shapes(seed):
    z, w = torch.randn(0, 32, device=DEVICE), torch.randn(16, 32, device=DEVICE)
    base, dynamic = conv_inputs(0, 32, 2, 4, torch.float32)
    assert conv_linear(z, base, dynamic, w).shape == (0, 16)
    base, dynamic = conv_inputs(0, 16, 2, 4, torch.float32)
    assert linear_conv(z, w, None, base, dynamic).shape == (0, 16)


# ---- the drafter layer's seam ---------------------------------------------------------------------------------
def dflash2_drafter(tmp_path, dtype, seed: int, bias: bool = False):
    """A tiny DFlash2 drafter (1 layer, hidden 64, 3 taps, groups of 16) from random weights, with the
    context K/V of 5 tokens cached: (drafter, cache)."""
    from dflash_cli.config import DrafterConfig
    from dflash_cli.drafter import Drafter, weight_table
    from dflash_cli.models.weights import random_weights

    from ..tiny import dflash2_config

    target = {"hidden_size": 64, "vocab_size": 256, "max_position_embeddings": 256, "num_hidden_layers": 4}
    raw = dflash2_config(target, layers=1, target_layer_ids=(1, 2), group_size=16, top_k=4)
    raw["dflash_config"]["conv_kernel_size"] = 3
    raw["attention_bias"] = bias
    cfg = DrafterConfig.from_raw(raw, tmp_path)
    w = {k: v.to(dtype) for k, v in random_weights(weight_table(cfg), seed=seed).items()}
    g = torch.Generator().manual_seed(seed)
    embed, head = torch.randn(256, 64, generator=g).to(dtype), torch.randn(256, 64, generator=g).to(dtype)
    drafter = Drafter.from_weights(cfg, w, embed, head, max_positions=64)
    cache = drafter.new_cache(64)
    drafter.add_context(torch.randn(5, 2 * 64, generator=g).to(dtype), cache)
    return drafter, cache


@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, False),  # ~20 s: the others in the slow tier
                                        pytest.param(torch.float32, False, marks=pytest.mark.slow),
                                        pytest.param(torch.float32, True, marks=pytest.mark.slow),
                                        pytest.param(torch.bfloat16, True, marks=pytest.mark.slow)],
                         ids=["bf16", "fp32", "fp32 attention bias", "bf16 attention bias"])
def test_the_drafter_layer_on_the_fused_kernels_is_the_unfused_layer_bit_for_bit(tmp_path, seed, dtype, bias,
                                                                                 monkeypatch):
    """DFLASH_LINEAR=invariant on the kernels: a DFlash2 layer's norms, kernel projections, convs and projections
    run as three launches per sublayer (no rms_norm, dense_linear or dynamic_conv call of their own), and the
    block's final hidden rows are the unfused layer's bit for bit once both paths normalise a row with the same
    statistic (the fused norm's: kernels/fused_linear.py); with rms_norm's own, to its rounding."""
    from dflash_cli import ops

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    drafter, cache = dflash2_drafter(tmp_path, dtype, seed, bias)
    bonus = torch.tensor([7])
    assert ops.fused_linear_applies(torch.zeros(8, 64, dtype=dtype))
    calls = []
    for name in ("rms_norm", "dense_linear", "dynamic_conv", "norm_linear_rows", "conv_linear", "linear_conv"):
        monkeypatch.setattr(ops, name, lambda *a, name=name, f=getattr(ops, name), **k: calls.append(name) or f(*a, **k))
    fused = drafter.block_hidden(bonus, cache, 8)
    assert {n: calls.count(n) for n in set(calls)} == {"norm_linear_rows": 2, "conv_linear": 2, "linear_conv": 2,
                                                      "rms_norm": 1}, calls  # the final norm
    real_applies = ops.fused_linear_applies
    monkeypatch.setattr(ops, "fused_linear_applies", lambda x: False)
    unfused = drafter.block_hidden(bonus, cache, 8)
    torch.testing.assert_close(fused, unfused, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")

    def fused_statistic(x, weight, eps, residual=None, offset=False, fp32_weight=False):
        assert not offset and not fp32_weight
        _, residual, rows = norm_linear_rows(x, weight, eps, torch.zeros(1, x.shape[-1], dtype=x.dtype), None,
                                             residual)
        return rows, residual

    monkeypatch.setattr(ops, "rms_norm", fused_statistic)
    calls.clear()
    unfused = drafter.block_hidden(bonus, cache, 8)
    assert calls.count("dynamic_conv") == 4 and "conv_linear" not in calls
    monkeypatch.setattr(ops, "fused_linear_applies", real_applies)
    fused = drafter.block_hidden(bonus, cache, 8)
    assert torch.equal(fused, unfused), f"seed {seed}"


def test_an_identity_conv_on_the_fused_kernels_is_the_v1_layer_bit_for_bit(tmp_path, seed, monkeypatch):
    """Base kernels = identity and zero projections: the DFlash2 layer's three fused launches per sublayer give the
    v1 layer's fused launches' bits (norm + q/k/v, norm + gate_up + SwiGLU, plain o and down) in bf16: the normed
    rows, the conv of them and the merged output pass through unchanged. A base off identity changes them."""
    import dataclasses

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    drafter, cache = dflash2_drafter(tmp_path, torch.bfloat16, seed)
    for layer in drafter.layers:
        for conv in (layer.attention_conv, layer.mlp_conv):
            conv.base.zero_()
            conv.base[:, 0] = 1
            conv.projection.zero_()
    layers = drafter.layers
    bonus = torch.tensor([7])
    d2 = drafter.block_hidden(bonus, cache, 8)
    drafter.layers = [dataclasses.replace(layer, attention_conv=None, mlp_conv=None) for layer in layers]  # v1's path
    plain = drafter.block_hidden(bonus, cache, 8)
    assert torch.equal(d2, plain), f"seed {seed}"
    drafter.layers = layers
    layers[0].mlp_conv.base[1] = 0.01
    assert not torch.equal(drafter.block_hidden(bonus, cache, 8), plain)
