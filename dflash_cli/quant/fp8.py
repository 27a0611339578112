"""FP8 (e4m3) weight-only: dflash's one internal layout, its torch reference dequantizer and forward.

Every FP8 format is one weight [..., out, in] of float8_e4m3fn and one grid of scales over blocks of
`block = (rows, cols)`, multiplied: W = q · s[o // rows, k // cols]. Qwen/DeepSeek's fine-grained
checkpoints are blocks of 128×128 (`weight_scale_inv`; the edge blocks are partial); compressed-tensors'
per-channel scale [out, 1] is blocks of (1, in), its per-tensor scale blocks of (out, in), its block
strategy the block it names. The product is taken in fp32, as transformers and compressed-tensors do,
then cast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DflashError
from .layout import QuantizedLinear, cat_bias


@dataclass
class Fp8Linear(QuantizedLinear):
    STACKED = ("weight", "scale", "bias")
    OP = "fp8_linear"

    weight: torch.Tensor  # float8_e4m3fn [..., out, in]
    scale: torch.Tensor  # fp32 (or bf16) [..., ceil(out/rows), ceil(in/cols)]
    block: tuple[int, int]
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows, cols = self.block
        out, inn = self.weight.shape[-2:]
        assert self.weight.dtype == torch.float8_e4m3fn, self.weight.dtype
        assert self.scale.shape == (*self.weight.shape[:-2], -(-out // rows), -(-inn // cols)), \
            (self.scale.shape, self.weight.shape, self.block)

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q · s in fp32 (cropping the partial edge blocks), cast to `dtype` (default: the scale's)."""
        rows, cols = self.block
        out, inn = self.weight.shape[-2:]
        s = self.scale.to(torch.float32).repeat_interleave(rows, -2).repeat_interleave(cols, -1)[..., :out, :inn]
        w = self.weight.to(torch.float32) * s
        return w.to(self.scale.dtype if dtype is None else dtype)

    @classmethod
    def stack_experts(cls, experts: list["Fp8Linear"]) -> "Fp8Linear":
        """Per-expert projections as one [experts, out, in] stack (Qwen's FP8 stores experts un-fused)."""
        if any(e.block != experts[0].block or e.weight.shape != experts[0].weight.shape for e in experts):
            raise DflashError("experts with different FP8 shapes or blocks cannot be stacked")
        return cls._stack(experts)

    @classmethod
    def cat_rows(cls, parts: list["Fp8Linear"]) -> "Fp8Linear":
        """Several projections of one input stacked by output rows (q/k/v, gate/up): one GEMM. Per-tensor
        scales become per-channel; blocks must not straddle two projections."""
        if len(parts) == 1:
            return parts[0]
        if any(p.block[0] == p.out_features and p.block[1] == p.in_features for p in parts):
            parts = [p.per_channel() if p.block[0] == p.out_features and p.block[1] == p.in_features else p
                     for p in parts]
        block = parts[0].block
        if any(p.block != block or p.in_features != parts[0].in_features for p in parts) or \
                any(p.out_features % block[0] for p in parts[:-1]):
            raise DflashError(f"FP8 projections with blocks {[p.block for p in parts]} cannot be stacked into one GEMM")
        return cls(torch.cat([p.weight for p in parts], -2), torch.cat([p.scale for p in parts], -2), block,
                   cat_bias(parts))

    def per_channel(self) -> "Fp8Linear":
        """The same weights with one scale per output row (a per-tensor scale repeated)."""
        rows, cols = self.block
        assert cols >= self.in_features
        scale = self.scale.repeat_interleave(rows, -2)[..., :self.out_features, :]
        return Fp8Linear(self.weight, scale, (1, cols), self.bias)
