"""Model configs read from a checkpoint's config.json, checked at the boundary.

Targets are Qwen3 or Llama dense models; the drafter is a DFlash checkpoint (a Qwen3 config plus
`block_size`, `mask_token_id` and `dflash_config.target_layer_ids`; DESIGN §2). Every problem is a
one-line `DflashError` that names the file and the field.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import DflashError

TARGET_FAMILIES = {"qwen3": "qwen3", "llama": "llama"}


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise DflashError(f"no config.json in {directory}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DflashError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DflashError(f"{path} is not a JSON object (it holds a {type(raw).__name__})")
    return raw


class _Fields:
    """Reads required and optional fields from a config dict with errors that name the file."""

    def __init__(self, raw: dict, where: Path):
        self.raw, self.where = raw, where

    def req(self, key: str, kind: type = int):
        if key not in self.raw or self.raw[key] is None:
            raise DflashError(f"{self.where}/config.json is missing '{key}'")
        return self.opt(key, None, kind)

    def opt(self, key: str, default, kind: type = int):
        value = self.raw.get(key, default)
        if value is None:
            return None
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise DflashError(f"{self.where}/config.json: '{key}' should be {kind.__name__}, got {value!r}") from None


def _rope(raw: dict, f: _Fields) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise DflashError(f"{f.where}/config.json is missing 'rope_theta'")
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


@dataclass(frozen=True)
class TargetConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @classmethod
    def from_dir(cls, directory: Path) -> "TargetConfig":
        raw = read_config(directory)
        f = _Fields(raw, Path(directory))
        model_type = raw.get("model_type")
        if model_type not in TARGET_FAMILIES:
            archs = ", ".join(raw.get("architectures") or []) or model_type or "unknown"
            raise DflashError(
                f"{directory}: unsupported target architecture '{archs}' (supported: Qwen3 and Llama dense)"
            )
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise DflashError(f"{directory}: attention/MLP biases are not supported")
        theta, scaling = _rope(raw, f)
        hidden, heads = f.req("hidden_size"), f.req("num_attention_heads")
        return cls(
            family=TARGET_FAMILIES[model_type],
            vocab_size=f.req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.req("intermediate_size"),
            num_layers=f.req("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=f.opt("num_key_value_heads", heads),
            head_dim=f.opt("head_dim", None) or hidden // heads,
            rms_norm_eps=f.opt("rms_norm_eps", 1e-6, float),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=f.opt("max_position_embeddings", 4096),
            tie_word_embeddings=f.opt("tie_word_embeddings", False, bool),
        )


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's fallback: evenly spaced from layer 1 to L-3 (one draft layer: L//2)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class DrafterConfig:
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    vocab_size: int | None
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    sliding_windows: tuple[int | None, ...]  # per draft layer

    @classmethod
    def from_dir(cls, directory: Path) -> "DrafterConfig":
        raw = read_config(directory)
        f = _Fields(raw, Path(directory))
        dflash = raw.get("dflash_config") or {}
        inner = _Fields(dflash, Path(directory))

        def either(key: str) -> int:
            if raw.get(key) is not None:
                return f.req(key)
            if dflash.get(key) is not None:
                return inner.req(key)
            raise DflashError(f"{directory}/config.json is missing '{key}' (top level or dflash_config)")

        hidden, heads = f.req("hidden_size"), f.req("num_attention_heads")
        num_layers = f.req("num_hidden_layers")
        layer_ids = dflash.get("target_layer_ids")
        if layer_ids is None:
            num_target = f.req("num_target_layers")
            layer_ids = default_target_layer_ids(num_target, num_layers)
            warnings.warn(
                f"{directory}: no dflash_config.target_layer_ids; guessing {layer_ids}, which is wrong for "
                "most released drafters (acceptance will be low)",
                stacklevel=2,
            )
        layer_types = raw.get("layer_types") or ["full_attention"] * num_layers
        if len(layer_types) != num_layers:
            raise DflashError(f"{directory}/config.json: layer_types has {len(layer_types)} entries for {num_layers} layers")
        window = f.opt("sliding_window", None)
        theta, scaling = _rope(raw, f)
        return cls(
            block_size=either("block_size"),
            mask_token_id=either("mask_token_id"),
            target_layer_ids=tuple(int(i) for i in layer_ids),
            vocab_size=f.opt("vocab_size", None),
            hidden_size=hidden,
            intermediate_size=f.req("intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=f.opt("num_key_value_heads", heads),
            head_dim=f.opt("head_dim", None) or hidden // heads,
            rms_norm_eps=f.opt("rms_norm_eps", 1e-6, float),
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        )

    def check_against(self, target: TargetConfig, directory: Path) -> None:
        """Fail before any weight is read when the drafter cannot serve this target."""
        where = f"drafter {directory} does not match the target:"
        if self.hidden_size != target.hidden_size:
            raise DflashError(f"{where} hidden size {self.hidden_size} vs target {target.hidden_size}")
        if self.vocab_size is not None and self.vocab_size != target.vocab_size:
            raise DflashError(f"{where} vocab size {self.vocab_size} vs target {target.vocab_size}")
        bad = [i for i in self.target_layer_ids if not 0 <= i < target.num_layers]
        if bad:
            raise DflashError(f"{where} target_layer_ids {bad} outside the target's {target.num_layers} layers")
        if not 0 <= self.mask_token_id < target.vocab_size:
            raise DflashError(f"{where} mask_token_id {self.mask_token_id} outside the vocab ({target.vocab_size})")
        if self.block_size < 2:
            raise DflashError(f"drafter {directory}: block_size must be at least 2, got {self.block_size}")
