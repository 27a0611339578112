"""Quantize at load: a bf16/fp32 (or FP8) checkpoint → a compressed-tensors checkpoint, one tensor at a time.

`quantize_checkpoint(src, dst, scheme)` reads the source's safetensors one tensor (one expert's slice of a
fused stack) at a time and writes each output file as it goes: the header is computed from the source's
shapes before a weight is read, then every tensor's bytes are appended in order. No more than one
projection (in fp32, with its quantizing temporaries) is ever in memory, on the host or on `device`.

What is quantized: the 2-D projections of the decoder layers (attention, MLP, Gated DeltaNet's in/out
projections (Muse-Glimmer's attention gate_proj too), every MoE expert; a fused [E, out, in] expert stack
(Qwen3.5's `mlp.experts.*`, Gemma 4's `experts.*`) is written per expert, the layout transformers'
save_pretrained and Qwen3-Coder use). Never: the embedding, lm_head, norms (Gemma 4's numbered ones too),
routers (`mlp.gate`, `router`: Gemma 4's router.proj, router.scale and per_expert_scale, `shared_expert_gate`),
Gemma 4's layer_scalar, Gated DeltaNet's small tensors (A_log, dt_bias, conv1d, its
norm, and in_proj_a / in_proj_b: a few rows each that drive the decay and beta gates), gpt-oss's sinks and
its experts (shipped MXFP4; a bf16 copy stays bf16), MTP heads and vision / audio towers: they are copied as is.

The schemes, each written in the format compressed-tensors (and so vLLM and transformers) reads:
- int4: symmetric, groups of 128 input columns (a whole row where the width is not a multiple of 128),
  `pack-quantized`. The scale of each group is searched (`search=True`): among 16 clipping ratios of the
  group's absolute maximum, the one that minimises the group's squared error (RTN is ratio 1).
- int8: symmetric per output channel, `int-quantized` (int8 values and one scale per row).
- fp8: e4m3 per output channel, `float-quantized`.
Scales are stored in the source's dtype (bf16 for a bf16 or an FP8 checkpoint, fp32 for fp32), and every
code is computed from the stored (rounded) scale, so dequantizing the file gives exactly what was chosen.
An FP8 source (Qwen's block-128 `weight_scale_inv`, compressed-tensors float-quantized) is dequantized
per tensor first; it can become int4 or int8.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import INDEX, SINGLE, stored_name, weight_files
from ..config import quantization_of
from ..errors import DflashError
from ..hub import check_free_space
from .int4 import pack_int4_rows
from .plan import plan_of
from .readers import STORED, read_projection

SCHEMES = ("int4", "int8", "fp8")
GROUP = 128
FP8_MAX = 448.0
CLIP_RATIOS = torch.linspace(1.0, 0.70, 16).tolist()  # the int4 scale search; 1.0 is plain RTN

_FORMAT = {"int4": "pack-quantized", "int8": "int-quantized", "fp8": "float-quantized"}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32",
              torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}
# a component that names what is never quantized (norms: any component ending in "norm")
# (Gemma 4's numbered norms: pre_feedforward_layernorm_2, post_feedforward_layernorm_1; its router.proj and
# router.scale under `router`; its layer_scalar)
_KEEP = re.compile(r"(^|\.)(embed_tokens|lm_head|\w*norm(_\d+)?|gate|router|shared_expert_gate|conv1d|in_proj_a|"
                   r"in_proj_b|in_proj_ba|sinks|A_log|dt_bias|layer_scalar)(\.|$)")
_LAYER = re.compile(r"(^|\.)layers\.\d+\.")
# a vision-language wrapper's other towers (Qwen3.5's visual, Gemma 4's vision/audio towers and embedders,
# Muse-Glimmer's vision tower and projector): never read by dflash, copied as they are
_TOWER = re.compile(r"(^|\.)(visual|vision\w*|audio\w*|embed_vision|embed_audio|multi_modal_projector)\.")
_FUSED = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")  # Qwen's mlp.experts.*, Gemma 4's experts.*


# ---- the quantizers: one fp32 weight [out, in] → the tensors its format stores ----

def _scale(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scale as stored (rounded to `dtype`), back in fp32; 1 where the row or group is all zeros."""
    s = value.to(dtype).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Symmetric per output channel: q = round(w / s) in [-127, 127], s = max|w_row| / 127."""
    w = w.to(torch.float32)
    s = _scale(w.abs().amax(-1, keepdim=True) / 127, dtype)
    q = torch.clamp(torch.round(w / s), -128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": s.to(dtype)}


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """e4m3 per output channel: q = fp8(w / s), s = max|w_row| / 448 (the cast rounds to nearest)."""
    w = w.to(torch.float32)
    s = _scale(w.abs().amax(-1, keepdim=True) / FP8_MAX, dtype)
    q = torch.clamp(w / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": s.to(dtype)}


def int4_group(in_features: int) -> int:
    """128 input columns per scale, or the whole row where the width is not a multiple of 128."""
    return GROUP if in_features % GROUP == 0 else in_features


def int4_codes(w: torch.Tensor, group: int, dtype: torch.dtype, search: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 in groups of `group` columns: (signed codes in [-8, 7] [out, in], scales [out, groups]
    in `dtype`). With `search`, each group's scale is the clipped max that minimises its squared error."""
    out, inn = w.shape
    g = w.to(torch.float32).reshape(out, inn // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    best_s = _scale(amax / 7, dtype)
    best_err = None
    work = torch.empty_like(g)
    for ratio in CLIP_RATIOS if search else CLIP_RATIOS[:1]:
        s = _scale(amax * ratio / 7, dtype)
        torch.div(g, s, out=work)  # in place from here: one temporary of the weight's size, reused
        err = work.round_().clamp_(-8, 7).mul_(s).sub_(g).square_().sum(-1, keepdim=True)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    del work
    q = torch.clamp(torch.round(g / best_s), -8, 7).to(torch.int8).reshape(out, inn)
    return q, best_s.reshape(out, inn // group).to(dtype)


def quantize_int4(w: torch.Tensor, dtype: torch.dtype, search: bool = True) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: the signed code + 8 as a nibble, eight to an int32 along the input."""
    out, inn = w.shape
    q, scale = int4_codes(w, int4_group(inn), dtype, search)
    return {"weight_packed": pack_int4_rows((q + 8).to(torch.uint8)), "weight_scale": scale,
            "weight_shape": torch.tensor([out, inn], dtype=torch.int64)}


def output_shapes(scheme: str, out: int, inn: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    """What one [out, in] projection becomes: suffix → (dtype, shape), known before a weight is read."""
    if scheme == "int4":
        return {"weight_packed": (torch.int32, (out, -(-inn // 8))),
                "weight_scale": (dtype, (out, inn // int4_group(inn))), "weight_shape": (torch.int64, (2,))}
    return {"weight": (torch.int8 if scheme == "int8" else torch.float8_e4m3fn, (out, inn)),
            "weight_scale": (dtype, (out, 1))}


def quantize_weight(w: torch.Tensor, scheme: str, dtype: torch.dtype, search: bool = True) -> dict[str, torch.Tensor]:
    if scheme == "int4":
        return quantize_int4(w, dtype, search)
    return quantize_int8(w, dtype) if scheme == "int8" else quantize_fp8(w, dtype)


# ---- which tensors are projections, and the jobs that write the output ----

def is_projection(module: str) -> bool:
    """A decoder layer's projection that is quantized (its name without ".weight")."""
    return (bool(_LAYER.search(module)) and not module.startswith("mtp.") and not _KEEP.search(module)
            and not _TOWER.search(module))


@dataclass
class Job:
    """One piece of the output: the tensors it writes (name → (dtype, shape)) and how to make them."""

    outputs: dict[str, tuple[torch.dtype, tuple]]
    make: Callable[[], dict[str, torch.Tensor]]


@dataclass
class Source:
    directory: Path
    files: dict[str, Path]  # tensor name → file
    headers: dict[str, tuple[str, tuple]] = field(default_factory=dict)  # name → (safetensors dtype, shape)

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor (or one expert's slice of a stack), the file mapped only while it is read."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name) if index is None else f.get_slice(name)[index]


def _headers(files: dict[str, Path]) -> dict[str, tuple[str, tuple]]:
    out = {}
    for path in sorted(set(files.values())):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        out |= {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    return out


_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def _float_dtype(st_dtype: str) -> torch.dtype:
    """The dtype scales are stored in for a source weight of this safetensors dtype."""
    dtype = _FROM_ST.get(st_dtype)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def check_source(raw: dict, scheme: str):
    """The source's own quantization plan (None: plain), refused where `scheme` cannot be made from it: only
    a plain or an FP8 checkpoint is quantized (FP8 to int4 or int8)."""
    source_plan = plan_of(raw)
    if source_plan is not None:
        formats = {s.format for _, s in source_plan.groups}
        if not formats <= {"fp8-block", "float-quantized"}:
            raise DflashError(f"the checkpoint is already quantized ({source_plan.method}, "
                              f"{', '.join(sorted(formats))}): load it as it is, without --quantize")
        if scheme == "fp8":
            raise DflashError("the checkpoint is already FP8: load it as it is, without --quantize fp8")
    return source_plan


def plan_jobs(src: Source, scheme: str, raw: dict, device: torch.device, search: bool
              ) -> tuple[dict[Path, list[Job]], list[str]]:
    """The output jobs per source file (in the source's order) and the modules quantized."""
    source_plan = check_source(raw, scheme)
    names = list(src.headers)
    consumed: set[str] = set()
    jobs: dict[Path, list[Job]] = {}
    quantized: list[str] = []

    def add(path: Path, job: Job) -> None:
        jobs.setdefault(path, []).append(job)

    # FP8 source modules: their scheme and stored tensors (key → name, read together). A fused [E, out, in]
    # stack (Qwen3.5-MoE's -FP8 experts.gate_up_proj) keeps its scales beside it as the name with the key's
    # "weight" replaced (experts.gate_up_proj_scale_inv), as checkpoint.stored_name reads them.
    fp8: dict[str, tuple] = {}
    for name, (st_dtype, shape) in src.headers.items():
        fused = not name.endswith(".weight")
        module = name.removesuffix(".weight")
        if st_dtype != "F8_E4M3" or (fused and not (_FUSED.search(name) and len(shape) == 3)):
            continue
        scheme_in = None if source_plan is None else source_plan.scheme_for(module)
        if scheme_in is None:
            raise DflashError(f"{name} is FP8, but the quantization_config does not say how it is scaled")
        keys = (*STORED[scheme_in.format][0], *STORED[scheme_in.format][1])
        stored = {k: stored_name(module, k, fused) for k in keys if not fused or k.startswith("weight")}
        stored = {k: n for k, n in stored.items() if n in src.headers}
        fp8[module] = (scheme_in, stored)
        consumed.update(n for k, n in stored.items() if k != "weight")

    def dense(module: str, index: int | None = None) -> Callable[[], torch.Tensor]:
        """The projection's fp32 weight (of a fused stack: expert `index`'s): read as is, or dequantized from
        the source's FP8 (a stack's scales sliced by expert as its weight is)."""
        if module not in fp8:
            name = module + ".weight" if index is None else module
            return lambda: src.read(name, index).to(device, torch.float32)
        scheme_in, stored = fp8[module]
        return lambda: read_projection(module, {k: src.read(n, index).to(device) for k, n in stored.items()},
                                       scheme_in).dequantize(torch.float32)

    def projection(module: str, out_name: str, weight: Callable[[], torch.Tensor], out: int, inn: int,
                   dtype: torch.dtype) -> Job:
        shapes = output_shapes(scheme, out, inn, dtype)
        quantized.append(out_name)
        return Job({f"{out_name}.{k}": v for k, v in shapes.items()},
                   lambda: {f"{out_name}.{k}": t.cpu() for k, t in
                            quantize_weight(weight(), scheme, dtype, search).items()})

    for name in names:
        if name in consumed:
            continue
        st_dtype, shape = src.headers[name]
        path = src.files[name]
        module = name.removesuffix(".weight")
        fused = _FUSED.search(name)
        if name.endswith(".weight") and len(shape) == 2 and is_projection(module) and st_dtype in (
                "F32", "BF16", "F16", "F8_E4M3"):
            dtype = _float_dtype(st_dtype)
            add(path, projection(module, module, dense(module), shape[0], shape[1], dtype))
        elif fused and len(shape) == 3 and is_projection(module) and name + "_bias" not in src.headers \
                and st_dtype in ("F32", "BF16", "F16", "F8_E4M3"):
            # a fused [E, out, in] stack (Qwen3.5's, Gemma 4's; FP8: dequantized expert by expert), written per
            # expert (gate_up is gate's rows, then up's)
            dtype = _float_dtype(st_dtype)
            prefix = name[: fused.start(2)]
            for e in range(shape[0]):
                expert = dense(module, e)
                if fused.group(2) == "down_proj":
                    add(path, projection(module, f"{prefix}{e}.down_proj", expert, shape[1], shape[2], dtype))
                else:
                    half = shape[1] // 2
                    for part, rows in (("gate_proj", slice(0, half)), ("up_proj", slice(half, None))):
                        add(path, projection(module, f"{prefix}{e}.{part}",
                                             lambda expert=expert, rows=rows: expert()[rows], half, shape[2], dtype))
        elif module in fp8:  # an FP8 tensor kept plain (a router, say): dequantized to bf16
            add(path, Job({name: (torch.bfloat16, shape)},
                          lambda name=name, f=dense(module): {name: f().to(torch.bfloat16).cpu()}))
        else:
            add(path, Job({name: (_FROM_ST[st_dtype], shape)}, lambda name=name: {name: src.read(name)}))
    return jobs, quantized


# ---- the writer ----

def _write_safetensors(path: Path, jobs: list[Job]) -> dict[str, int]:
    """Write `jobs` to one safetensors file, the header first (from the declared shapes), then each job's
    tensors as it makes them. Returns each tensor's byte size."""
    header, offset, sizes = {}, 0, {}
    for job in jobs:
        for name, (dtype, shape) in job.outputs.items():
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset, sizes[name] = offset + n, n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for job in jobs:
            made = job.make()
            for name, (dtype, shape) in job.outputs.items():
                t = made.pop(name)
                assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape, dtype, shape)
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                del t  # before the next job reads: one tensor at a time
    return sizes


def _targets(modules: list[str], others: set[str] = frozenset()) -> list[str]:
    """Anchored regexes matching exactly `modules` (layer and expert numbers generalised where that adds
    none of `others`, the checkpoint's other modules: Gemma 4's o_proj is one int4 group per row in a
    sliding layer and groups of 128 in a global one, where the heads are wider)."""
    by_pattern: dict[str, list[str]] = {}
    for m in modules:
        by_pattern.setdefault(re.sub(r"\.\d+\.", ".N.", m), []).append(m)
    out = []
    for p, ms in sorted(by_pattern.items()):
        general = "^" + re.escape(p).replace(r"\.N\.", r"\.\d+\.") + "$"
        if any(re.match(general, o) for o in others):
            out += ["re:^" + re.escape(m) + "$" for m in sorted(ms)]
        else:
            out.append("re:" + general)
    return out


def quantization_config(scheme: str, modules: list[str], widths: dict[str, int], plain: set[str]) -> dict:
    """compressed-tensors' quantization_config for what `quantize_checkpoint` wrote (`plain`: the modules
    stored unquantized, which no target may match)."""
    fmt = _FORMAT[scheme]
    if scheme == "int4":
        by_group: dict[int | None, list[str]] = {}
        for m in modules:
            g = int4_group(widths[m])
            by_group.setdefault(g if g == GROUP else None, []).append(m)
        weights = {g: {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False,
                       "strategy": "group" if g else "channel", "group_size": g, "observer": "mse"}
                   for g in by_group}
        parts = [(by_group[g], weights[g]) for g in sorted(by_group, key=lambda g: g is None)]
    else:
        parts = [(modules, {"num_bits": 8, "type": "int" if scheme == "int8" else "float", "symmetric": True,
                            "dynamic": False, "strategy": "channel", "observer": "minmax"})]
    everything = set(modules) | plain
    groups = {f"group_{i}": {"targets": _targets(ms, everything - set(ms)), "weights": w, "input_activations": None,
                             "output_activations": None, "format": fmt} for i, (ms, w) in enumerate(parts) if ms}
    for (ms, _), group in zip([p for p in parts if p[0]], groups.values()):
        for t in group["targets"]:  # a generalised layer number must catch no module of another kind
            wrong = [m for m in everything if re.match(t[3:], m) and m not in ms]
            assert not wrong, (t, wrong[:3])
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def quantize_checkpoint(src_dir: Path, dst_dir: Path, scheme: str, *, device: str | torch.device = "cpu",
                        search: bool = True) -> list[str]:
    """Write `src_dir` quantized with `scheme` into `dst_dir` (which must not exist; created here): weights,
    a config.json with its quantization_config, and every other file copied. Returns the modules quantized."""
    if scheme not in SCHEMES:
        raise DflashError(f"--quantize {scheme} is not a scheme dflash writes (use {', '.join(SCHEMES)})")
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    raw = json.loads((src_dir / "config.json").read_text())
    src = Source(src_dir, weight_files(src_dir))
    src.headers = _headers(src.files)
    jobs, quantized = plan_jobs(src, scheme, raw, torch.device(device), search)
    needed = sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                 for file_jobs in jobs.values() for job in file_jobs for dtype, shape in job.outputs.values())
    check_free_space(needed, dst_dir.parent)
    dst_dir.mkdir(parents=True)
    for item in src_dir.iterdir():  # tokenizer, generation config, templates, README: as they are
        if item.is_file() and item.suffix != ".safetensors" and item.name not in (INDEX, "config.json"):
            shutil.copyfile(item, dst_dir / item.name)
    weight_map = {}
    for path, file_jobs in jobs.items():
        _write_safetensors(dst_dir / path.name, file_jobs)
        weight_map |= {name: path.name for job in file_jobs for name in job.outputs}
    if (src_dir / INDEX).is_file() or len(jobs) > 1:
        total = sum(p.stat().st_size for p in dst_dir.glob("*.safetensors"))
        (dst_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    elif next(iter(jobs)).name != SINGLE:
        (dst_dir / next(iter(jobs)).name).rename(dst_dir / SINGLE)
    widths = {m: _width(src, m) for m in quantized}
    config = _without_quantization(raw)
    plain = {n.removesuffix(".weight") for n in weight_map if n.endswith(".weight") and n.removesuffix(".weight")
             not in quantized}
    config["quantization_config"] = quantization_config(scheme, quantized, widths, plain)
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2))
    return quantized


def _width(src: Source, module: str) -> int:
    if module + ".weight" in src.headers:
        return src.headers[module + ".weight"][1][-1]
    stack = re.sub(r"experts\.\d+\.(gate_proj|up_proj|down_proj)$",
                   lambda m: "experts." + ("down_proj" if m.group(1) == "down_proj" else "gate_up_proj"), module)
    return src.headers[stack][1][-1]


def _without_quantization(raw: dict) -> dict:
    config = json.loads(json.dumps(raw))
    for cfg in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in ("quantization_config", "compression_config"):
            cfg.pop(key, None)
    assert quantization_of(config) is None
    return config
