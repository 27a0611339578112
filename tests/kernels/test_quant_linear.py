"""The batch-invariant int4 (W4A16), int8 (W8A16) and FP8 (e4m3) linear kernels: each matches its torch reference (the
layout's dequantizer, then an fp32 product), and a row's output is bit-identical whether the row is
launched alone or inside a block of 2..32 rows (a decode step against a verify block), for fp32 and bf16
activations, each int4 group size, symmetric and asymmetric, each int8 scale dtype, and each FP8 scale
layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dflash_cli.kernels.quant_linear import (fp8_linear, fp8_linear_ref, int4_linear, int4_linear_ref, int8_linear,
                                             int8_linear_ref)
from dflash_cli.quant import Fp8Linear, Int4Linear, Int8Linear

from .conftest import DEVICE, TOL

MAX_M = 32
GROUPS = (32, 64, 128)
FP8_KINDS = ("block 128", "per tensor", "per channel")
DTYPES = [torch.float32, torch.bfloat16]


def int4_layer(n: int, k: int, group: int, sym: bool, scale_dtype=torch.bfloat16, bias: bool = False,
               g_idx: torch.Tensor | None = None) -> Int4Linear:
    """Random codes, positive per-group scales (and zero points unless `sym`), packed by the layout's own
    constructor; `g_idx` makes it act-order."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group) * 0.04 + 0.005).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 16, (n, k // group), dtype=torch.uint8)
    b = torch.randn(n).to(scale_dtype) if bias else None
    layer = Int4Linear.from_codes(codes, scales, zeros, group, g_idx=g_idx, bias=b)
    assert (layer.zeros is None) == sym
    return on_device(layer)


def on_device(layer):
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            setattr(layer, name, value.to(DEVICE))
    return layer


def fp8_layer(n: int, k: int, kind: str, bias: bool = False) -> Fp8Linear:
    block = {"block 128": (128, 128), "per tensor": (n, k), "per channel": (1, k)}[kind]
    weight = (torch.randn(n, k) * 2).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // block[0]), -(-k // block[1])) * 0.02 + 0.002
    return on_device(Fp8Linear(weight, scale, block, torch.randn(n) if bias else None))


def int8_layer(n: int, k: int, scale_dtype=torch.bfloat16, bias: bool = False) -> Int8Linear:
    """Random codes over the whole int8 range, positive per-channel scales (what `--quantize int8` writes:
    absmax / 127 in the checkpoint's dtype, for weights of a trained model's size: |W| up to about 0.06)."""
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, 1) * 4e-4 + 1e-4).to(scale_dtype)
    return on_device(Int8Linear(weight, scale, torch.randn(n).to(scale_dtype) if bias else None))


def kernel(layer, n_splits: int | None = None):
    """The layer's Triton kernel as a function of x (n_splits: a planted split count)."""
    if isinstance(layer, Int4Linear):
        return lambda x: int4_linear(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.bias,
                                     layer.input_perm, n_splits=n_splits)
    if isinstance(layer, Int8Linear):
        return lambda x: int8_linear(x, layer.weight, layer.scale, layer.bias, n_splits=n_splits)
    return lambda x: fp8_linear(x, layer.weight, layer.scale, layer.block, layer.bias, n_splits=n_splits)


def reference(layer):
    if isinstance(layer, Int4Linear):
        return lambda x: int4_linear_ref(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.bias,
                                         layer.input_perm)
    if isinstance(layer, Int8Linear):
        return lambda x: int8_linear_ref(x, layer.weight, layer.scale, layer.bias)
    return lambda x: fp8_linear_ref(x, layer.weight, layer.scale, layer.block, layer.bias)


SPARSE_M, SPARSE_ROWS = (2, 3, 16, 17, 32), (0, 1, 2, 15, 16, 31)  # one tile, its edge, two tiles


def first_variant_row(linear, x: torch.Tensor, ms=range(1, MAX_M + 1), rows=range(MAX_M)):
    """(M, i) of the first row i (of `rows`) of a launch over x[:M] (M in `ms`, default 1..32) that differs
    in any bit from row i launched alone; None when every such row is identical. The sparse sweep
    (SPARSE_M, SPARSE_ROWS) keeps the interpreter's launches few: one row tile, its last row, two tiles."""
    alone = {i: linear(x[i:i + 1])[0] for i in rows}
    for m in ms:
        block = linear(x[:m])
        for i in rows:
            if i < m and not torch.equal(block[i], alone[i]):
                return m, i
    return None


# ---- against the references ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("m,n,k", [(5, 67, 512), (32, 9, 128)], ids=["split-K", "one slice"])
def test_int4_matches_reference(seed, dtype, group, sym, m, n, k):
    """fp32 tight, bf16 within its rounding; odd N exercises the masked tile edge, K = 512 a split-K
    reduction (two slices), K = 128 the one-slice path."""
    layer = int4_layer(n, k, group, sym)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    got, want = kernel(layer)(x), reference(layer)(x)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda msg: f"seed {seed}: {msg}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=str)
def test_int4_act_order_bias_and_scale_dtypes(seed, dtype, scale_dtype):
    """An act-order layer (columns sorted at load, x gathered by the launcher), a bias, fp16 and fp32
    scales: the kernel equals the reference, which equals the layout's plain F.linear forward in fp32."""
    k, group = 256, 32
    g_idx = torch.randperm(k) % (k // group)  # every group 32 scattered columns
    layer = int4_layer(40, k, group, sym=False, scale_dtype=scale_dtype, bias=True, g_idx=g_idx)
    assert layer.input_perm is not None
    x = torch.randn(7, k, dtype=dtype, device=DEVICE)
    want = reference(layer)(x)
    torch.testing.assert_close(kernel(layer)(x), want, **TOL[dtype], msg=lambda msg: f"seed {seed}: {msg}")
    if dtype == torch.float32:
        torch.testing.assert_close(want, layer.forward(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", FP8_KINDS)
@pytest.mark.parametrize("m,n,k", [(5, 200, 300), (3, 130, 1000)], ids=["partial blocks", "split-K"])
def test_fp8_matches_reference(seed, dtype, kind, m, n, k):
    """200 = 128 + 72 rows and 300 = 2·128 + 44 columns: partial edge blocks both ways and a masked K tail;
    K = 1000 a three-slice reduction. Biased, as gpt-oss's projections are."""
    layer = fp8_layer(n, k, kind, bias=True)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    got, want = kernel(layer)(x), reference(layer)(x)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda msg: f"seed {seed}: {msg}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m,n,k", [(5, 67, 512), (32, 9, 100)], ids=["split-K", "one slice, K tail"])
def test_int8_matches_reference(seed, dtype, scale_dtype, m, n, k):
    """Odd N (a masked tile edge), K = 512 a two-slice reduction, K = 100 one slice with a masked K tail
    (int8 has no group or block to align to); biased; scales in each dtype a checkpoint stores. fp32 tight,
    bf16 within its rounding; the reference equals the layout's F.linear forward in fp32."""
    layer = int8_layer(n, k, scale_dtype, bias=True)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    got, want = kernel(layer)(x), reference(layer)(x)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda msg: f"seed {seed}: {msg}")
    if dtype == torch.float32:
        torch.testing.assert_close(want, layer.forward(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_weights_dequantize_in_registers_exactly(dtype, scale_dtype):
    """One-hot rows read the dequantized weight back: equal bit for bit to Int8Linear.dequantize(x's
    dtype), q·s in fp32 rounded once to the scale's dtype and then to x's. Codes -128 and 127 included."""
    layer = int8_layer(24, 64, scale_dtype)
    layer.weight[0, :2] = torch.tensor([-128, 127], dtype=torch.int8, device=DEVICE)
    got = kernel(layer)(torch.eye(64, dtype=dtype, device=DEVICE)[:MAX_M]).T
    assert torch.equal(got, layer.dequantize(dtype)[:, :MAX_M])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_e4m3_code_decodes_exactly(dtype):
    """All 256 bit patterns (zeros, subnormals, normals, ±448, NaN) through the kernel's integer decoding
    equal torch's conversion: row j of the weight holds code j, read back against one-hot rows."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(256, 1).repeat(1, 64)
    layer = on_device(Fp8Linear(codes, torch.ones(1, 1), (256, 64)))
    got = kernel(layer)(torch.eye(64, dtype=dtype, device=DEVICE)[:MAX_M]).T  # [256 codes, 32]
    want = codes.to(DEVICE)[:, :MAX_M].to(dtype)
    assert torch.equal(got.isnan(), want.isnan()) and int(want.isnan().sum()) == 2 * MAX_M
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int4_weights_dequantize_in_registers_exactly(dtype, scale_dtype):
    """One-hot rows read the dequantized weight back: equal bit for bit to Int4Linear.dequantize(x's
    dtype), rounding (q − z)·s once to the scales' dtype and then to x's, as the reference does."""
    layer = int4_layer(24, 64, 32, sym=False, scale_dtype=scale_dtype)
    got = kernel(layer)(torch.eye(64, dtype=dtype, device=DEVICE)[:MAX_M]).T
    assert torch.equal(got, layer.dequantize(dtype)[:, :MAX_M])


# ---- batch invariance ----

NT_N, NT_K, NT_H = 20, 640, 256  # columns [0, 256) mirrored by [256, 512) with the sign flipped; [512, 640) small


def near_ties_int4(group: int, sym: bool) -> Int4Linear:
    """Outputs that are small remainders of large sums (x's second quarter repeats its first, the weight's
    codes mirror around z = 8 with the same scales, the last 128 columns have small scales): like a near
    tie of two logits, the rounded output shows the order of the fp32 sum, in bf16 as well as fp32."""
    n, k, h = NT_N, NT_K, NT_H
    codes = torch.randint(1, 16, (n, k), dtype=torch.uint8)
    codes[:, h:2 * h] = 16 - codes[:, :h]
    scales = torch.rand(n, k // group) * 0.04 + 0.005
    scales[:, h // group:2 * h // group] = scales[:, :h // group]
    scales[:, 2 * h // group:] *= 1e-3
    zeros = None
    if not sym:  # zero points 8 where the codes mirror, anything in the small tail
        zeros = torch.full((n, k // group), 8, dtype=torch.uint8)
        zeros[:, 2 * h // group:] = torch.randint(0, 16, (n, (k - 2 * h) // group), dtype=torch.uint8)
    return on_device(Int4Linear.from_codes(codes, scales.to(torch.bfloat16), zeros, group))


def near_ties_fp8(kind: str) -> Fp8Linear:
    n, k, h = NT_N, NT_K, NT_H
    layer = fp8_layer(n, k, kind)
    w = layer.weight.float()
    w[:, h:2 * h] = -w[:, :h]
    w[:, 2 * h:] *= 2.0**-6  # exact in e4m3 for most codes; small against the mirrored sums
    layer.weight = w.to(torch.float8_e4m3fn)
    if kind == "block 128":
        layer.scale[:, 2:4] = layer.scale[:, 0:2]
    return layer


def near_ties_int8(scale_dtype=torch.bfloat16) -> Int8Linear:
    """int8's near ties: the codes of columns [256, 512) the negation of [0, 256) (per-channel scales, so
    the mirrored products cancel exactly in exact arithmetic), the last 128 columns small codes."""
    n, k, h = NT_N, NT_K, NT_H
    layer = int8_layer(n, k, scale_dtype)
    w = layer.weight.to(torch.int16)
    w[:, :h] = w[:, :h].clamp(-127, 127)
    w[:, h:2 * h] = -w[:, :h]
    w[:, 2 * h:] = torch.randint(-3, 4, (n, k - 2 * h), device=w.device)
    layer.weight = w.to(torch.int8)
    return layer


def near_ties_x(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(MAX_M, NT_K, device=DEVICE)
    x[:, :NT_H] *= 64  # large mirrored sums: their fp32 rounding is what the output shows
    x[:, NT_H:2 * NT_H] = x[:, :NT_H]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_an_int4_row_is_bit_identical_alone_and_in_a_block(seed, dtype, group, sym):
    """Row i of a launch over M rows equals row i launched alone (M = 2, 3, 16, 17, 32: one row tile, its
    edge, two tiles), through a two-slice split-K reduction, for each group size, with and without zero
    points."""
    layer = near_ties_int4(group, sym)
    assert first_variant_row(kernel(layer), near_ties_x(dtype), SPARSE_M, SPARSE_ROWS) is None, f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", FP8_KINDS)
def test_an_fp8_row_is_bit_identical_alone_and_in_a_block(seed, dtype, kind):
    layer = near_ties_fp8(kind)
    assert first_variant_row(kernel(layer), near_ties_x(dtype), SPARSE_M, SPARSE_ROWS) is None, f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_an_int8_row_is_bit_identical_alone_and_in_a_block(seed, dtype, scale_dtype):
    layer = near_ties_int8(scale_dtype)
    assert first_variant_row(kernel(layer), near_ties_x(dtype), SPARSE_M, SPARSE_ROWS) is None, f"seed {seed}"


# ~25 s each under the interpreter: the fast tier has the sparse sweep above for every variant
FULL_SWEEP = [(fmt, dtype) for fmt in ("int4 g32 asym", "int4 g128 sym", "int8", "fp8 block 128", "fp8 per channel")
              for dtype in DTYPES]


@pytest.mark.slow
@pytest.mark.parametrize("fmt,dtype", FULL_SWEEP, ids=str)
def test_every_row_is_bit_identical_alone_and_in_every_block_of_2_to_32(seed, fmt, dtype):
    """The full sweep: every row of every M = 1..32 against the row alone."""
    layer = near_ties_int4(32 if "g32" in fmt else 128, "asym" not in fmt) if fmt.startswith("int4") else \
        near_ties_int8() if fmt == "int8" else near_ties_fp8(fmt.removeprefix("fp8 "))
    assert first_variant_row(kernel(layer), near_ties_x(dtype)) is None, f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_the_invariance_check_catches_a_split_chosen_by_m(seed, dtype, fmt):
    """The check has teeth: the same kernels with the split count planted to depend on M (as cuBLAS's
    split-K does) are caught, in bf16 too."""
    layer = near_ties_int4(128, True) if fmt == "int4" else near_ties_int8() if fmt == "int8" else \
        near_ties_fp8("block 128")

    def by_m(x):
        return kernel(layer, n_splits=1 if x.shape[0] == 1 else 4)(x)
    assert first_variant_row(by_m, near_ties_x(dtype), SPARSE_M, SPARSE_ROWS) is not None, f"seed {seed}"


# ---- shapes of released models ----

QWEN3_8B = [("o", 4096, 4096), ("gate/up", 12288, 4096)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int4 g128", "int8", "fp8 block 128"])
@pytest.mark.parametrize("name,n,k", [(n, o // 32, i // 4) for n, o, i in QWEN3_8B], ids=["o/32", "gate-up/32"])
def test_qwen3_8b_like_shapes_scaled_down(seed, dtype, fmt, name, n, k):
    """Qwen3-8B's o and gate/up projections with N/32 and K/4 (the interpreter is slow): several N tiles,
    a split-K reduction over 1024 columns, 128-wide groups and blocks. M = 1 and M = 16 (decode and
    verify) match the reference, and the verify rows equal the same rows decoded alone."""
    layer = int4_layer(n, k, 128, sym=True) if fmt.startswith("int4") else int8_layer(n, k) if fmt == "int8" else \
        fp8_layer(n, k, "block 128")
    x = torch.randn(16, k, dtype=dtype, device=DEVICE)
    block = kernel(layer)(x)
    torch.testing.assert_close(block, reference(layer)(x), **TOL[dtype], msg=lambda msg: f"seed {seed}: {msg}")
    for i in (0, 15):
        assert torch.equal(kernel(layer)(x[i:i + 1])[0], block[i]), f"seed {seed}: row {i}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4 g128", "fp8 block 128"])
def test_qwen3_8b_o_projection_at_full_size(seed, fmt):
    """Qwen3-8B's o projection (4096 × 4096: 64 N tiles, five K slices) at its real size, bf16 rows (about
    three minutes each in the interpreter): M = 16 matches the reference and its last row equals that row alone."""
    n = k = 4096
    layer = int4_layer(n, k, 128, sym=True) if fmt.startswith("int4") else fp8_layer(n, k, "block 128")
    x = torch.randn(16, k, dtype=torch.bfloat16, device=DEVICE)
    block = kernel(layer)(x)
    torch.testing.assert_close(block, reference(layer)(x), **TOL[torch.bfloat16], msg=lambda msg: f"seed {seed}: {msg}")
    assert torch.equal(kernel(layer)(x[15:16])[0], block[15]), f"seed {seed}"


# ---- the seam: ops and the layouts' __call__ ----

@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_a_layer_call_takes_the_kernel_for_step_rows_and_dequantizes_for_prefill(seed, monkeypatch, fmt):
    """Int4Linear/Int8Linear/Fp8Linear.__call__ go through ops: with the kernels on, up to 32 rows (any leading dims)
    run the Triton kernel, bit for bit; 33 rows dequantize and run F.linear; with DFLASH_KERNELS=torch
    the step rows run the reference."""
    layer = int4_layer(24, 128, 32, sym=False, bias=True) if fmt == "int4" else \
        int8_layer(24, 128, torch.float32, bias=True) if fmt == "int8" else fp8_layer(24, 128, "per channel", True)
    weight = layer.dequantize(torch.float32)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    for shape in ((1, 128), (2, 16, 128)):
        x = torch.randn(shape, device=DEVICE)
        assert torch.equal(layer(x), kernel(layer)(x)), shape
    x = torch.randn(33, 128, device=DEVICE)
    assert torch.equal(layer(x), F.linear(x, weight, layer.bias.float()))
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    x = torch.randn(3, 128, device=DEVICE)
    assert torch.equal(layer(x), reference(layer)(x))


def test_leading_dims_and_empty_rows(seed):
    layer = int4_layer(7, 64, 32, sym=True)
    x = torch.randn(2, 3, 64, device=DEVICE)
    got = kernel(layer)(x)
    assert got.shape == (2, 3, 7)
    torch.testing.assert_close(got, reference(layer)(x), **TOL[torch.float32])
    assert kernel(layer)(x[:0]).shape == (0, 3, 7)
