"""Each on-disk quantized format, read into dflash's layouts (int4.Int4Linear, fp8.Fp8Linear, int8.Int8Linear).

A reader takes one projection's tensors exactly as stored (int32 words, fp8, scales in their own dtype;
never cast to the model's dtype first) and repacks them. The conventions, per format:

- compressed-tensors pack-quantized: `weight_packed` int32 [..., out, ceil(in/8)], column k at bits 4·(k%8)
  of word k//8, stored as the signed value + 8 (that is our code); `weight_scale` [..., out, groups];
  `weight_zero_point` (asymmetric) signed + 8, packed the same way along the *output* dimension
  [..., ceil(out/8), groups]; `weight_shape`; `weight_g_idx` [in] (act-order "group", older checkpoints).
- GPTQ: `qweight` int32 [in/8, out] packed along the input, sequential nibbles; `qzeros` int32
  [groups, out/8] sequential; `scales` [groups, out]; `g_idx` [in]. checkpoint_format "gptq" (v1) stores
  each zero point minus one (so symmetric 4-bit stores 7 for 8), read back as (stored + 1) mod 16 like
  AutoGPTQ's reference; "gptq_v2" stores it as is.
- AutoAWQ GEMM: `qweight` int32 [in, out/8] packed along the *output*, nibble j of a word holding column
  [0, 2, 4, 6, 1, 3, 5, 7][j] of its eight; `qzeros` [groups, out/8] the same; `scales` [groups, out].
- FP8: `weight` float8_e4m3fn [..., out, in] and `weight_scale_inv` (Qwen/DeepSeek blocks, multiplied despite
  the name) or `weight_scale` (compressed-tensors: [1] per tensor, [out, 1] per channel, or blocks).
- compressed-tensors int-quantized 8-bit (what --quantize int8 writes): `weight` int8 [..., out, in] and
  `weight_scale` [..., out, 1], symmetric per output channel.
"""
from __future__ import annotations

import torch

from ..errors import DflashError
from .fp8 import Fp8Linear
from .int4 import Int4Linear, unpack_int4_rows
from .int8 import Int8Linear
from .layout import QuantizedLinear
from .plan import QuantPlan, WeightScheme

# the tensors each format stores per projection, beside the optional bias: (required, optional)
STORED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pack-quantized": (("weight_packed", "weight_scale"), ("weight_shape", "weight_zero_point", "weight_g_idx")),
    "gptq": (("qweight", "qzeros", "scales"), ("g_idx",)),
    "awq": (("qweight", "qzeros", "scales"), ()),
    "fp8-block": (("weight", "weight_scale_inv"), ()),
    "float-quantized": (("weight", "weight_scale"), ("input_scale",)),
    "int-quantized": (("weight", "weight_scale"), ()),
}

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble j of a word holds column AWQ_ORDER[j] of its 8
_AWQ_UNDO = torch.tensor([AWQ_ORDER.index(e) for e in range(8)])  # column e sits in nibble _AWQ_UNDO[e]


def stored_shapes(scheme: WeightScheme, out: int, inn: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The tensors one [out, in] projection stores in `scheme`'s format: suffix → (shape, dtype), dtype None
    where the checkpoint picks it (scales), for a weight table to read them raw and check their shapes.
    Optional tensors (GPTQ's g_idx, compressed-tensors' weight_g_idx) are not listed."""
    g = inn // (scheme.group_size or inn)
    words = -(-inn // 8)
    if scheme.format == "pack-quantized":
        t = {"weight_packed": ((out, words), torch.int32), "weight_scale": ((out, g), None),
             "weight_shape": ((2,), torch.int64)}
        return t | ({} if scheme.symmetric else {"weight_zero_point": ((-(-out // 8), g), torch.int32)})
    if scheme.format == "gptq":
        return {"qweight": ((words, out), torch.int32), "qzeros": ((g, -(-out // 8)), torch.int32),
                "scales": ((g, out), None)}
    if scheme.format == "awq":
        return {"qweight": ((inn, -(-out // 8)), torch.int32), "qzeros": ((g, -(-out // 8)), torch.int32),
                "scales": ((g, out), None)}
    if scheme.format == "int-quantized":
        return {"weight": ((out, inn), torch.int8), "weight_scale": ((out, 1), None)}
    rows, cols = scheme.block or ((1, inn) if scheme.strategy == "channel" else (out, inn))
    grid = (-(-out // rows), -(-inn // cols))
    if scheme.format == "float-quantized" and scheme.strategy == "tensor":
        grid = (1,)
    return {"weight": ((out, inn), torch.float8_e4m3fn),
            ("weight_scale_inv" if scheme.format == "fp8-block" else "weight_scale"): (grid, None)}


def _int4_check(name: str, t: torch.Tensor, key: str) -> torch.Tensor:
    if t.dtype != torch.int32:
        raise DflashError(f"{name}.{key} is {t.dtype}, not int32: is this checkpoint packed as its config says?")
    return t


def read_pack_quantized(name: str, t: dict[str, torch.Tensor], scheme: WeightScheme) -> Int4Linear:
    packed = _int4_check(name, t["weight_packed"], "weight_packed")
    scale = t["weight_scale"]
    out = packed.shape[-2]
    inn = int(t["weight_shape"].reshape(-1)[-1]) if "weight_shape" in t else packed.shape[-1] * 8
    if packed.shape[-1] != -(-inn // 8):
        raise DflashError(f"{name}.weight_packed has {packed.shape[-1]} words per row for {inn} columns")
    codes = unpack_int4_rows(packed, inn)
    group = scheme.group_size or inn
    if scale.shape[-2:] != (out, inn // group):
        raise DflashError(f"{name}.weight_scale has shape {tuple(scale.shape)}, expected [{out}, {inn // group}]")
    zeros = None
    if not scheme.symmetric:
        if "weight_zero_point" not in t:
            raise DflashError(f"{name}.weight_zero_point is missing from an asymmetric checkpoint")
        zp = _int4_check(name, t["weight_zero_point"], "weight_zero_point")  # packed along the output rows
        zeros = unpack_int4_rows(zp.transpose(-1, -2), out).transpose(-1, -2)
        if zeros.shape != scale.shape:
            raise DflashError(f"{name}.weight_zero_point has shape {tuple(zp.shape)}, which does not fit its scales")
    return Int4Linear.from_codes(codes, scale, zeros, group, t.get("weight_g_idx"), t.get("bias"))


def read_gptq(name: str, t: dict[str, torch.Tensor], scheme: WeightScheme) -> Int4Linear:
    qweight = _int4_check(name, t["qweight"], "qweight")
    if scheme.act_order and "g_idx" not in t:
        raise DflashError(f"{name}.g_idx is missing, and the quantization_config says desc_act (act-order)")
    inn, out = qweight.shape[-2] * 8, qweight.shape[-1]
    codes = unpack_int4_rows(qweight.transpose(-1, -2), inn)  # [out, in]
    scales = t["scales"].transpose(-1, -2)  # [out, groups]
    zeros = unpack_int4_rows(_int4_check(name, t["qzeros"], "qzeros"), out).transpose(-1, -2)
    if scheme.gptq_v1:
        zeros = (zeros + 1) & 0xF
    group = scheme.group_size or inn
    if scales.shape[-2:] != (out, inn // group) or zeros.shape != scales.shape:
        raise DflashError(f"{name}: scales {tuple(t['scales'].shape)} and qzeros {tuple(t['qzeros'].shape)} do not "
                          f"fit a [{inn}, {out}] weight in groups of {group}")
    return Int4Linear.from_codes(codes, scales, zeros, group, t.get("g_idx"), t.get("bias"))


def _awq_unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    raw = unpack_int4_rows(packed, cols)  # [rows, cols] in nibble order
    undo = (torch.arange(cols).view(-1, 8) // 8 * 8 + _AWQ_UNDO).view(-1)
    return raw.index_select(-1, undo.to(raw.device))


def read_awq(name: str, t: dict[str, torch.Tensor], scheme: WeightScheme) -> Int4Linear:
    qweight = _int4_check(name, t["qweight"], "qweight")
    inn, out = qweight.shape[-2], qweight.shape[-1] * 8
    codes = _awq_unpack(qweight, out).transpose(-1, -2)  # [out, in]
    zeros = _awq_unpack(_int4_check(name, t["qzeros"], "qzeros"), out).transpose(-1, -2)
    scales = t["scales"].transpose(-1, -2)
    group = scheme.group_size or inn
    if scales.shape[-2:] != (out, inn // group) or zeros.shape != scales.shape:
        raise DflashError(f"{name}: scales {tuple(t['scales'].shape)} and qzeros {tuple(t['qzeros'].shape)} do not "
                          f"fit a [{inn}, {out}] weight in groups of {group}")
    return Int4Linear.from_codes(codes, scales, zeros, group, None, t.get("bias"))


def read_fp8(name: str, t: dict[str, torch.Tensor], scheme: WeightScheme) -> Fp8Linear:
    weight = t["weight"]
    if weight.dtype != torch.float8_e4m3fn:
        raise DflashError(f"{name}.weight is {weight.dtype}, not float8_e4m3fn as the quantization_config says")
    scale = t["weight_scale_inv" if scheme.format == "fp8-block" else "weight_scale"]
    out, inn = weight.shape[-2:]
    lead = weight.shape[:-2]
    if scheme.block is not None:
        block = scheme.block
    elif scale.numel() == 1 or scale.shape == (*lead, 1) or scale.shape == (*lead, 1, 1):
        block, scale = (out, inn), scale.reshape(*lead, 1, 1)  # per tensor
    elif scale.shape == (*lead, out, 1) or scale.shape == (*lead, out):
        block, scale = (1, inn), scale.reshape(*lead, out, 1)  # per channel
    else:
        raise DflashError(f"{name}: a scale of shape {tuple(scale.shape)} fits neither per-tensor nor per-channel")
    expected = (*lead, -(-out // block[0]), -(-inn // block[1]))
    if tuple(scale.shape) != expected:
        raise DflashError(f"{name}: scale has shape {tuple(scale.shape)}, expected {list(expected)} for blocks {block}")
    return Fp8Linear(weight, scale, block, t.get("bias"))


def read_int8(name: str, t: dict[str, torch.Tensor], scheme: WeightScheme) -> Int8Linear:
    weight, scale = t["weight"], t["weight_scale"]
    if weight.dtype != torch.int8:
        raise DflashError(f"{name}.weight is {weight.dtype}, not int8 as the quantization_config says")
    lead = weight.shape[:-1]
    if scale.shape == lead:
        scale = scale.unsqueeze(-1)
    if tuple(scale.shape) != (*lead, 1):
        raise DflashError(f"{name}.weight_scale has shape {tuple(scale.shape)}, expected {[*lead, 1]} (per channel)")
    return Int8Linear(weight, scale, t.get("bias"))


READERS = {"pack-quantized": read_pack_quantized, "gptq": read_gptq, "awq": read_awq,
           "fp8-block": read_fp8, "float-quantized": read_fp8, "int-quantized": read_int8}


def read_projection(name: str, t: dict[str, torch.Tensor], scheme: WeightScheme) -> QuantizedLinear:
    """One projection from its tensors `t` (keys without the "name." prefix)."""
    required, _ = STORED[scheme.format]
    missing = [k for k in required if k not in t]
    if missing:
        raise DflashError(f"{name}: the quantization_config says {scheme.format}, but {name}.{missing[0]} is missing")
    return READERS[scheme.format](name, t, scheme)


def _stored_plain(w: dict[str, torch.Tensor], name: str, scheme: WeightScheme) -> bool:
    weight = w.get(f"{name}.weight")
    if weight is None or weight.dtype in (torch.float8_e4m3fn, torch.int8):
        return False
    return not any(f"{name}.{k}" in w for k in STORED[scheme.format][0] if k != "weight")


def take_quantized(w: dict[str, torch.Tensor], *names: str, plan: QuantPlan | None,
                   bias: bool = False) -> QuantizedLinear | None:
    """Pop the projection `names` (stacked by rows when several, as one GEMM) from the checkpoint's tensors
    `w` when the plan says they are quantized; None (nothing popped) when they are stored plain."""
    schemes = [None if plan is None else plan.scheme_for(n) for n in names]
    # a class target ("Linear") matches what transformers builds as nn.Linear, which dflash cannot see: a
    # projection stored plain (a `weight` that is not fp8, none of the format's tensors) is read plain
    schemes = [None if s is None or _stored_plain(w, n, s) else s for n, s in zip(names, schemes)]
    if all(s is None for s in schemes):
        return None
    if any(s is None for s in schemes) or len({s.format for s in schemes}) > 1:
        raise DflashError(f"{', '.join(names)} are stored partly quantized, partly not: they cannot share one GEMM")
    parts = []
    for n, scheme in zip(names, schemes):
        required, optional = STORED[scheme.format]
        if bias and f"{n}.bias" not in w:
            raise DflashError(f"{n}.bias is missing")
        t = {k: w.pop(f"{n}.{k}") for k in (*required, *optional, *(("bias",) if bias else ())) if f"{n}.{k}" in w}
        parts.append(read_projection(n, t, scheme))
    kind = type(parts[0])
    return kind.cat_rows(parts)
