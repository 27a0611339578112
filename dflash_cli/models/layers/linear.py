"""The projection seam: every projection of every family is a `Linear`, never a raw tensor.

`Dense` holds the weight (and bias) as loaded and runs `ops.dense_linear`: F.linear (cuBLAS), or with
DFLASH_LINEAR=invariant the batch-invariant kernel for a step's rows (kernels/invariant_linear.py).
A quantized kind (int4 / fp8 weight only, dflash_cli/quant) is one more class with the same
`__call__`: its tensors enter the weight tables where the checkpoint's `quantization_config` says so,
and `take_linear`, the one place every layer reads a projection through, picks the class from the
tensors the checkpoint holds. No family changes when one is added.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ... import ops


@runtime_checkable
class Linear(Protocol):
    """x [..., in] -> [..., out]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Dense:
    weight: torch.Tensor  # [out, in], as loaded
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dense_linear(x, self.weight, self.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], *names: str, bias: bool = False) -> "Dense":
        """Pop the weights `name + ".weight"` (and biases) from `w`; several are stacked by rows into
        one projection (one GEMM)."""
        weights = [w.pop(n + ".weight") for n in names]
        biases = [w.pop(n + ".bias") for n in names] if bias else None
        stack = weights[0] if len(weights) == 1 else torch.cat(weights)
        return cls(stack, None if biases is None else biases[0] if len(biases) == 1 else torch.cat(biases))


def take_linear(w: dict[str, torch.Tensor], *names: str, bias: bool = False) -> Linear:
    """The projection `names` (stacked by rows when several) from the checkpoint's tensors `w`, popped, as
    the Linear kind they are stored in. Every checkpoint dflash reads today stores its projections
    dense (gpt-oss's MXFP4 covers its experts only: models/layers/mlp.py)."""
    return Dense.take(w, *names, bias=bias)
