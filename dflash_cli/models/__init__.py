"""Target model families, one module each, chosen by the checkpoint's `model_type` through one table.

A family module owns everything about its architecture and nothing else:
- `MODEL_TYPES`: the config.json `model_type` values it reads;
- `Config.from_raw(raw, directory)`: its config, checked at the boundary (one-line errors);
- `weight_table(cfg, layout)`: every tensor it loads, by checkpoint name (see weights.py); a family whose
  releases differ in layout (MoE experts fused or per expert) also has `layout_of(names)`;
- `Model(cfg, tensors, max_positions)`: the target, with `new_cache(capacity, block_size)`,
  `forward(ids, cache, *, logits_from, feature_layers, commit)` and `commit(cache, count)`;
- `cache_bytes(cfg, dtype, block_size)`: (bytes per token of context, fixed bytes), for the memory plan.
The engine, the CLI and the memory planner only ever go through this table.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

from ..config import read_config
from ..errors import DflashError

# model_type → family module. Multimodal wrappers are listed under their own model_type; their text
# decoder is all dflash runs.
FAMILIES = {
    "qwen3": "dense",
    "llama": "dense",
    "qwen3_moe": "qwen3_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5",
    "gpt_oss": "gpt_oss",
}


def family_of(raw: dict, directory: Path) -> ModuleType:
    model_type = raw.get("model_type")
    name = FAMILIES.get(model_type)
    if name is None:
        archs = ", ".join(raw.get("architectures") or []) or model_type or "unknown"
        raise DflashError(f"{directory}: unsupported target architecture '{archs}' "
                          f"(model_type '{model_type}'; supported: {', '.join(sorted(FAMILIES))})")
    return importlib.import_module(f"{__name__}.{name}")


def target_config(directory: Path):
    """(family module, its Config) of the checkpoint in `directory`."""
    raw = read_config(directory)
    family = family_of(raw, Path(directory))
    return family, family.Config.from_raw(raw, Path(directory))


def load_target(directory: Path, dtype: torch.dtype, device: torch.device, max_positions: int,
                family: ModuleType | None = None, cfg=None):
    """The target model in `directory`: its family's weights read (shapes checked) and assembled."""
    from ..checkpoint import read_weights, weight_files

    if family is None:
        family, cfg = target_config(directory)
    layout = family.layout_of(weight_files(directory)) if hasattr(family, "layout_of") else None
    tensors = read_weights(Path(directory), family.weight_table(cfg, layout), dtype, device)
    return family.Model(cfg, tensors, max_positions)
