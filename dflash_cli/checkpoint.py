"""safetensors weights from a Hugging Face layout directory, straight into dtype and device.

Only safetensors (never pickle: `.bin`/`.pt` checkpoints are refused, not loaded). A sharded
checkpoint is read through `model.safetensors.index.json`. Each tensor is materialised once, in the
target dtype on the target device, so an 8B model never exists as a float32 copy in memory.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from .errors import DflashError
from .models.weights import Weight

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DflashError(f"{directory / INDEX} is not a valid safetensors index ({e})") from None
        files = {name: directory / shard for name, shard in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise DflashError(f"{directory}: shard {missing[0]} listed in {INDEX} is missing")
        return files
    if (directory / SINGLE).is_file():
        return {name: directory / SINGLE for name in _names(directory / SINGLE)}
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = f" (found {pickled[0]}: pickle checkpoints are never loaded)" if pickled else ""
    raise DflashError(f"no model.safetensors in {directory}{hint}")


def _names(path: Path) -> list[str]:
    with _open(path, "cpu") as f:
        return list(f.keys())


def _open(path: Path, device: str):
    _check_complete(path)
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise DflashError(f"{path} is not a readable safetensors file ({e})") from None


def _each_in_file(files: dict[str, Path], names: Iterable[str], device: str = "cpu") -> Iterator[tuple[str, object]]:
    """(name, the open safetensors file that holds it) for each of `names`, grouped so that each file opens once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, group in by_file.items():
        with _open(path, device) as f:
            for name in group:
                yield name, f


def _check_complete(path: Path) -> None:
    """A truncated download would otherwise fail deep inside a read: check the header's extent
    (once per file version: loading reads a shard many times)."""
    stat = path.stat()
    _check_extent(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _check_extent(path: Path, size: int, mtime_ns: int) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DflashError(f"{path} is truncated ({size} bytes): download it again")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise DflashError(f"{path} is truncated or corrupt (header says {header_len} bytes): download it again")
        try:
            header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError):
            # not JSON, or JSON that is not {name: {"data_offsets": [begin, end], ...}}
            raise DflashError(f"{path} has a corrupt header: download it again") from None
    if 8 + header_len + end > size:
        raise DflashError(f"{path} is truncated ({size} of {8 + header_len + end} bytes): download it again")


def load_tensors(
    files: dict[str, Path], names: Iterable[str], dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read `names` (all must exist) into `dtype` (None: as stored) on `device`."""
    names = list(names)
    absent = [n for n in names if n not in files]
    if absent:
        directory = next(iter(files.values())).parent if files else "?"
        raise DflashError(f"{directory}: weight '{absent[0]}' is missing from the checkpoint")
    out = {}
    for name, f in _each_in_file(files, names, "cpu" if device.type == "cpu" else str(device)):
        t = f.get_tensor(name)  # dtype None: as stored (packed MXFP4 bytes must stay bytes)
        out[name] = t.to(device=device) if dtype is None else t.to(dtype=dtype, device=device)
    return out


def header_shapes(files: dict[str, Path], names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` from the safetensors headers, without reading any tensor data."""
    return {name: tuple(f.get_slice(name).get_shape()) for name, f in _each_in_file(files, names)}


# What marks a tensor of the table as stored quantized, whatever the format: a module's own keys, or for a
# fused expert stack (a name without ".weight") the name with the key's "weight" replaced (transformers'
# naming: experts.gate_up_proj, experts.gate_up_proj_scale_inv)
QUANTIZED_KEYS = ("weight_packed", "weight_scale", "weight_scale_inv", "weight_zero_point", "qweight", "qzeros")
_PROJECTION = re.compile(r"(?:^|\.)(?:\w*proj\w*|shared_expert_gate)$")


def _module_of(name: str) -> tuple[str, bool]:
    """(module, fused): "x.q_proj.weight" → ("x.q_proj", False); "x.experts.gate_up_proj" → (itself, True)."""
    return (name[:-len(".weight")], False) if name.endswith(".weight") else (name, True)


def stored_name(module: str, key: str, fused: bool) -> str:
    """Where a module's stored tensor `key` sits in the checkpoint."""
    if not fused:
        return f"{module}.{key}"
    if not key.startswith("weight"):
        raise DflashError(f"{module}: fused expert tensors stored as {key} are not supported")
    return module + key.removeprefix("weight")


@dataclass
class QuantizedEntry:
    weight: Weight  # the table's dense entry it replaces
    module: str
    scheme: object  # quant.WeightScheme
    stored: dict[str, str]  # key → name in the checkpoint


def quantized_entries(files: dict[str, Path], table: list[Weight], plan, directory: Path) -> dict[str, QuantizedEntry]:
    """The table's weights the checkpoint stores quantized, by table name. A projection is read quantized
    where the plan names a scheme for it and its format's tensors are there (a class target such as
    "Linear" also matches what a checkpoint keeps plain: read plain); anything else stored quantized (the
    embedding, lm_head, a norm or router that dflash reads dense) is refused by name."""
    from .quant.readers import STORED, stored_shapes

    out, plain_fp8 = {}, {}
    for w in table:
        module, fused = _module_of(w.name)
        marked = [k for k in QUANTIZED_KEYS
                  if (module + k.removeprefix("weight") if fused else f"{module}.{k}") in files]
        scheme = plan.scheme_for(module) if plan is not None and _PROJECTION.search(module) else None
        if scheme is None:
            if marked:
                what = "a projection the quantization_config leaves unquantized" if _PROJECTION.search(module) \
                    else "a tensor dflash reads dense (embedding, lm_head, norms, routers, Gated DeltaNet parameters)"
                raise DflashError(f"{directory}: {module} is stored quantized ({module}.{marked[0]}), but it is "
                                  f"{what}: use a checkpoint that keeps it in bf16 (its quantization_config's ignore list)")
            continue
        required, optional = STORED[scheme.format]
        if not marked:  # stored plain after all (unless it is FP8 without its scales: checked below)
            if scheme.format in ("fp8-block", "float-quantized") and w.name in files:
                plain_fp8[w.name] = required[1]
            continue
        try:
            stored = {k: stored_name(module, k, fused) for k in required}
            stored |= {k: stored_name(module, k, fused) for k in optional if not fused or k.startswith("weight")}
        except DflashError as e:
            raise DflashError(f"{directory}: {e}") from None
        missing = [stored[k] for k in required if stored[k] not in files]
        if missing:
            raise DflashError(f"{directory}: {missing[0]} is missing (the quantization_config says {scheme.format})")
        out[w.name] = QuantizedEntry(w, module, scheme, {k: n for k, n in stored.items() if n in files})
    for name, dtype in header_dtypes(files, plain_fp8).items():
        if dtype == "F8_E4M3":
            raise DflashError(f"{directory}: {name} is FP8 but its {plain_fp8[name]} is missing")
    shapes = header_shapes(files, [n for e in out.values() for n in e.stored.values()])
    for e in out.values():
        lead, (rows, cols) = e.weight.shape[:-2], e.weight.shape[-2:]
        for key, (shape, dtype) in stored_shapes(e.scheme, rows, cols).items():
            name = e.stored.get(key)
            if dtype is not None and name is not None and key != "weight_shape" and shapes[name] != (*lead, *shape):
                raise DflashError(f"{directory}: {name} has shape {shapes[name]}, config.json and the "
                                  f"quantization_config imply {(*lead, *shape)}")
    return out


def header_dtypes(files: dict[str, Path], names: Iterable[str]) -> dict[str, str]:
    """The stored dtypes of `names` ("BF16", "F8_E4M3", ...) from the safetensors headers."""
    return {name: f.get_slice(name).get_dtype() for name, f in _each_in_file(files, names)}


def stored_bytes(files: dict[str, Path], names: Iterable[str]) -> int:
    """Bytes of tensors as stored, from the safetensors headers."""
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
    slices = (f.get_slice(name) for name, f in _each_in_file(files, names))
    return sum(math.prod(s.get_shape()) * sizes.get(s.get_dtype(), 1) for s in slices)


def weight_bytes(directory: Path, table: list[Weight], dtype: torch.dtype, plan) -> int:
    """Bytes the table's weights take once loaded from this checkpoint: projections stored quantized at their
    packed size (words, scales, zeros, as stored), the rest in their load dtype (models.weights.table_bytes)."""
    from .models.weights import table_bytes

    files = weight_files(directory)
    entries = quantized_entries(files, table, plan, Path(directory)) if plan is not None else {}
    dense = [w for w in table if w.name not in entries]
    return table_bytes(dense, dtype) + stored_bytes(files, [n for e in entries.values() for n in e.stored.values()])


def read_weights(directory: Path, table: list[Weight], dtype: torch.dtype, device: torch.device,
                 plan=None) -> dict[str, torch.Tensor]:
    """Every weight of a family's table, each in its dtype policy ("model": `dtype`, "float32", or
    "raw": as stored), after checking every shape against the table (before any data is read).

    With a quantization plan (quant.plan_of), the projections the checkpoint stores quantized are read as
    stored (packed words, scales, zeros: raw, never dequantized) under `module + "." + key`, and the
    returned `Tensors` names them in `.quantized` for models/layers/linear.take_linear."""
    from .models.layers.linear import Tensors

    files = weight_files(directory)
    entries = quantized_entries(files, table, plan, Path(directory)) if plan is not None else {}
    table = [w for w in table if w.name not in entries]
    present = [w for w in table if w.name in files]
    absent = [w for w in table if w.name not in files and not (w.fallback and w.fallback in files)]
    if absent:
        raise DflashError(f"{directory}: weight '{absent[0].name}' is missing from the checkpoint")
    shapes = header_shapes(files, [w.name for w in present])
    for w in present:
        if shapes[w.name] != w.shape:
            raise DflashError(f"{directory}: {w.name} has shape {shapes[w.name]}, config.json implies {w.shape}")
    out: dict[str, torch.Tensor] = {}
    for policy, target_dtype in (("model", dtype), ("float32", torch.float32), ("raw", None)):
        names = [w.name for w in present if w.dtype == policy]
        if names:
            out |= load_tensors(files, names, target_dtype, device)
    for w in table:
        if w.name not in out:
            out[w.name] = out[w.fallback]
    stored = {n: f"{e.module}.{k}" for e in entries.values() for k, n in e.stored.items()}
    if stored:
        raw = load_tensors(files, stored, None, device)
        out |= {ours: raw[name] for name, ours in stored.items()}
    return Tensors(out, quantized={e.module: e.scheme for e in entries.values()})
