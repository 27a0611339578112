"""Target model families, one module each, chosen by the checkpoint's `model_type` through one table.

A family module declares `FAMILY` (a `base.Family`): its `model_types`, its `Config` (read from
config.json, checked at the boundary), its `weight_table(cfg, layout)` (every tensor it loads, by
checkpoint name: models/weights.py), `build(cfg, tensors, max_positions)` (a `base.Decoder` assembled
from models/layers), `cache_bytes` for the memory plan, and the hooks with defaults: `layout_of`
(releases that differ in layout), `drafter_defaults` (how a
drafter config.json of its model_type is read). The engine, the CLI and the memory planner only ever
go through this table.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..config import DRAFTER_ARCHITECTURES, read_config
from ..errors import DflashError
from .base import Decoder, Family

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
    "muse_glimmer": "muse_glimmer",
    "gemma4": "gemma4",
    "gemma4_text": "gemma4",
    "gemma4_unified": "gemma4",
    "gemma4_unified_text": "gemma4",
}


def family_named(module: str) -> Family:
    """The `FAMILY` a family module (models/<module>.py) declares."""
    return importlib.import_module(f"{__name__}.{module}").FAMILY


def family_of(raw: dict, directory: Path) -> Family:
    drafter = [a for a in raw.get("architectures") or [] if a in DRAFTER_ARCHITECTURES]
    if drafter or "dflash_config" in raw or "speculators_model_type" in raw:  # it would read as a Qwen3 target
        raise DflashError(f"{directory} is a DFlash drafter ({', '.join(drafter) or 'dflash_config'}), not a target: "
                          "pass it as --drafter, with the model it drafts for as MODEL or --target")
    model_type = raw.get("model_type")
    name = FAMILIES.get(model_type)
    if name is None:
        archs = ", ".join(raw.get("architectures") or []) or model_type or "unknown"
        raise DflashError(f"{directory}: unsupported target architecture '{archs}' "
                          f"(model_type '{model_type}'; supported: {', '.join(sorted(FAMILIES))})")
    return family_named(name)


def drafter_defaults(raw: dict) -> dict:
    """A drafter's config.json as its model_type's family reads it (gpt-oss: transformers' defaults)."""
    name = FAMILIES.get(raw.get("model_type"))
    return raw if name is None else family_named(name).drafter_defaults(raw)


def target_config(directory: Path):
    """(family, its Config) of the checkpoint in `directory`."""
    raw = read_config(directory)
    family = family_of(raw, Path(directory))
    return family, family.Config.from_raw(raw, Path(directory))


def load_target(directory: Path, dtype: torch.dtype, device: torch.device, max_positions: int,
                family: Family | None = None, cfg=None) -> Decoder:
    """The target model in `directory`: its family's weights read (shapes checked) and assembled."""
    from ..checkpoint import read_weights, weight_files
    from ..quant.plan import target_plan

    if family is None:
        family, cfg = target_config(directory)
    layout = family.layout_of(weight_files(directory))
    plan = target_plan(read_config(directory))  # quantized projections are read as stored (checkpoint.py)
    tensors = read_weights(Path(directory), family.weight_table(cfg, layout), dtype, device, plan=plan)
    return family.build(cfg, tensors, max_positions)
