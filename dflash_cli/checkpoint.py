"""safetensors weights from a Hugging Face layout directory, straight into dtype and device.

Only safetensors (never pickle: `.bin`/`.pt` checkpoints are refused, not loaded). A sharded
checkpoint is read through `model.safetensors.index.json`. Each tensor is materialised once, in the
target dtype on the target device, so an 8B model never exists as a float32 copy in memory.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

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
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    load_device = "cpu" if device.type == "cpu" else str(device)
    for path, group in by_file.items():
        with _open(path, load_device) as f:
            for name in group:
                t = f.get_tensor(name)  # dtype None: as stored (packed MXFP4 bytes must stay bytes)
                out[name] = t.to(device=device) if dtype is None else t.to(dtype=dtype, device=device)
    return out


def header_shapes(files: dict[str, Path], names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` from the safetensors headers, without reading any tensor data."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    shapes = {}
    for path, group in by_file.items():
        with _open(path, "cpu") as f:
            for name in group:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def read_weights(directory: Path, table: list[Weight], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every weight of a family's table, each in its dtype policy ("model": `dtype`, "float32", or
    "raw": as stored), after checking every shape against the table (before any data is read)."""
    files = weight_files(directory)
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
    return out
