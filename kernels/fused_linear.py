"""The batch-invariant linear kernel (kernels/invariant_linear.py) with a prologue and an epilogue fused in,
so that a dense layer's norm, projection and activation are one launch instead of three (issue 26).

- SwiGLU epilogue (`swiglu_linear`): the weight is gate_up [2I, K], gate rows first. A program computes
  the gate tile (columns n) and the up tile (columns I + n) of the same output index and writes
  silu(gate) · up [M, I]: one launch instead of the GEMM and `swiglu`.
- RMSNorm prologue (`norm_linear`, plain style: the normed row rounded to x's dtype, then times the norm
  weight, rounded again, as Llama/Qwen3 and kernels/rmsnorm.py): a first pass over K adds the residual
  (rounded to its dtype) and sums the squares of the row; the projection's pass then normalises each x
  tile as it streams K. The new residual goes to a new tensor (never in place: other programs of the
  launch still read the old one), written by the programs with pid_n == 0 and split == 0 (one owner per
  row tile, no atomics).
- Both at once (`norm_swiglu_linear`): post-attention norm, gate_up and SwiGLU in one launch.
- DFlash2's drafter layer (dflash_cli/dflash2.py), a sublayer in three launches around its middle:
  `norm_linear_rows` (the norm prologue before the conv's kernel projection d = P·h, the normed rows stored
  by the programs of the first column tile as they stream them: stored once, not recomputed, since every
  tap of the pre-conv reads them), `conv_linear` (the pre-conv as the loader of q/k/v or gate_up: the x tile
  at (t, c) is Σ_o (base[o, c] + d[t, o, c // group]) · h[t - o, c], in kernels/dynamic_conv.py's rounding
  order, each N tile computing it again from memory) and `linear_conv` (the post-conv after o or down: every
  program stores its partial and takes a ticket on its output COLUMN, and the last one merges each row as
  the unfused GEMM rounds it, read back at the shifted rows, and convs it). The convs are the unfused
  kernels' bits; a conv row reads the rows above it by design, so their invariance is: for every block
  length, the rows equal the unfused path's and the first rows of a longer block.

Batch invariance is kept as in the plain kernel: one binary for every M ≤ 32 (M is not specialised),
the tiling and the split count from the weight's shape only, slices merged in order by the last program of
each output tile to finish (invariant_linear's tickets; the SwiGLU epilogue after that sum when the weight
is split): one launch. A row's output never depends on M, on its place in a tile, or on the other rows.

Rounding against the unfused path (rms_norm kernel, then invariant_linear, then swiglu): the GEMM tiles,
the split points, the merge order, the bias, the roundings of gate and up to x's dtype, silu rounded,
the product rounded, and the normed row rounded once in x's dtype and again after the norm weight are
the same operations in the same order. One thing differs: the sum of squares of a row is reduced here
per lane over BLOCK_K-wide chunks of K, then across the BLOCK_K lanes, while kernels/rmsnorm.py sums one
register block of the whole row. Both orders are fixed (both paths are invariant), but they can differ in
the last bit of the fp32 rstd, which can move a normed element to the neighbouring bf16 value. So the
norm-fused path equals the unfused one to the rounding of the normed x (and is bit-identical to
itself at every M), not bit for bit; the SwiGLU epilogue alone is bit for bit the unfused pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dynamic_conv import dynamic_conv_ref
from .invariant_linear import BLOCK_K, BLOCK_M, BLOCK_N, MERGE_BLOCK, MERGES, invariant_linear_ref, plan
from .rmsnorm import rms_norm_ref


def swiglu_linear_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the unfused pair, gate_up = x @ w.T + b rounded to x's dtype, then silu(gate) · up."""
    gate, up = invariant_linear_ref(x, w, b).chunk(2, dim=-1)
    return F.silu(gate) * up


def norm_linear_ref(x: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor,
                    b: torch.Tensor | None = None, residual: torch.Tensor | None = None, swiglu: bool = False,
                    fp32_weight: bool = False):
    """Reference: (rms_norm(x [+ residual]) @ w.T + b [then SwiGLU], the new residual or None). The
    residual is not updated in place (a new tensor is returned, as the kernel does). fp32_weight: the
    norm's weight applied in float32 before the one rounding (gpt-oss, kernels/rmsnorm.py)."""
    residual = None if residual is None else residual.clone()
    h, residual = rms_norm_ref(x, norm_w, eps, residual, fp32_weight=fp32_weight)
    return (swiglu_linear_ref if swiglu else invariant_linear_ref)(h, w, b), residual


def norm_swiglu_linear_ref(x, norm_w, eps, w, b=None, residual=None):
    return norm_linear_ref(x, norm_w, eps, w, b, residual, swiglu=True)


# DFlash2's drafter layer (dflash_cli/dflash2.py): the norm before the conv's kernel projection, the pre-conv
# before the sublayer's projection, the post-conv after its output projection.
def norm_linear_rows_ref(x, norm_w, eps, w, b=None, residual=None):
    """`norm_linear_ref`, and the normed rows it projected: (out, new residual or None, normed rows)."""
    residual = None if residual is None else residual.clone()
    h, residual = rms_norm_ref(x, norm_w, eps, residual)
    return invariant_linear_ref(h, w, b), residual, h


def conv_linear_ref(z, base, dynamic, w, b=None, swiglu: bool = False):
    """The projection (with SwiGLU: `swiglu_linear_ref`) of dynamic_conv(z, base, dynamic)."""
    return (swiglu_linear_ref if swiglu else invariant_linear_ref)(dynamic_conv_ref(z, base, dynamic), w, b)


def linear_conv_ref(x, w, b, base, dynamic):
    """dynamic_conv(x @ w.T + b rounded to x's dtype, base, dynamic)."""
    return dynamic_conv_ref(invariant_linear_ref(x, w, b), base, dynamic)


# ---- Triton ---------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import pdl  # noqa: E402
from .dynamic_conv import _rounded, conv_tile, tap  # noqa: E402
from .invariant_linear import _UPCAST, _merge_kernel, _sum_splits, _ticket, tickets  # noqa: E402


@triton.jit
def _silu_times(g, u, dtype):
    """silu(g) · u of two values already rounded to `dtype`, rounded as kernels/swiglu.py rounds."""
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (silu * u).to(dtype)


@triton.jit(do_not_specialize=["M"])  # one binary for every M
def _fused_partial_kernel(x_ptr, res_ptr, new_res_ptr, nw_ptr, w_ptr, part_ptr, b_ptr, out_ptr, tickets_ptr, M, N, K,
                          k_per_split, n_splits, eps,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                          DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr, FOLD: tl.constexpr, PDL: tl.constexpr,
                          FP32_WEIGHT: tl.constexpr = False, normed_ptr=None, conv_base_ptr=None, conv_dyn_ptr=None,
                          group_size=1, dyn_row=1, dyn_tap=1, NORMED_OUT: tl.constexpr = False,
                          CONV_IN: tl.constexpr = False, CONV_OUT: tl.constexpr = False, TAPS: tl.constexpr = 1):
    """As invariant_linear._partial_kernel over this program's K slice, with NORM: x (+ residual) is
    normalised by its row's rms (a first pass over all of K) as it streams; with SWIGLU: N is the
    intermediate width I, the weight has 2N rows, and the program keeps the gate tile (rows n) and the up
    tile (rows N + n). part is [splits, M, 2N] under SWIGLU (gate columns, then up), [splits, M, N] else;
    with FOLD the last program of an output tile to finish sums the slices and runs the epilogue.

    DFlash2's dynamic conv (kernels/dynamic_conv.py; `group_size`, the dynamic part's row and tap strides):
    NORMED_OUT writes the normed rows (programs with pid_n == 0, each its own K slice); CONV_IN makes each x
    tile the conv of x's rows (the pre-conv, x = the normed rows); CONV_OUT convs the output over its rows
    (the post-conv): every program stores its partial, and the last program of an output COLUMN (all row
    tiles, all slices: a row's conv reads the rows above it) merges each row and convs it."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    pid_n, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    r_rows = res_ptr + rows.to(tl.int64)[:, None] * K
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM:  # the row's statistic over all of K, in a fixed order: per lane over the chunks, then the lanes
        sq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        owner = (pid_n == 0) & (split == 0)
        for k0 in range(0, K, BLOCK_K):
            ok = row_ok[:, None] & (k0 + ks < K)[None, :]
            x = tl.load(x_rows + (k0 + ks)[None, :], mask=ok, other=0.0)
            if HAS_RESIDUAL:  # the stream is stored in its dtype: normalise that value
                x = (x.to(tl.float32) + tl.load(r_rows + (k0 + ks)[None, :], mask=ok, other=0.0).to(tl.float32))
                x = x.to(res_ptr.dtype.element_ty)
                if owner:
                    tl.store(new_res_ptr + rows.to(tl.int64)[:, None] * K + (k0 + ks)[None, :], x, mask=ok)
            xf = x.to(tl.float32)
            sq += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + eps)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = k0 + ks < k_end
        ok = row_ok[:, None] & k_ok[None, :]
        if CONV_IN:  # the pre-conv of this tile, from the rows above it too: a value of x's dtype
            x = conv_tile(x_ptr, conv_base_ptr, conv_dyn_ptr, rows, k0 + ks, row_ok, k_ok, K, K, group_size, dyn_row,
                          dyn_tap, TAPS, dtype).to(dtype)
        else:
            x = tl.load(x_rows + (k0 + ks)[None, :], mask=ok, other=0.0)
        if NORM:
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + tl.load(r_rows + (k0 + ks)[None, :], mask=ok, other=0.0).to(tl.float32))
                x = x.to(res_ptr.dtype.element_ty)
            nw = tl.load(nw_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
            if FP32_WEIGHT:  # gpt-oss: the fp32 weight times the fp32 normed row, rounded once
                x = (nw[None, :] * (x.to(tl.float32) * rstd[:, None])).to(dtype)
            else:
                normed = (x.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)  # rounded to x's dtype, as HF
                x = (nw[None, :] * normed).to(dtype)  # then the weight, rounded once more
            if NORMED_OUT:
                if pid_n == 0:  # the splits' K slices tile the row: each normed element stored once
                    tl.store(normed_ptr + rows.to(tl.int64)[:, None] * K + (k0 + ks)[None, :], x, mask=ok)
        w = tl.load(w_rows + (k0 + ks)[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST or x.dtype != w.dtype:  # a mixed pair meets in fp32 (exact products either way)
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
        if SWIGLU:
            wu = tl.load(w_rows + N * K + (k0 + ks)[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST or x.dtype != wu.dtype:
                wu = wu.to(tl.float32)
            acc_up = tl.dot(x, wu, acc_up, input_precision="ieee")
    if DIRECT:
        _epilogue(acc, acc_up, rows, cols, row_ok, col_ok, N, b_ptr, out_ptr, HAS_BIAS, SWIGLU)
    else:
        width = 2 * N if SWIGLU else N
        part = part_ptr + (split * M + rows.to(tl.int64))[:, None] * width + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(part, acc, mask=mask)
        if SWIGLU:
            tl.store(part + N, acc_up, mask=mask)
        if CONV_OUT:
            column = tickets_ptr + pid_n  # one counter per output column: every row tile and slice takes a ticket
            tl.debug_barrier()  # every thread's partial is stored before the ticket's release publishes them
            if tl.atomic_add(column, 1, sem="acq_rel") == n_splits * tl.num_programs(2) - 1:
                for m0 in range(0, M, BLOCK_M):
                    _conv_out(m0 + tl.arange(0, BLOCK_M), cols, col_ok, n_splits, M, N, part_ptr, b_ptr, out_ptr,
                              conv_base_ptr, conv_dyn_ptr, group_size, dyn_row, dyn_tap, HAS_BIAS, TAPS, BLOCK_M,
                              BLOCK_N)
                tl.atomic_xchg(column, 0)  # ready for the next launch (and a graph's next replay)
        elif FOLD:
            last, tile = _ticket(tickets_ptr, n_splits)
            if last:  # gate and up each summed in slice order, as _swiglu_merge_kernel and _merge_kernel add
                acc = _sum_splits(rows, cols, row_ok, col_ok, n_splits, M, width, part_ptr, BLOCK_M, BLOCK_N)
                if SWIGLU:
                    acc_up = _sum_splits(rows, cols, row_ok, col_ok, n_splits, M, width, part_ptr + N, BLOCK_M,
                                         BLOCK_N)
                _epilogue(acc, acc_up, rows, cols, row_ok, col_ok, N, b_ptr, out_ptr, HAS_BIAS, SWIGLU)
                tl.atomic_xchg(tile, 0)  # ready for the next launch (and a graph's next replay)


@triton.jit
def _conv_out(rows, cols, col_ok, n_splits, M, N, part_ptr, b_ptr, out_ptr, base_ptr, dyn_ptr, group_size, dyn_row,
              dyn_tap, HAS_BIAS: tl.constexpr, TAPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The post-conv of merged rows: y[t - o] = (the slices summed in order + bias) rounded to out's dtype, as
    the unfused GEMM writes it (read back from the partials at the shifted rows, zeros above row 0), then
    the conv's taps in kernels/dynamic_conv.py's order."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    row_ok = rows < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for o in tl.static_range(TAPS):
        src = rows - o
        src_ok = row_ok & (src >= 0)
        y = _sum_splits(src, cols, src_ok, col_ok, n_splits, M, N, part_ptr, BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = tl.where(src_ok[:, None], y.to(dtype).to(tl.float32), 0.0)
        b = _rounded(tl.load(base_ptr + o * N + cols, mask=col_ok, other=0.0).to(tl.float32), dtype)
        d = tl.load(dyn_ptr + rows.to(tl.int64)[:, None] * dyn_row + o * dyn_tap + (cols // group_size)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tap(acc, tl.broadcast_to(b[None, :], acc.shape), _rounded(d.to(tl.float32), dtype), y, dtype)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(dtype),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _epilogue(acc, acc_up, rows, cols, row_ok, col_ok, N, b_ptr, out_ptr, HAS_BIAS: tl.constexpr,
              SWIGLU: tl.constexpr):
    """The tile's K sum (and up's) + bias, rounded to out's dtype, then SwiGLU: out [M, N]."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_dtype = out_ptr.dtype.element_ty
    if SWIGLU:  # gate and up rounded as the GEMM's output would be, then the activation
        res = _silu_times(acc.to(out_dtype).to(tl.float32), acc_up.to(out_dtype).to(tl.float32), out_dtype)
    else:
        res = acc.to(out_dtype)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], res, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["MN"])
def _swiglu_merge_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """out[m, n] = silu(gate) · up, gate = part[0][m, n] + part[1][m, n] + ... in order (+ bias), up the
    same at column N + n, each rounded once to out's dtype first: the two-launch form's merge."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < MN
    m, n = idx // N, idx % N
    gate_at = m * 2 * N + n
    g = tl.zeros([BLOCK], tl.float32)
    u = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLITS):
        g += tl.load(part_ptr + s * 2 * MN + gate_at, mask=ok, other=0.0)
        u += tl.load(part_ptr + s * 2 * MN + gate_at + N, mask=ok, other=0.0)
    if HAS_BIAS:
        g += tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
        u += tl.load(b_ptr + N + n, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + idx, _silu_times(g.to(dtype).to(tl.float32), u.to(dtype).to(tl.float32), dtype), mask=ok)


def _launch(x: torch.Tensor, w: torch.Tensor, b, norm_w, eps: float, residual, swiglu: bool,
            n_splits: int | None = None, merge: str = "last", fp32_weight: bool = False, normed: bool = False,
            conv_in=None, conv_out=None):
    """conv_in / conv_out: (base [taps, width], dynamic [M, taps, G], a view with unit stride over G) of the
    pre-conv of x / the post-conv of the output. Returns (out, new residual or None, normed rows or None)."""
    assert merge in MERGES, merge
    rows_w, k = w.shape
    assert x.shape[-1] == k and (b is None or b.shape == (rows_w,)), (x.shape, w.shape)
    assert not swiglu or rows_w % 2 == 0, "gate_up has an even number of rows"
    n = rows_w // 2 if swiglu else rows_w
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k).contiguous()
    w = w.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    new_res = None
    if residual is not None:
        assert residual.shape == x.shape, (residual.shape, x.shape)
        residual = residual.reshape(m, k).contiguous()
        new_res = torch.empty_like(residual)
    rows = torch.empty(m, k, dtype=x.dtype, device=x.device) if normed else None
    conv = conv_in if conv_in is not None else conv_out
    if conv is not None:
        base, dynamic = conv
        width = k if conv_in is not None else n
        assert conv_in is None or conv_out is None, "one conv per launch"
        assert base.is_contiguous() and base.shape == (dynamic.shape[1], width) and dynamic.shape[0] == m
        assert dynamic.stride(2) == 1 and width % dynamic.shape[2] == 0, (dynamic.shape, dynamic.stride())
        assert conv_out is None or (merge == "last" and not swiglu and norm_w is None)
        conv_args = dict(conv_base_ptr=base, conv_dyn_ptr=dynamic, group_size=width // dynamic.shape[2],
                         dyn_row=dynamic.stride(0), dyn_tap=dynamic.stride(1), TAPS=base.shape[0])
    else:
        conv_args = {}
    if m == 0 or n == 0:
        return out.reshape(*lead, n), None if new_res is None else new_res.reshape(x.shape), rows
    s, k_per_split = plan(rows_w, k, n_splits)  # the unfused GEMM's split count: the same slices, the same order
    # the post-conv reads merged rows back from the partials: a weight in one slice writes them too
    part = torch.empty(s, m, rows_w, dtype=torch.float32, device=x.device) if s > 1 or conv_out else out
    bias = b if b is not None else out
    grid = (triton.cdiv(n, BLOCK_N), s, triton.cdiv(m, BLOCK_M))
    _fused_partial_kernel[grid](
        x2, residual if residual is not None else x2, new_res if new_res is not None else x2,
        norm_w if norm_w is not None else x2, w, part, bias, out, tickets(x.device, grid[0] * grid[2]), m, n, k,
        k_per_split, s, float(eps), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=_UPCAST,
        DIRECT=s == 1 and conv_out is None, HAS_BIAS=b is not None, NORM=norm_w is not None,
        HAS_RESIDUAL=residual is not None, SWIGLU=swiglu, FOLD=merge == "last", FP32_WEIGHT=fp32_weight,
        **({} if rows is None else dict(normed_ptr=rows, NORMED_OUT=True)),
        **conv_args, CONV_IN=conv_in is not None, CONV_OUT=conv_out is not None, **pdl.launch(x.device), num_warps=4,
        # two weight tiles per stage: 4 stages of fp32 pass sm_86/89's 99 KB; the pre-conv's loads (a tile per tap)
        # are staged too: a stage fewer (fp32's q/k/v and gate_up need ~100 KB with as many as the plain kernel)
        num_stages=(3 if swiglu else 4) - (conv_in is not None))
    if s > 1 and merge == "launch":
        merge_kernel = _swiglu_merge_kernel if swiglu else _merge_kernel
        merge_kernel[(triton.cdiv(m * n, MERGE_BLOCK),)](
            part, bias, out, m * n, n, SPLITS=s, HAS_BIAS=b is not None, BLOCK=MERGE_BLOCK, num_warps=4)
    return out.reshape(*lead, n), None if new_res is None else new_res.reshape(x.shape), rows


def swiglu_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                  n_splits: int | None = None, merge: str = "last") -> torch.Tensor:
    """Triton: same contract as `swiglu_linear_ref` (bit for bit the unfused invariant_linear + swiglu).
    `n_splits` and `merge` as invariant_linear's."""
    return _launch(x, w, b, None, 0.0, None, swiglu=True, n_splits=n_splits, merge=merge)[0]


def norm_linear(x, norm_w, eps, w, b=None, residual=None, swiglu: bool = False, n_splits: int | None = None,
                merge: str = "last", fp32_weight: bool = False):
    """Triton: same contract as `norm_linear_ref`: (output, new residual or None)."""
    return _launch(x, w, b, norm_w, eps, residual, swiglu=swiglu, n_splits=n_splits, merge=merge,
                   fp32_weight=fp32_weight)[:2]


def norm_swiglu_linear(x, norm_w, eps, w, b=None, residual=None, n_splits: int | None = None, merge: str = "last"):
    return norm_linear(x, norm_w, eps, w, b, residual, swiglu=True, n_splits=n_splits, merge=merge)


def norm_linear_rows(x, norm_w, eps, w, b=None, residual=None, n_splits: int | None = None, merge: str = "last"):
    """Triton: same contract as `norm_linear_rows_ref`, one launch: `norm_linear`, and the normed rows it
    projected, stored as they stream (the bits `norm_linear` multiplies, to the rounding of the normed row
    against rms_norm: the module's note)."""
    return _launch(x, w, b, norm_w, eps, residual, swiglu=False, n_splits=n_splits, merge=merge, normed=True)


def conv_linear(z, base, dynamic, w, b=None, swiglu: bool = False, n_splits: int | None = None,
                merge: str = "last"):
    """Triton: same contract as `conv_linear_ref`, one launch, bit for bit the unfused dynamic_conv and
    invariant_linear (+ swiglu): the conv runs in the projection's loader, tile by tile."""
    z = z.contiguous()
    return _launch(z, w, b, None, 0.0, None, swiglu=swiglu, n_splits=n_splits, merge=merge,
                   conv_in=(base, dynamic))[0]


def linear_conv(x, w, b, base, dynamic, n_splits: int | None = None):
    """Triton: same contract as `linear_conv_ref`, one launch, bit for bit the unfused invariant_linear and
    dynamic_conv: the conv runs in the merge of the output's column, by its last program."""
    return _launch(x, w, b, None, 0.0, None, swiglu=False, n_splits=n_splits, conv_out=(base, dynamic))[0]
