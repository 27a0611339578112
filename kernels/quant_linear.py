"""Batch-invariant weight-only quantized linear layers: int4 W4A16, int8 W8A16 and FP8 e4m3, the quantized variants of
kernels/invariant_linear.py (issue 25). `out = x @ dequant(w).T + b` for the rows a step sees (M ≤ 32),
each output element reduced in the same order whatever M is.

The weights are dequantized in registers, tile by tile, exactly as the layouts' torch references do
(dflash_cli/quant/int4.py, int8.py, fp8.py), into the activations' dtype: int4 `(q − z)·s` rounded once to
the scales' dtype, then to x's; int8 `q·s` in fp32, rounded once to the scale's dtype, then to x's; FP8
`q·s` in fp32, rounded once to x's dtype. The products then meet x in
one `tl.dot` per tile (bf16 × bf16 on the tensor cores for bf16 activations, fp32 × fp32 in IEEE precision
for fp32 ones) with fp32 accumulation. Everything else is invariant_linear's contract: one compiled
configuration for every M (rows in tiles of BLOCK_M, M not specialised), a fixed BLOCK_N × BLOCK_K tiling,
K cut into `splits(N, K)` slices chosen from the weight's shape alone, the slices' fp32 partial sums added
in slice order by the last program of each output tile to finish (invariant_linear's `_store`: one launch),
then the bias, then one rounding.

int4: `qweight` int32 [N, K/8] (column k at bits 4·(k % 8) of word k // 8), `scales` [N, K/group]
(fp16, bf16 or fp32), `zeros` uint8 [N, K/group] or None (symmetric: z = 8), `input_perm` [K] or None:
act-order is resolved at load by sorting the weight's columns (Int4Linear.input_perm), so the kernel
sees no g_idx; the launcher gathers x's columns into the weight's order instead.
int8: `weight` int8 [N, K], `scale` [N, 1] (fp16, bf16 or fp32): symmetric, per output channel, so each
program reads its columns' scales once, before the K loop.
FP8: `weight` float8_e4m3fn [N, K], `scale` [ceil(N/rows), ceil(K/cols)] over blocks `block = (rows, cols)`
(128×128 for Qwen's `weight_scale_inv`, (1, K) per channel, (N, K) per tensor), multiplied. The e4m3 bits
are decoded with integer arithmetic (exact, and the same on every GPU: sm_80/86 have no e4m3 conversion).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .invariant_linear import BLOCK_K, BLOCK_M, BLOCK_N, _UPCAST, _store, merge_after, plan, tickets

# Scales (and zero points) are read once per SUB columns of a tile, not once per weight: every int4 group
# and every FP8 scale block spans a whole number of SUB columns (32, 64, 128, a row: what checkpoints use).
SUB = 32


def _finish(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T in fp32 (+ b in fp32), rounded once to x's dtype."""
    out = F.linear(x.float(), w.float())
    if b is not None:
        out = out + b.float()
    return out.to(x.dtype)


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None,
                    input_perm: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: Int4Linear's dequantizer (into x's dtype, in the checkpoint's column order), then the
    product in fp32, rounded once to x's dtype."""
    from ..quant.int4 import Int4Linear

    layer = Int4Linear(qweight, scales, zeros, group_size, x.shape[-1], input_perm)
    return _finish(x, layer.dequantize(x.dtype), bias)


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: Int8Linear's dequantizer (q·s in fp32, rounded once to the scale's dtype, then to x's),
    then the product in fp32, rounded once to x's dtype."""
    from ..quant.int8 import Int8Linear

    return _finish(x, Int8Linear(weight, scale).dequantize(x.dtype), bias)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: Fp8Linear's dequantizer (q·s in fp32, into x's dtype), then the product in fp32, rounded
    once to x's dtype."""
    from ..quant.fp8 import Fp8Linear

    return _finish(x, Fp8Linear(weight, scale, tuple(block)).dequantize(x.dtype), bias)


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import pdl  # noqa: E402

_SUB: tl.constexpr = tl.constexpr(SUB)  # the kernels' view of SUB (a jit function reads only constexpr globals)


@triton.jit
def _e4m3_to_f32(bits):
    """float8_e4m3fn bits (int32 holding 0..255) → fp32, exactly: normals by assembling the fp32 bit
    pattern (exponent bias 7 → 127), subnormals as mantissa · 2⁻⁹ (no fp32 denormal involved), S.1111.111
    is NaN (e4m3fn has no infinities)."""
    e = (bits >> 3) & 15
    m = bits & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    v = tl.where((bits & 127) == 127, float("nan"), v)
    return tl.where((bits & 128) != 0, -v, v)


@triton.jit
def _round(v, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 `v` rounded to nearest-even in DTYPE, as torch's `.to(DTYPE)` does. Triton's interpreter
    truncates fp32 → bf16 (and rounds ties up), so there the rounding is done on the bits; a GPU's
    cvt.rn is the same rounding."""
    if INTERPRET and DTYPE == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)  # a bf16 value already: the cast is exact
    else:
        return v.to(DTYPE)


@triton.jit
def _accumulate(acc, x, w, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter mis-computes bf16 dots (invariant_linear.py): fp32 there, bf16 on a GPU
        x, w = x.to(tl.float32), w.to(tl.float32)
    return tl.dot(x, w, acc, input_precision="ieee")


@triton.jit
def _per_sub(v, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K // _SUB, BLOCK_N] values, one per SUB-column slice of the tile, → [BLOCK_K, BLOCK_N]."""
    return tl.reshape(tl.broadcast_to(v[:, None, :], [BLOCK_K // _SUB, _SUB, BLOCK_N]), [BLOCK_K, BLOCK_N])


@triton.jit(do_not_specialize=["M"])  # one binary for every M: M = 1 is not folded into a constant
def _int4_partial_kernel(x_ptr, q_ptr, s_ptr, z_ptr, part_ptr, b_ptr, out_ptr, tickets_ptr, M, N, K, k_per_split,
                         n_splits, group, groups, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         UPCAST: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, FOLD: tl.constexpr,
                         PDL: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """part[split, m, n] = sum over this split's K slice of x[m, k] · W[n, k], W dequantized per tile: the
    tile's packed words read once ([BLOCK_K / 8, BLOCK_N]) and unpacked in registers, its scales and zero
    points once per SUB columns (a group is a whole number of SUB-column slices)."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    pid_n, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    words = tl.arange(0, BLOCK_K // 8)
    subs = tl.arange(0, BLOCK_K // _SUB) * _SUB
    shifts = tl.arange(0, 8) * 4
    row_ok, col_ok = rows < M, cols < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    q_rows = q_ptr + cols.to(tl.int64)[None, :] * (K // 8)
    g_rows = cols.to(tl.int64)[None, :] * groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + ks
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk < k_end)[None, :], other=0.0)
        word = tl.load(q_rows + (k0 // 8 + words)[:, None], mask=col_ok[None, :] & (k0 + 8 * words < k_end)[:, None],
                       other=0)
        code = tl.reshape((word[:, None, :] >> shifts[None, :, None]) & 15, [BLOCK_K, BLOCK_N])  # k = 8·word + j
        g_ok = col_ok[None, :] & (k0 + subs < k_end)[:, None]
        g = g_rows + ((k0 + subs) // group)[:, None]
        s = _per_sub(tl.load(s_ptr + g, mask=g_ok, other=0.0).to(tl.float32), BLOCK_K, BLOCK_N)
        if HAS_ZEROS:
            z = _per_sub(tl.load(z_ptr + g, mask=g_ok, other=0).to(tl.float32), BLOCK_K, BLOCK_N)
        else:
            z = 8.0
        # (q − z)·s in fp32, rounded once to the scales' dtype, then to x's (Int4Linear.dequantize)
        w = _round((code.to(tl.float32) - z) * s, s_ptr.dtype.element_ty, UPCAST)
        if s_ptr.dtype.element_ty != x_ptr.dtype.element_ty:
            w = _round(w.to(tl.float32), x_ptr.dtype.element_ty, UPCAST)
        acc = _accumulate(acc, x, w, UPCAST)
    _store(acc, rows, cols, row_ok, col_ok, split, n_splits, M, N, part_ptr, b_ptr, out_ptr, tickets_ptr, DIRECT,
           HAS_BIAS, FOLD, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M"])
def _int8_partial_kernel(x_ptr, w_ptr, s_ptr, part_ptr, b_ptr, out_ptr, tickets_ptr, M, N, K, k_per_split, n_splits,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                         DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, FOLD: tl.constexpr, PDL: tl.constexpr):
    """part[split, m, n] = sum over this split's K slice of x[m, k] · q[n, k]·s[n], the weight read as int8
    (one byte a weight) and dequantized per tile; the per-channel scales read once per program."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    pid_n, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * K
    s = tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < k_end
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(w_rows + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0)
        # q·s: one fp32 multiply as the reference's (exact for bf16/fp16 scales), rounded once to the
        # scale's dtype, then to x's (Int8Linear.dequantize)
        w = _round(q.to(tl.float32) * s, s_ptr.dtype.element_ty, UPCAST)
        if s_ptr.dtype.element_ty != x_ptr.dtype.element_ty:
            w = _round(w.to(tl.float32), x_ptr.dtype.element_ty, UPCAST)
        acc = _accumulate(acc, x, w, UPCAST)
    _store(acc, rows, cols, row_ok, col_ok, split, n_splits, M, N, part_ptr, b_ptr, out_ptr, tickets_ptr, DIRECT,
           HAS_BIAS, FOLD, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M"])
def _fp8_partial_kernel(x_ptr, w_ptr, s_ptr, part_ptr, b_ptr, out_ptr, tickets_ptr, M, N, K, k_per_split, n_splits,
                        block_rows, block_cols, scale_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        FOLD: tl.constexpr, PDL: tl.constexpr):
    """part[split, m, n] = sum over this split's K slice of x[m, k] · q[n, k]·s[n // rows, k // cols], the
    scales read once per SUB columns (`block_cols` is a multiple of SUB)."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    pid_n, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    subs = tl.arange(0, BLOCK_K // _SUB) * _SUB
    row_ok, col_ok = rows < M, cols < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * K
    s_rows = s_ptr + (cols // block_rows).to(tl.int64)[None, :] * scale_cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < k_end
        x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bits = tl.load(w_rows + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0).to(tl.int32)
        s = tl.load(s_rows + ((k0 + subs) // block_cols)[:, None], mask=col_ok[None, :] & (k0 + subs < k_end)[:, None],
                    other=0.0)
        w = _round(_e4m3_to_f32(bits) * _per_sub(s.to(tl.float32), BLOCK_K, BLOCK_N), x_ptr.dtype.element_ty,
                   UPCAST)  # Fp8Linear.dequantize
        acc = _accumulate(acc, x, w, UPCAST)
    _store(acc, rows, cols, row_ok, col_ok, split, n_splits, M, N, part_ptr, b_ptr, out_ptr, tickets_ptr, DIRECT,
           HAS_BIAS, FOLD, BLOCK_M, BLOCK_N)


def _launch(partial, x: torch.Tensor, n: int, k: int, b: torch.Tensor | None, n_splits: int | None, weight_args,
            merge: str = "last", **constexprs) -> torch.Tensor:
    """Rows in, split-K partial sums merged in slice order: invariant_linear's launcher around `partial`."""
    assert x.shape[-1] == k and (b is None or b.shape == (n,)), (x.shape, n, k, None if b is None else b.shape)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    s, k_per_split = plan(n, k, n_splits)
    part = torch.empty(s, m, n, dtype=torch.float32, device=x.device) if s > 1 else out
    bias = b if b is not None else out
    head, tail = weight_args
    grid = (triton.cdiv(n, BLOCK_N), s, triton.cdiv(m, BLOCK_M))
    partial[grid](
        x2, *head, part, bias, out, tickets(x.device, grid[0] * grid[2]), m, n, k, k_per_split, s, *tail,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=_UPCAST, DIRECT=s == 1, HAS_BIAS=b is not None,
        FOLD=merge == "last", **pdl.launch(x.device), **constexprs, num_warps=4, num_stages=4)
    merge_after(s, m, n, part, bias, out, b is not None, merge)
    return out.reshape(*lead, n)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None, input_perm: torch.Tensor | None = None,
                n_splits: int | None = None, merge: str = "last") -> torch.Tensor:
    """Triton: same contract as `int4_linear_ref`. `n_splits` overrides `splits(N, K)` (tests plant an
    M-dependent choice with it to show the invariance tests fail); `merge` as invariant_linear's."""
    k = x.shape[-1]
    n, groups = scales.shape
    assert qweight.shape == (n, -(-k // 8)) and qweight.dtype == torch.int32 and groups * group_size == k, \
        (qweight.shape, scales.shape, k, group_size)
    assert zeros is None or (zeros.shape == scales.shape and zeros.dtype == torch.uint8)
    assert group_size % SUB == 0, f"the int4 kernel takes groups of a multiple of {SUB} columns, not {group_size}"
    if input_perm is not None:  # the weight's columns are x's columns input_perm (act-order, sorted at load)
        x = x.index_select(-1, input_perm.to(x.device))
    z = zeros.contiguous() if zeros is not None else scales
    return _launch(_int4_partial_kernel, x, n, k, bias, n_splits,
                   ((qweight.contiguous(), scales.contiguous(), z), (group_size, groups)), merge,
                   HAS_ZEROS=zeros is not None)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                n_splits: int | None = None, merge: str = "last") -> torch.Tensor:
    """Triton: same contract as `int8_linear_ref` (`n_splits`, `merge` as int4_linear's)."""
    n, k = weight.shape
    assert weight.dtype == torch.int8 and scale.shape == (n, 1), (weight.dtype, weight.shape, scale.shape)
    return _launch(_int8_partial_kernel, x, n, k, bias, n_splits, ((weight.contiguous(), scale.contiguous()), ()),
                   merge)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None, n_splits: int | None = None, merge: str = "last") -> torch.Tensor:
    """Triton: same contract as `fp8_linear_ref` (`n_splits`, `merge` as int4_linear's)."""
    n, k = weight.shape
    rows, cols = block
    assert weight.dtype == torch.float8_e4m3fn and scale.shape == (-(-n // rows), -(-k // cols)), \
        (weight.dtype, scale.shape, weight.shape, block)
    if cols >= k:  # one scale column (per tensor or per channel): any multiple of SUB that covers K reads it
        cols = triton.cdiv(k, SUB) * SUB
    assert cols % SUB == 0, f"the FP8 kernel takes scale blocks of a multiple of {SUB} columns, not {block}"
    bits = weight.contiguous().view(torch.uint8)
    return _launch(_fp8_partial_kernel, x, n, k, bias, n_splits,
                   ((bits, scale.contiguous()), (rows, cols, scale.shape[1])), merge)
