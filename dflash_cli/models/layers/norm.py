"""RMSNorm in the three styles the families use, one kernel (ops.rms_norm) behind them all.

- "plain": x / rms(x) · w, the weight in the model's dtype (Qwen3, Llama, the drafters);
- "offset": zero-centred, (1 + w) applied in fp32 (Qwen3.5);
- "fp32": the fp32 weight applied before the one rounding (gpt-oss).
Called with a residual it adds it first and returns (normed, new residual), fused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops

STYLES = ("plain", "offset", "fp32")


@dataclass
class RMSNorm:
    weight: torch.Tensor
    eps: float
    style: str = "plain"

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.style == "offset":
            return ops.rms_norm(x, self.weight, self.eps, residual, offset=True)
        if self.style == "fp32":
            return ops.rms_norm(x, self.weight, self.eps, residual, fp32_weight=True)
        return ops.rms_norm(x, self.weight, self.eps, residual)

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], name: str, eps: float, style: str = "plain") -> "RMSNorm":
        assert style in STYLES, style
        return cls(w.pop(name), eps, style)


@dataclass
class GatedRMSNorm:
    """The Gated DeltaNet output norm: rms_norm(x) · w · silu(z), per head, w applied as is. The layer runs
    it as the epilogue of its rule (ops.gdn_rule_norm); called, it runs alone."""

    weight: torch.Tensor  # [head_dim] fp32
    eps: float

    def __call__(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.eps)
