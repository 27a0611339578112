"""RMSNorm with an optional fused residual add.

`rms_norm(x, w, eps, residual)` adds `x` into `residual` in place and normalises the sum, so a
decoder layer reads the residual stream once per norm instead of twice.
"""
from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: `residual += x` (in place, when given), then RMSNorm of the sum over the last dim.

    Numerics follow Hugging Face: the statistic in float32, the scale applied in the input dtype.
    Returns (normed, residual).
    """
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), residual
