"""W8A16: dflash's int8 weight-only layout, its torch reference dequantizer and F.linear forward.

What `--quantize int8` writes (compressed-tensors `int-quantized`, symmetric, per output channel) is read
into this layout: `weight` int8 [..., out, in] and `scale` [..., out, 1] in the checkpoint's dtype, so
W[o, k] = q[o, k] · s[o]. The product is taken in fp32 and rounded once to the scale's dtype, as
compressed-tensors' decompressor does. A step's rows run ops.int8_linear (kernels/quant_linear.py: the
int8 member of the batch-invariant quantized linear family, dequantizing in registers, one byte a weight);
this reference is its contract.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DflashError
from .layout import QuantizedLinear, cat_bias


@dataclass
class Int8Linear(QuantizedLinear):
    STACKED = ("weight", "scale", "bias")
    OP = "int8_linear"

    weight: torch.Tensor  # int8 [..., out, in]
    scale: torch.Tensor  # [..., out, 1], the checkpoint's float dtype
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.weight.dtype == torch.int8, self.weight.dtype
        assert self.scale.shape == (*self.weight.shape[:-1], 1), (self.scale.shape, self.weight.shape)

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q · s in fp32, rounded once to the scale's dtype, then cast to `dtype` when given."""
        w = (self.weight.to(torch.float32) * self.scale.to(torch.float32)).to(self.scale.dtype)
        return w if dtype is None else w.to(dtype)

    @classmethod
    def stack_experts(cls, experts: list["Int8Linear"]) -> "Int8Linear":
        """Per-expert projections as one [experts, out, in] stack."""
        first = experts[0]
        if any(e.weight.shape != first.weight.shape or e.dtype != first.dtype for e in experts):
            raise DflashError("experts with different int8 shapes or scale dtypes cannot be stacked")
        return cls._stack(experts)

    @classmethod
    def cat_rows(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """Several projections of one input stacked by output rows (q/k/v, gate/up): one GEMM."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if any(p.in_features != first.in_features or p.dtype != first.dtype for p in parts):
            raise DflashError("int8 projections stacked into one GEMM differ in width or scale dtype")
        return cls(torch.cat([p.weight for p in parts], -2), torch.cat([p.scale for p in parts], -2), cat_bias(parts))
