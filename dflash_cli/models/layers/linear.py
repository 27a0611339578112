"""The projection seam: every projection of every family is a `Linear`, never a raw tensor.

`Dense` holds the weight (and bias) as loaded and runs `ops.dense_linear`: F.linear (cuBLAS), or with
DFLASH_LINEAR=invariant the batch-invariant kernel for a step's rows (kernels/invariant_linear.py).
A quantized kind (int4 / fp8 weight only: quant.Int4Linear, quant.Fp8Linear) is one more class with the
same `__call__`. The loader (checkpoint.read_weights) reads a quantized checkpoint's projections as they
are stored (packed words, scales, zeros: never dequantized at load) and marks them in the weight dict it
returns (`Tensors.quantized`: module name → its WeightScheme); `take_linear`, the one place every layer
reads a projection through, builds each projection as the kind its tensors are stored in. No family
changes when one is added.

Projections stacked into one GEMM (q/k/v, gate/up, a Gated DeltaNet's in_proj) stay one projection when
they are stored alike; where they are not (Qwen's FP8 keeps in_proj_a/in_proj_b in bf16 beside an FP8
in_proj_qkv/in_proj_z), `Concat` runs each run of one kind and concatenates the outputs, which is the
same row by row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ... import ops
from ...errors import DflashError
from ...quant import Fp8Linear, Int4Linear, Int8Linear, read_projection
from ...quant.readers import STORED


@runtime_checkable
class Linear(Protocol):
    """x [..., in] -> [..., out]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Tensors(dict):
    """A checkpoint's tensors by name, as the loader returns them, with the projections it read quantized:
    `quantized[module]` is the module's WeightScheme, its stored tensors under `module + "." + key` (the
    format's own keys: weight_packed, qweight, weight_scale_inv ...)."""

    def __init__(self, *args, quantized: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.quantized = dict(quantized or {})


@dataclass
class Dense:
    weight: torch.Tensor  # [out, in], as loaded
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dense_linear(x, self.weight, self.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], *names: str, bias: bool = False) -> "Dense":
        """Pop the weights `name + ".weight"` (and biases) from `w`; several are stacked by rows into
        one projection (one GEMM)."""
        weights = [w.pop(n + ".weight") for n in names]
        biases = [w.pop(n + ".bias") for n in names] if bias else None
        stack = weights[0] if len(weights) == 1 else torch.cat(weights)
        return cls(stack, None if biases is None else biases[0] if len(biases) == 1 else torch.cat(biases))


@dataclass
class Concat:
    """Projections of one input stored in different kinds: each run, outputs concatenated (row by row the
    same as one stacked GEMM)."""

    parts: list

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype


def quantized_scheme(w: dict[str, torch.Tensor], name: str):
    """The WeightScheme of projection `name` when the loader read it quantized, else None."""
    return getattr(w, "quantized", {}).get(name)


def take_one(w: dict[str, torch.Tensor], name: str, bias: bool = False, dense_key: str | None = None):
    """Projection `name`, popped from `w`, as the kind it is stored in. `dense_key`: where its dense weight
    sits (default `name + ".weight"`; fused experts: the name itself)."""
    scheme = quantized_scheme(w, name)
    if scheme is None:
        weight = w.pop(name + ".weight" if dense_key is None else dense_key)
        return Dense(weight, w.pop(name + ".bias") if bias else None)
    required, optional = STORED[scheme.format]
    if bias and f"{name}.bias" not in w:
        raise DflashError(f"{name}.bias is missing")
    keys = (*required, *optional, *(("bias",) if bias else ()))
    return read_projection(name, {k: w.pop(f"{name}.{k}") for k in keys if f"{name}.{k}" in w}, scheme)


def take_linear(w: dict[str, torch.Tensor], *names: str, bias: bool = False,
                rows: dict[str, torch.Tensor] | None = None) -> Linear:
    """The projection `names` (stacked by rows when several) from the checkpoint's tensors `w`, popped, as
    the Linear kind they are stored in (Dense, or Int4Linear / Fp8Linear where the loader read them
    quantized). `rows[name]`: the order in which that projection's output rows are taken (Qwen3.5's
    per-head interleaved query/gate rows, regrouped)."""
    parts = [take_one(w, n, bias) for n in names]
    if rows:
        parts = [permute_rows(p, rows[n]) if n in rows else p for n, p in zip(names, parts)]
    return stack_rows(parts)


def permute_rows(lin, order: torch.Tensor):
    """`lin` with its output rows taken in `order` (exact: every format scales each row on its own, an FP8
    block grid is split into rows where the order cuts its blocks)."""
    order = order.to(torch.long)
    if isinstance(lin, Dense):
        order = order.to(lin.weight.device)
        return Dense(lin.weight.index_select(0, order), None if lin.bias is None else lin.bias.index_select(0, order))
    bias = None if lin.bias is None else lin.bias.index_select(-1, order.to(lin.bias.device))
    if isinstance(lin, Int4Linear):
        order = order.to(lin.qweight.device)
        pick = lambda t: t.index_select(-2, order)  # noqa: E731
        return Int4Linear(pick(lin.qweight), pick(lin.scales), None if lin.zeros is None else pick(lin.zeros),
                          lin.group_size, lin.in_features, lin.input_perm, bias)
    if isinstance(lin, Fp8Linear):
        order = order.to(lin.weight.device)
        r = lin.block[0]
        by_block = order.view(-1, r) if r > 1 and order.numel() % r == 0 else None
        whole_blocks = by_block is not None and lin.out_features % r == 0 and bool((by_block[:, 0] % r == 0).all()) \
            and torch.equal(by_block, by_block[:, :1] + torch.arange(r, device=order.device))
        if whole_blocks:
            return Fp8Linear(lin.weight.index_select(-2, order), lin.scale.index_select(-2, by_block[:, 0] // r),
                             lin.block, bias)
        rowwise = fp8_row_blocks(lin, lin.block[1])
        return Fp8Linear(rowwise.weight.index_select(-2, order), rowwise.scale.index_select(-2, order),
                         rowwise.block, bias)
    if isinstance(lin, Int8Linear):
        order = order.to(lin.weight.device)
        return Int8Linear(lin.weight.index_select(-2, order), lin.scale.index_select(-2, order), bias)
    raise DflashError(f"cannot reorder the rows of a {type(lin).__name__} projection")


def fp8_row_blocks(lin: Fp8Linear, cols: int) -> Fp8Linear:
    """The same FP8 weights with one scale per row and per `cols` input columns (`cols` divides the block's
    columns, or the block spans every column): exact, the scale of each element is unchanged."""
    r, c = lin.block
    if c < lin.in_features and c % cols:
        raise DflashError(f"FP8 blocks of {c} columns cannot be split into blocks of {cols}")
    scale = lin.scale.repeat_interleave(r, -2)[..., :lin.out_features, :] if r > 1 else lin.scale
    pick = (torch.arange(-(-lin.in_features // cols), device=scale.device) * cols) // c
    return Fp8Linear(lin.weight, scale.index_select(-1, pick), (1, cols), lin.bias)


def _stack_fp8(parts: list[Fp8Linear]) -> Fp8Linear:
    try:
        return Fp8Linear.cat_rows(parts)
    except DflashError:  # different or misaligned blocks: one scale per row, over the finest column blocks
        spans = [p.block[1] for p in parts if p.block[1] < p.in_features]
        cols = math.gcd(*spans) if spans else parts[0].in_features
        return Fp8Linear.cat_rows([fp8_row_blocks(p, cols) for p in parts])


def stack_rows(parts: list):
    """Projections of one input stacked by output rows: one projection where they are stored alike, else
    a `Concat` of the runs that are."""
    if len(parts) == 1:
        return parts[0]
    runs: list[list] = []
    for p in parts:
        if runs and type(runs[-1][0]) is type(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    stacked = []
    for run in runs:
        kind = type(run[0])
        if len(run) == 1:
            stacked.append(run[0])
        elif kind is Dense:
            if any((p.bias is None) != (run[0].bias is None) for p in run):
                raise DflashError("projections stacked into one GEMM have biases on some rows only")
            stacked.append(Dense(torch.cat([p.weight for p in run]),
                                 None if run[0].bias is None else torch.cat([p.bias for p in run])))
        elif kind is Int4Linear:
            try:
                stacked.append(Int4Linear.cat_rows(run))
            except DflashError:  # e.g. act-order permutations that differ: one GEMM each
                stacked.extend(run)
        elif kind is Fp8Linear:
            stacked.append(_stack_fp8(run))
        elif kind is Int8Linear:
            stacked.append(Int8Linear.cat_rows(run))
        else:
            stacked.extend(run)
    return stacked[0] if len(stacked) == 1 else Concat(stacked)
