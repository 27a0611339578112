"""DFlash2's grouped, dynamic, causal depthwise convolution over the draft block's rows (dflash_cli/dflash2.py):

    out[t, c] = Σ_o (base[o, c] + dynamic[t, o, c // group_size]) · z[t - o, c]        (zeros above row 0)

The reference accumulates tap by tap, base term then dynamic term, each product and each sum rounded to z's
dtype (as the torch ops round them); the kernel does the same operations in the same order, so it equals the
reference bit for bit in every dtype (and an identity base with a zero dynamic part returns z itself). One
launch instead of the reference's ~4 ops per tap.

The tap arithmetic is one helper (`conv_tile`, `tap`), which kernels/fused_linear.py also runs inside the
drafter's projections (issue 26): the pre-conv as the loader of the projection after it, the post-conv in
the merge of the projection before it. A product is never contracted with the sum after it into an FMA:
this launch compiles without FP fusion, and the fused projections (whose GEMM keeps it) round each
product on its own (`_product`: PTX mul.rn, which the assembler never fuses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dynamic_conv_ref(z: torch.Tensor, base: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
    """Σ_o (base[o] + dynamic[:, o] per group) · z shifted down by o rows (zeros above row 0).

    z: [L, H]; base: [K, H]; dynamic: [L, K, G] with H = G · group_size. Accumulated tap by tap,
    base term then dynamic term, in z's dtype: with base = identity and dynamic = 0 the output is z
    bit for bit (z · 1 + z · 0 + shifted · 0), which is what makes an identity-initialised DFlash2
    drafter equal the v1 drafter."""
    length, hidden = z.shape
    taps, groups = dynamic.shape[1], dynamic.shape[2]
    blocks = z.view(length, groups, hidden // groups)
    out = torch.zeros_like(blocks)
    for o in range(taps):
        # rows t - o (zeros above row 0; a tap longer than the block reads zeros only)
        shifted = blocks if o == 0 else F.pad(blocks[: max(length - o, 0)], (0, 0, 0, 0, min(o, length), 0))
        out = out + base[o].view(groups, -1).to(z.dtype) * shifted
        out = out + dynamic[:, o, :, None].to(z.dtype) * shifted
    return out.view(length, hidden)


# ---- Triton ---------------------------------------------------------------------------------
import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402

# The interpreter has no libdevice; numpy's products are rounded on their own anyway.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (fp32) rounded to `dtype` to nearest even, as fp32. bf16 by hand: Triton's interpreter truncates a
    plain cast to bf16, and this is the same on a GPU (finite values: the activations here)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _product(a, b):
    """a · b rounded to fp32 on its own: never contracted into an FMA with the sum it goes into."""
    if _INTERPRETED:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def tap(acc, b, d, shifted, dtype: tl.constexpr):
    """One tap: acc + b · z[t - o], then + d · z[t - o], each product and each sum rounded to `dtype`, as the
    reference's torch ops round them (values of `dtype` held in fp32; all four of one shape)."""
    acc = _rounded(acc + _rounded(_product(b, shifted), dtype), dtype)
    return _rounded(acc + _rounded(_product(d, shifted), dtype), dtype)


@triton.jit
def conv_tile(z_ptr, base_ptr, dyn_ptr, rows, cols, row_ok, col_ok, z_row, base_tap, group_size, dyn_row, dyn_tap,
              TAPS: tl.constexpr, dtype: tl.constexpr):
    """The conv at a [rows, cols] tile, in fp32 (values of `dtype`): Σ_o (base[o, c] + dyn[t, o, c // group_size])
    · z[t - o, c], rows above 0 zeros; z read from memory at the shifted rows (the rows of other tiles too)."""
    ok = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    for o in tl.static_range(TAPS):
        src = rows - o
        shifted = tl.load(z_ptr + src.to(tl.int64)[:, None] * z_row + cols[None, :], mask=ok & (src >= 0)[:, None],
                          other=0.0).to(tl.float32)
        b = _rounded(tl.load(base_ptr + o * base_tap + cols, mask=col_ok, other=0.0).to(tl.float32), dtype)
        d = tl.load(dyn_ptr + rows.to(tl.int64)[:, None] * dyn_row + o * dyn_tap + (cols // group_size)[None, :],
                    mask=ok, other=0.0)
        acc = tap(acc, tl.broadcast_to(b[None, :], acc.shape), _rounded(d.to(tl.float32), dtype), shifted, dtype)
    return acc


@triton.jit
def _dynamic_conv_kernel(z_ptr, base_ptr, dyn_ptr, out_ptr, hidden, group_size, z_row, dyn_row, dyn_tap,
                         TAPS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], tl.float32)  # always a value of `dtype`, held in fp32
    for o in tl.static_range(TAPS):
        src = t - o + tl.zeros([BLOCK], tl.int32)  # the row tap o reads (above row 0: zeros)
        shifted = tl.load(z_ptr + src * z_row + cols, mask=ok & (src >= 0), other=0.0).to(tl.float32)
        b = _rounded(tl.load(base_ptr + o * hidden + cols, mask=ok, other=0.0).to(tl.float32), dtype)
        d = tl.load(dyn_ptr + t * dyn_row + o * dyn_tap + cols // group_size, mask=ok, other=0.0)
        d = _rounded(d.to(tl.float32), dtype)
        acc = tap(acc, b, d, shifted, dtype)
    tl.store(out_ptr + t * hidden + cols, acc.to(dtype), mask=ok)


def dynamic_conv(z: torch.Tensor, base: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
    """Triton: same contract as `dynamic_conv_ref`, one launch; `dynamic` may be a strided view (one side of
    the [L, 2, K, G] kernels)."""
    length, hidden = z.shape
    taps, groups = dynamic.shape[1], dynamic.shape[2]
    assert z.stride(1) == 1 and base.is_contiguous() and dynamic.stride(2) == 1 and base.shape == (taps, hidden)
    out = torch.empty((length, hidden), dtype=z.dtype, device=z.device)
    block = min(1024, triton.next_power_of_2(hidden))
    if length:
        _dynamic_conv_kernel[(length, triton.cdiv(hidden, block))](
            z, base, dynamic, out, hidden, hidden // groups, z.stride(0), dynamic.stride(0), dynamic.stride(1),
            TAPS=taps, BLOCK=block, enable_fp_fusion=False)  # no FMA: the reference rounds the product first
    return out
