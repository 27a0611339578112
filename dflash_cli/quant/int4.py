"""W4A16: dflash's one internal int4 layout, its torch reference dequantizer and F.linear forward.

Every on-disk int4 format (compressed-tensors pack-quantized, GPTQ v1/v2, AutoAWQ GEMM: readers.py) is
repacked at load into this layout, so one kernel family serves them all:

- `qweight` int32 [..., out, ceil(in/8)]: unsigned codes 0..15 packed along the input dimension, input
  column k at bits 4·(k % 8) of word k // 8 (rows contiguous along K, as a GEMV reads them);
- `scales` [..., out, in/group_size] in the checkpoint's dtype (fp16, bf16 or fp32);
- `zeros` uint8 [..., out, in/group_size] codes 0..15, or None for symmetric (z = 8);
- `input_perm` int64 [in] or None: act-order (GPTQ `g_idx`, compressed-tensors `weight_g_idx`) is
  resolved at load by sorting the columns so that every group is contiguous; the columns of `qweight`
  are then the input columns `input_perm`, and a kernel reads `x[..., input_perm]`. Trivial orders are
  dropped, so most checkpoints have none.

W[o, k] = (q[o, k] − z[o, k // g]) · s[o, k // g]. The product of a small integer and a scale is exact
in fp32; it is rounded once to the scale's dtype, as every format's reference dequantizer does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DflashError
from .layout import QuantizedLinear, cat_bias

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., n, k] in 0..15 → int32 [..., n, ceil(k/8)], column k at bits 4·(k % 8) of word k // 8."""
    c = F.pad(codes.to(torch.int32), (0, -codes.shape[-1] % 8)).reshape(*codes.shape[:-1], -1, 8)
    out = torch.zeros(c.shape[:-1], dtype=torch.int32, device=c.device)
    for j in range(8):  # OR in int32: the top nibble lands in the sign bit, as every format stores it
        out |= c[..., j] << (4 * j)
    return out


def unpack_int4_rows(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack_int4_rows`: int32 [..., n, words] → uint8 codes [..., n, k]."""
    nib = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # arithmetic shift; the mask drops the sign
    return nib.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.uint8)


def resolve_act_order(g_idx: torch.Tensor | None, in_features: int, group_size: int) -> torch.Tensor | None:
    """The column order that makes every group contiguous (None when the stored order already is).
    Refused by name when the groups are not all `group_size` columns: that layout has no contiguous form."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int64).reshape(-1)
    natural = torch.arange(in_features, device=g_idx.device) // group_size
    if g_idx.numel() != in_features:
        raise DflashError(f"g_idx has {g_idx.numel()} entries for {in_features} input columns")
    if torch.equal(g_idx, natural):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], natural):
        raise DflashError("an act-order g_idx whose groups are not all group_size columns is not supported")
    return perm


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@dataclass
class Int4Linear(QuantizedLinear):
    """One W4A16 projection (or a stack of experts: leading dims before [out, in]) in dflash's layout."""

    STACKED = ("qweight", "scales", "zeros", "bias")  # (input_perm: one order for every expert)
    OP = "int4_linear"

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    in_features: int
    input_perm: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out, words = self.qweight.shape[-2:]
        groups = self.in_features // self.group_size
        assert self.qweight.dtype == torch.int32 and words == -(-self.in_features // 8), (self.qweight.shape,)
        assert self.in_features % self.group_size == 0, (self.in_features, self.group_size)
        assert self.scales.shape == (*self.qweight.shape[:-1], groups), (self.scales.shape, self.qweight.shape)
        assert self.zeros is None or (self.zeros.shape == self.scales.shape and self.zeros.dtype == torch.uint8)
        assert self.input_perm is None or self.input_perm.shape == (self.in_features,)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                   g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> "Int4Linear":
        """From unpacked codes [..., out, in] in the checkpoint's column order (0..15, uint8 or wider) with
        per-group scales/zeros [..., out, groups] indexed by `g_idx` (act-order), repacked into the layout."""
        in_features = codes.shape[-1]
        if in_features % group_size:
            raise DflashError(f"{in_features} input columns are not a whole number of groups of {group_size}")
        perm = resolve_act_order(g_idx, in_features, group_size)
        if perm is not None:
            codes = codes.index_select(-1, perm.to(codes.device))
        if zeros is not None and bool((zeros == 8).all()):
            zeros = None  # a symmetric checkpoint stored with explicit zeros (GPTQ): the same weights
        return cls(pack_int4_rows(codes), scales.contiguous(), None if zeros is None else zeros.to(torch.uint8),
                   group_size, in_features, perm, bias)

    def codes(self) -> torch.Tensor:
        """uint8 [..., out, in] in the layout's (sorted) column order."""
        return unpack_int4_rows(self.qweight, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [..., out, in] in the checkpoint's input order: (q − z)·s rounded once to the scales'
        dtype, then cast to `dtype` when given."""
        q = self.codes().to(torch.float32)
        z = 8.0 if self.zeros is None else self.zeros.to(torch.float32).repeat_interleave(self.group_size, -1)
        s = self.scales.to(torch.float32).repeat_interleave(self.group_size, -1)
        w = ((q - z) * s).to(self.scales.dtype)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(-1, self.input_perm.to(w.device), w)
        return w if dtype is None else w.to(dtype)

    @classmethod
    def stack_experts(cls, experts: list["Int4Linear"]) -> "Int4Linear":
        """Per-expert projections (Qwen3-MoE's experts.N.gate_proj …) as one [experts, out, in] stack."""
        first = experts[0]
        for e in experts[1:]:
            if (e.group_size, e.in_features, e.dtype, e.zeros is None) != \
                    (first.group_size, first.in_features, first.dtype, first.zeros is None):
                raise DflashError("experts stored with different int4 schemes cannot be stacked")
            if not _same_perm(e.input_perm, first.input_perm):
                raise DflashError("experts with different act-order permutations cannot be stacked")
        return cls._stack(experts)

    @classmethod
    def cat_rows(cls, parts: list["Int4Linear"]) -> "Int4Linear":
        """Several projections of one input stacked by output rows (q/k/v, gate/up): one GEMM."""
        first = parts[0]
        if len(parts) == 1:
            return first
        for p in parts[1:]:
            if (p.group_size, p.in_features, p.dtype) != (first.group_size, first.in_features, first.dtype):
                raise DflashError("projections stacked into one GEMM differ in group size, width or scale dtype")
            if not _same_perm(p.input_perm, first.input_perm):
                raise DflashError("projections stacked into one GEMM have different act-order permutations")
        zeros = None
        if any(p.zeros is not None for p in parts):
            zeros = torch.cat([torch.full_like(p.scales, 8, dtype=torch.uint8) if p.zeros is None else p.zeros
                               for p in parts], -2)
        return cls(torch.cat([p.qweight for p in parts], -2), torch.cat([p.scales for p in parts], -2), zeros,
                   first.group_size, first.in_features, first.input_perm, cat_bias(parts))
