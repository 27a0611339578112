"""What dflash's weight-only layouts (int4.Int4Linear, fp8.Fp8Linear, int8.Int8Linear) share: the reference
forward, the step's forward through ops, and the expert stacks, written once.

A layout is a dataclass whose tensors with the leading expert dims ([..., out, *]: the packed weight
first, then its scales, zero points, the bias [..., out]) are named in `STACKED`; it gives `dequantize` and
`OP`, the ops function that runs a step's rows (None: the reference is the forward).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F

Q = TypeVar("Q", bound="QuantizedLinear")


class QuantizedLinear:
    STACKED: ClassVar[tuple[str, ...]]  # the tensors that carry the experts' leading dims, the packed weight first
    OP: ClassVar[str | None] = None  # ops.<OP>(x, self) runs a step's rows; None: the reference forward
    bias: torch.Tensor | None

    @property
    def packed(self) -> torch.Tensor:
        return getattr(self, self.STACKED[0])

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        """The scales' dtype (STACKED[1]): what the reference dequantizer rounds to."""
        return getattr(self, self.STACKED[1]).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: F.linear with the dequantized weight in the activations' dtype."""
        assert self.packed.dim() == 2, "a stack of experts has no single forward: take .expert(i)"
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The projection as a model step runs it (ops.int4_linear, ops.int8_linear, ops.fp8_linear): up to
        ops.MAX_INVARIANT_ROWS rows go through the batch-invariant kernel on the kernel path (CUDA, or
        DFLASH_KERNELS=triton; kernels/quant_linear.py), which dequantizes in registers, so a row rounds the
        same alone or in a verify block; elsewhere its torch reference (the dequantized weight, the product in
        fp32, rounded once). More rows (prefill) dequantize the whole weight into x's dtype and run F.linear.
        A layout without a kernel (OP None) runs its reference."""
        if self.OP is None:
            return self.forward(x)
        assert self.packed.dim() == 2, "a stack of experts has no single forward: take .expert(i)"
        from .. import ops

        return getattr(ops, self.OP)(x, self)

    def _map(self: Q, fn: Callable[[torch.Tensor], torch.Tensor]) -> Q:
        """This layout with `fn` applied to each tensor that carries the experts' leading dims."""
        return dataclasses.replace(self, **{k: fn(getattr(self, k)) for k in self.STACKED
                                            if getattr(self, k) is not None})

    def expert(self: Q, i: int) -> Q:
        """Expert `i` of a stack [experts, out, in]."""
        assert self.packed.dim() == 3
        return self._map(lambda t: t[i])

    def take_experts(self: Q, index: torch.Tensor) -> Q:
        """The experts `index` of a stack, still packed (one copy per entry)."""
        return self._map(lambda t: t[index])

    @classmethod
    def _stack(cls: type[Q], experts: list[Q]) -> Q:
        """Per-expert projections (checked alike by the caller) as one [experts, out, in] stack."""
        first = experts[0]
        return dataclasses.replace(first, **{k: torch.stack([getattr(e, k) for e in experts]) for k in cls.STACKED
                                             if getattr(first, k) is not None})


def cat_bias(parts: list) -> torch.Tensor | None:
    """The biases of projections stacked by output rows (zeros for a part without one); None when none has one."""
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([torch.zeros(p.out_features, dtype=p.dtype) if p.bias is None else p.bias for p in parts], -1)
