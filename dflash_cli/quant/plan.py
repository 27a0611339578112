"""Which projections of a checkpoint are quantized, and how: read from config.json's `quantization_config`.

`plan_of(raw)` returns a `QuantPlan` (None for a plain checkpoint), whose `scheme_for(module)` names the
stored format of one projection, or None where it is stored plain (`ignore`, `modules_to_not_convert`).
Every variant dflash does not read is refused here, by name, in one line, before a tensor is read.
config.py's QUANTIZATION_FORMATS names the families each quant_method runs on (every family whose
projections go through models/layers/linear.take_linear); the rest are refused there before a weight is read.
`target_plan(raw)` is the plan the loader reads a target with (None for gpt-oss's MXFP4, which its family
reads itself).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import quantization_of
from ..errors import DflashError

READS = ("int4 weights (compressed-tensors pack-quantized, GPTQ v1/v2, AutoRound auto_gptq/auto_awq, AutoAWQ GEMM)"
         " and FP8 e4m3 weights (Qwen/DeepSeek block, compressed-tensors float-quantized)"
         " and int8 weights (compressed-tensors int-quantized, symmetric per channel: what --quantize int8 writes)")


@dataclass(frozen=True)
class WeightScheme:
    """How one projection's weight is stored."""

    format: str  # "pack-quantized" | "gptq" | "awq" | "fp8-block" | "float-quantized" | "int-quantized"
    group_size: int | None = None  # int4: input columns per scale; None: one group per row (channel)
    symmetric: bool = True
    gptq_v1: bool = False  # GPTQ v1 (checkpoint_format "gptq") stores each zero point minus one
    act_order: bool = False  # GPTQ desc_act: the projection must store its g_idx
    strategy: str = ""  # float-quantized: "tensor" | "channel" | "block"
    block: tuple[int, int] | None = None  # fp8: the (rows, cols) of one scale
    activations: str = ""  # dynamic activation quantization the checkpoint asks for, run in bf16 instead


@dataclass(frozen=True)
class QuantPlan:
    method: str
    groups: tuple[tuple[tuple[str, ...], WeightScheme], ...]  # (targets, scheme); the first match wins
    ignore: tuple[str, ...] = ()
    hf_ignore: bool = False  # `modules_to_not_convert` (transformers' matching) rather than compressed-tensors'

    def scheme_for(self, module: str) -> WeightScheme | None:
        """The scheme of the projection `module` (its name without ".weight"), None where it is plain."""
        ignored = _hf_match if self.hf_ignore else _ct_match
        if any(ignored(module, pattern) for pattern in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_ct_match(module, t) for t in targets):
                return scheme
        return None


def _ct_match(module: str, target: str) -> bool:
    """compressed-tensors' matching: "re:<regex>" from the start, a class name ("Linear": every projection
    dflash asks about), else the exact module name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", "*") or target == module


def _hf_match(module: str, key: str) -> bool:
    """transformers' `should_convert_module`: a regex from the start to a module boundary, or a suffix."""
    return re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", module) is not None or module.endswith(key)


def _refuse(what: str) -> DflashError:
    return DflashError(f"quantization_config: {what} is not supported; dflash reads {READS}")


def plan_of(raw: dict) -> QuantPlan | None:
    """The plan for a config.json (or its text_config), None when it is not quantized."""
    quant = quantization_of(raw)
    if quant is None:
        return None
    method = str(quant.get("quant_method") or "unknown").lower()
    readers = {"compressed-tensors": _compressed_tensors, "gptq": _gptq, "awq": _awq, "fp8": _fp8,
               "auto-round": _auto_round, "autoround": _auto_round, "intel/auto-round": _auto_round}
    if method not in readers:
        runs = "; gpt-oss's MXFP4 experts are read by its own family" if method == "mxfp4" else ""
        raise _refuse(f"quant_method {method!r}{runs}")
    return readers[method](quant)


def target_plan(raw: dict) -> QuantPlan | None:
    """The plan checkpoint.read_weights reads a target's projections with; None for a plain checkpoint and
    for MXFP4 (gpt-oss's experts, read by its family as raw bytes)."""
    quant = quantization_of(raw)
    if quant is None or str(quant.get("quant_method") or "").lower() == "mxfp4":
        return None
    return plan_of(raw)


def _int(quant: dict, key: str, default: int | None = None) -> int | None:
    value = quant.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DflashError(f"quantization_config: {key} is {value!r}, not an integer")
    return value


def _group(quant: dict, method: str) -> int | None:
    g = _int(quant, "group_size", 128)
    if g == -1 or g is None:
        return None  # one group per output row
    if g <= 0 or g % 8:
        raise _refuse(f"{method} group_size {g}")
    return g


def _gptq(quant: dict) -> QuantPlan:
    bits = _int(quant, "bits", 4)
    if bits != 4:
        raise _refuse(f"gptq bits={bits}")
    fmt = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(f"gptq checkpoint_format {fmt!r}")
    if str(quant.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise _refuse(f"gptq pack_dtype {quant['pack_dtype']!r}")
    ignore = list(quant.get("modules_to_not_convert") or [])
    for key in quant.get("dynamic") or {}:  # gptqmodel's per-module overrides: "-:regex" skips a module
        if not str(key).startswith("-:"):
            raise _refuse(f"gptq dynamic per-module override {key!r}")
        ignore.append(str(key)[2:])
    if not quant.get("lm_head", False):
        ignore.append("lm_head")
    scheme = WeightScheme("gptq", _group(quant, "gptq"), bool(quant.get("sym", True)), gptq_v1=fmt == "gptq",
                          act_order=bool(quant.get("desc_act", False)))
    return QuantPlan("gptq", ((("Linear",), scheme),), tuple(ignore), hf_ignore=True)


def _awq(quant: dict) -> QuantPlan:
    bits = _int(quant, "bits", _int(quant, "w_bit", 4))
    version = str(quant.get("version") or "gemm").lower()
    if bits != 4:
        raise _refuse(f"awq bits={bits}")
    if version != "gemm":
        raise _refuse(f"awq version {version!r} (only AutoAWQ GEMM)")
    if not quant.get("zero_point", True):
        raise _refuse("awq zero_point false")
    group = _int(quant, "group_size", _int(quant, "q_group_size", 128))
    if group is None or group <= 0 or group % 8:
        raise _refuse(f"awq group_size {group}")
    ignore = tuple(quant.get("modules_to_not_convert") or ()) + ("lm_head",)
    return QuantPlan("awq", ((("Linear",), WeightScheme("awq", group, symmetric=False)),), ignore, hf_ignore=True)


def _auto_round(quant: dict) -> QuantPlan:
    packing = str(quant.get("packing_format") or "").lower()
    if int(quant.get("act_bits", 16) or 16) < 16:
        raise _refuse(f"auto-round act_bits={quant['act_bits']}")
    if str(quant.get("data_type", "int")).lower() != "int":
        raise _refuse(f"auto-round data_type {quant['data_type']!r}")
    if packing.endswith("auto_gptq"):  # AutoGPTQ's packing: its zero points minus one (v1)
        plan = _gptq({**quant, "checkpoint_format": "gptq"})
    elif packing.endswith("auto_awq"):
        plan = _awq({**quant, "zero_point": True, "version": "gemm"})
    else:
        raise _refuse(f"auto-round packing_format {packing or '(none)'!r}")
    ignore = list(plan.ignore)
    for name, over in (quant.get("extra_config") or {}).items():  # per-module overrides
        if int(over.get("bits", 4)) >= 16:
            ignore.append(name)
        elif any(over.get(k, quant.get(k)) != quant.get(k) for k in ("bits", "group_size", "sym")):
            raise _refuse(f"auto-round extra_config for {name} ({over})")
    return QuantPlan("auto-round", plan.groups, tuple(ignore), hf_ignore=True)


def _fp8(quant: dict) -> QuantPlan:
    fmt = str(quant.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise _refuse(f"fp8 fmt {fmt!r}")
    acts = str(quant.get("activation_scheme", "dynamic")).lower()
    if acts != "dynamic":
        raise _refuse(f"fp8 activation_scheme {acts!r}")
    block = quant.get("weight_block_size")
    if block is not None and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
        raise _refuse(f"fp8 weight_block_size {block!r}")
    scheme = WeightScheme("fp8-block", block=None if block is None else (block[0], block[1]),
                          strategy="block" if block else "tensor", activations="dynamic fp8")
    ignore = tuple(quant.get("modules_to_not_convert") or ()) + ("lm_head",)
    return QuantPlan("fp8", ((("Linear",), scheme),), ignore, hf_ignore=True)


def _compressed_tensors(quant: dict) -> QuantPlan:
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if quant.get(key):
            raise _refuse(f"compressed-tensors {key}")
    status = str(quant.get("quantization_status") or "compressed")
    if status != "compressed":
        raise _refuse(f"compressed-tensors quantization_status {status!r}")
    groups = []
    for name, group in (quant.get("config_groups") or {}).items():
        fmt = str(group.get("format") or quant.get("format") or "")
        groups.append((tuple(group.get("targets") or ()), _ct_scheme(name, fmt, group)))
    if not groups:
        raise _refuse("compressed-tensors without config_groups")
    return QuantPlan("compressed-tensors", tuple(groups), tuple(quant.get("ignore") or ()))


def _ct_scheme(name: str, fmt: str, group: dict) -> WeightScheme:
    w = group.get("weights") or {}
    where = f"compressed-tensors config_groups.{name}"
    if group.get("output_activations"):
        raise _refuse(f"{where} output_activations")
    acts = group.get("input_activations")
    note = ""
    if acts:
        if not acts.get("dynamic"):
            raise _refuse(f"{where} static input_activations ({acts.get('type')}{acts.get('num_bits')})")
        note = f"dynamic {acts.get('type', '')}{acts.get('num_bits', '')}"
    kind, bits, strategy = str(w.get("type", "int")), w.get("num_bits"), str(w.get("strategy") or "")
    if w.get("dynamic"):
        raise _refuse(f"{where} dynamic weights")
    if fmt == "pack-quantized" and kind == "int" and bits == 4:
        # actorder: "weight" keeps groups contiguous; "group" (or true) stores weight_g_idx, read where present
        if strategy == "group":
            g = w.get("group_size")
            if not isinstance(g, int) or g <= 0 or g % 8:
                raise _refuse(f"{where} group_size {g!r}")
            return WeightScheme("pack-quantized", g, bool(w.get("symmetric", True)), activations=note)
        if strategy == "channel":
            return WeightScheme("pack-quantized", None, bool(w.get("symmetric", True)), activations=note)
        raise _refuse(f"{where} int4 strategy {strategy!r}")
    if fmt in ("float-quantized", "naive-quantized") and kind == "float" and bits == 8:
        if not w.get("symmetric", True):
            raise _refuse(f"{where} asymmetric fp8")
        if strategy == "block":
            block = w.get("block_structure")
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise _refuse(f"{where} block_structure {block!r}")
            return WeightScheme("float-quantized", strategy="block", block=(block[0], block[1]), activations=note)
        if strategy in ("tensor", "channel"):
            return WeightScheme("float-quantized", strategy=strategy, activations=note)
        raise _refuse(f"{where} fp8 strategy {strategy!r}")
    if fmt in ("int-quantized", "naive-quantized") and kind == "int" and bits == 8:
        if not w.get("symmetric", True) or strategy != "channel":
            raise _refuse(f"{where} int8 {'asymmetric' if not w.get('symmetric', True) else strategy or 'strategy?'}")
        return WeightScheme("int-quantized", None, True, strategy="channel", activations=note)
    raise _refuse(f"{where} {fmt or 'format?'} {kind}{bits} {strategy}".rstrip())
