"""RMSNorm with an optional fused residual add.

`rms_norm(x, w, eps, residual)` adds `x` into `residual` in place and normalises the sum, so a
decoder layer reads the residual stream once per norm instead of twice. Three weight conventions:
Llama/Qwen3 round the normalised row to the input dtype and then scale it by w; the zero-centred norm
of Qwen3.5 (`offset=True`) scales by (1 + w) in float32 and rounds once, at the end; gpt-oss
(`fp32_weight=True`) scales by w in float32 and rounds once (its norms are kept in float32).
"""
from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, offset: bool = False,
    fp32_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: `residual += x` (in place, when given), then RMSNorm of the sum over the last dim.

    Numerics follow Hugging Face: the statistic in float32; the weight applied in the input dtype, or
    with `offset` as (1 + w) in float32, or with `fp32_weight` as w in float32, before the one
    rounding. Returns (normed, residual).
    """
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (1.0 + weight.float())).to(x.dtype), residual
    if fp32_weight:
        return (weight.float() * normed).to(x.dtype), residual
    return (weight * normed.to(x.dtype)).to(x.dtype), residual


# ---- Triton ---------------------------------------------------------------------------------
# One program per row. A row up to _MAX_BLOCK wide stays in registers (one read, one write); a
# wider one is walked in chunks twice (sum of squares, then scale), re-reading it from L2.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_MAX_BLOCK = 8192


@triton.jit
def _scaled(xf, rstd, w, dtype, OFFSET: tl.constexpr, FP32_WEIGHT: tl.constexpr):
    """The normalised row times its weight, rounded as the reference rounds."""
    if OFFSET:
        return xf * rstd * (1.0 + w)
    if FP32_WEIGHT:
        return w * (xf * rstd)
    return w * (xf * rstd).to(dtype).to(tl.float32)  # rounded to the input dtype before the weight, as HF


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, OFFSET: tl.constexpr,
                     FP32_WEIGHT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, res_row, out_row = x_ptr + row * n_cols, res_ptr + row * n_cols, out_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    dtype = out_ptr.dtype.element_ty
    if ONE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x.to(tl.float32) + tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(res_ptr.dtype.element_ty)  # the residual stream is stored in its dtype: normalise that value
            tl.store(res_row + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, _scaled(xf, rstd, w, dtype, OFFSET, FP32_WEIGHT).to(dtype), mask=mask)
    else:
        sq = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, n_cols, BLOCK):
            mask = c0 + cols < n_cols
            x = tl.load(x_row + c0 + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = x.to(tl.float32) + tl.load(res_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                x = x.to(res_ptr.dtype.element_ty)
                tl.store(res_row + c0 + cols, x, mask=mask)
            xf = x.to(tl.float32)
            sq += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / n_cols + eps)
        for c0 in range(0, n_cols, BLOCK):
            mask = c0 + cols < n_cols
            if HAS_RESIDUAL:
                xf = tl.load(res_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                xf = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + c0 + cols, _scaled(xf, rstd, w, dtype, OFFSET, FP32_WEIGHT).to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, offset: bool = False,
    fp32_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton: same contract as `rms_norm_ref`, any row width; `residual` (contiguous, x's shape)
    is updated in place."""
    n = x.shape[-1]
    x = x.contiguous()
    if residual is not None:
        assert residual.is_contiguous() and residual.shape == x.shape, (residual.shape, x.shape)
    out = torch.empty_like(x)
    rows = x.numel() // n if n else 0
    block = min(_MAX_BLOCK, triton.next_power_of_2(n))
    if rows:
        _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, n, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=block, ONE_BLOCK=n <= block, OFFSET=offset,
                                  FP32_WEIGHT=fp32_weight,
                                  num_warps=min(16, max(4, block // 512)))
    return out, residual
