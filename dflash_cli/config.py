"""Configs read from a checkpoint's config.json, checked at the boundary.

The helpers every family's `Config.from_raw` uses (required and optional fields, rope parameters),
and the drafter's config: a DFlash checkpoint is a Qwen3 config plus `block_size`, `mask_token_id`
and `dflash_config.target_layer_ids` (DESIGN §2). Every problem is a one-line `DflashError` that
names the file and the field.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import DflashError

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
    drafter = ("dflash_config" in raw or "speculators_model_type" in raw
               or any(a in DRAFTER_ARCHITECTURES for a in raw.get("architectures") or []))
    if not drafter:  # a drafter's own checks are DrafterConfig.from_raw's
        refuse_unimplemented(raw, Path(directory))
    return with_aliases(raw)


# quant_method → (what the format stores beside or instead of plain weights, the model_types whose family
# reads it). A quantized checkpoint read as plain weights loads without error and writes garbage, so every
# format not turned on here is refused by name before a weight is read (the quantized-targets issue turns
# entries on by naming the family that implements it).
# int4 / FP8 weight-only (dflash_cli/quant) run on the families tests/test_quant_models.py and
# tests/test_quant_families.py run quantized (their projections and experts go through models/layers/linear.take_linear;
# Gemma 4's routed experts through its own torch path, dequantizing the experts a step needs); gpt-oss's
# experts are MXFP4 already. Which variants of each method are read is quant/plan.py's, refused there by name.
QUANT_FAMILIES = ("qwen3", "llama", "qwen3_moe", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
                  "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "muse_glimmer")
QUANTIZATION_FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mxfp4": ("*_blocks, *_scales", ("gpt_oss",)),  # gpt_oss.py's experts
    "fp8": ("weight_scale_inv", QUANT_FAMILIES),
    "fbgemm_fp8": ("weight_scale", ()),
    "compressed-tensors": ("weight_scale", QUANT_FAMILIES),
    "gptq": ("qweight, qzeros, scales", QUANT_FAMILIES),
    "awq": ("qweight, qzeros, scales", QUANT_FAMILIES),
    "auto-round": ("qweight, qzeros, scales", QUANT_FAMILIES),
    "autoround": ("qweight, qzeros, scales", QUANT_FAMILIES),
    "intel/auto-round": ("qweight, qzeros, scales", QUANT_FAMILIES),
    "bitsandbytes": ("packed 4/8-bit weights", ()),
    "gguf": ("packed GGUF blocks", ()),
    "hqq": ("packed weights", ()),
    "eetq": ("int8 weights", ()),
    "torchao": ("packed weights", ()),
}


def quantization_of(raw: dict) -> dict | None:
    """The `quantization_config` (or older `compression_config`) of a config or of its text_config."""
    for cfg in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}):
        for key in ("quantization_config", "compression_config"):
            if cfg.get(key):
                return cfg[key] if isinstance(cfg[key], dict) else {"quant_method": str(cfg[key])}
    return None


def refuse_quantized(raw: dict, directory: Path, runs_on: str | None) -> None:
    """One line naming the format, unless `runs_on` (a model_type; None for a drafter) implements it."""
    quant = quantization_of(raw)
    if quant is None:
        return
    method = str(quant.get("quant_method") or ("bitsandbytes" if quant.get("load_in_4bit") or quant.get("load_in_8bit")
                                               else "unknown"))
    stores, families = QUANTIZATION_FORMATS.get(method.lower(), ("", ()))
    if runs_on is not None and runs_on in families:
        return
    what = f"{method}, {stores}" if stores else method
    raise DflashError(f"{directory}: this checkpoint is quantized ({what}); dflash cannot run quantized weights "
                      f"{'in a drafter' if runs_on is None and families else 'yet'}: use the bf16 checkpoint")


def _sliding_layers(cfg: dict) -> bool:
    """Whether transformers' Qwen3/Qwen3-MoE config gives any layer a sliding window (their __post_init__)."""
    if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return False  # transformers sets sliding_window to None unless use_sliding_window
    if cfg.get("model_type") == "qwen3_moe":
        return True  # every layer's attention takes config.sliding_window
    if cfg.get("layer_types"):
        return "sliding_attention" in cfg["layer_types"]
    return int(cfg.get("max_window_layers", 28)) < int(cfg.get("num_hidden_layers") or 0)


def refuse_unimplemented(raw: dict, directory: Path) -> None:
    """Config settings that change a target's math in a way no dflash family implements: refused by name."""
    refuse_quantized(raw, directory, raw.get("model_type"))
    if raw.get("model_type") in ("qwen3", "qwen3_moe") and _sliding_layers(raw):
        raise DflashError(f"{directory}/config.json: use_sliding_window is true (a window of {raw['sliding_window']} "
                          f"tokens); dflash does not implement Qwen3's sliding window: use a config without it")


# Keys transformers reads under two names: model_type → its config class's `attribute_map` {alias: name}
# (tests/test_config_boundary.py checks this table against transformers). A config.json may spell either.
CONFIG_ALIASES: dict[str, dict[str, str]] = {
    "qwen3_moe": {"num_experts": "num_local_experts"},
    "gpt_oss": {"num_experts": "num_local_experts"},
}


def with_aliases(raw: dict) -> dict:
    """`raw` (and its text_config) with each aliased key under both names, so that a family reads whichever
    spelling it names. Where a file gives both, the attribute's own name wins, as transformers reads it."""
    def fill(cfg: dict) -> dict:
        aliases = CONFIG_ALIASES.get(cfg.get("model_type"), {})
        if not any(k in cfg for pair in aliases.items() for k in pair):
            return cfg
        cfg = dict(cfg)
        for alias, name in aliases.items():
            value = cfg.get(name, cfg.get(alias))
            if value is not None:
                cfg[alias] = cfg[name] = value
        return cfg

    out = fill(raw)
    if isinstance(raw.get("text_config"), dict):
        out = dict(out, text_config=fill(raw["text_config"]))
    return out


class Fields:
    """Reads required and optional fields from a config dict with errors that name the file."""

    def __init__(self, raw: dict, where: Path):
        self.raw, self.where = raw, where

    def refuse(self, *keys: str, why: str) -> None:
        """Fail on keys that would change the math in a way this code does not implement."""
        if any(self.raw.get(k) for k in keys):
            raise DflashError(f"{self.where}: {why}")

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


def rope_params(raw: dict, f: Fields, drop: tuple[str, ...] = ()) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from `rope_theta`/`rope_scaling` or transformers 5's `rope_parameters`;
    `drop`: keys a family's scaling must not carry (dropping them leaves None for a default rope)."""
    params = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", params.get("rope_theta", 10_000.0))  # transformers' default_theta when absent
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and drop:
        scaling = {k: v for k, v in scaling.items() if k not in drop}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    return float(theta), scaling


@dataclass(frozen=True)
class LayerShape:
    """The layer shape a target's and a drafter's config.json give alike: the first fields of DecoderConfig
    (models/base.py) and of DrafterConfig."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None

    @staticmethod
    def read(raw: dict, f: Fields, *, eps: float = 1e-6, head_dim: int | None = None, intermediate: bool = True,
             rope_drop: tuple[str, ...] = ()) -> dict:
        """These fields of `raw` as keyword arguments (a family passes its defaults)."""
        theta, scaling = rope_params(raw, f, rope_drop)
        hidden, heads = f.req("hidden_size"), f.req("num_attention_heads")
        return dict(
            hidden_size=hidden,
            intermediate_size=f.req("intermediate_size") if intermediate else f.opt("intermediate_size", 0) or 0,
            num_layers=f.req("num_hidden_layers"), num_heads=heads, num_kv_heads=f.opt("num_key_value_heads", heads),
            head_dim=f.opt("head_dim", head_dim) or hidden // heads, rms_norm_eps=f.opt("rms_norm_eps", eps, float),
            rope_theta=theta, rope_scaling=scaling)


# Drafter config keys that change the math; refused until implemented (research/dflash2.md §1, hybrid.md §4).
UNSUPPORTED_DRAFTER_KEYS = ("input_embedding_scale", "output_multiplier", "final_logit_softcapping",
                            "attention_sink_bias", "use_swa", "swa_window_size")
# The head and embedding knobs a DFlash2 drafter may set (applied in drafter.py; refused on v1 drafters,
# where no released checkpoint sets them).
DFLASH2_SCALE_KEYS = ("input_embedding_scale", "output_multiplier", "final_logit_softcapping")
DRAFTER_ARCHITECTURES = ("DFlashDraftModel", "DFlash2DraftModel", "MuseGlimmerAssistantModel")
# A v1 drafter shares the target's head: the Gemma 4 drafters restate its soft-cap (30) in their config,
# which `check_against` accepts when it is the target's own cap and refuses otherwise.
V1_HEAD_KEY = "final_logit_softcapping"

# How a gpt_oss drafter config.json is read (README, "gpt-oss"): "transformers" (the default) as
# AutoConfig reads it, GptOssConfig's defaults filling in the rope and window keys it leaves out (what
# SGLang sees); "raw" as written (plain RoPE, every layer full), for an acceptance A/B on a GPU.
DRAFTER_CONFIG_READING = "DFLASH_DRAFTER_CONFIG"


def _as_transformers_reads(raw: dict) -> dict:
    """A drafter config as its model_type's family reads it (a gpt_oss one with GptOssConfig's defaults
    filled in), unless DFLASH_DRAFTER_CONFIG=raw."""
    reading = os.environ.get(DRAFTER_CONFIG_READING, "transformers")
    if reading not in ("transformers", "raw"):
        raise DflashError(f"{DRAFTER_CONFIG_READING} must be transformers or raw, not {reading!r}")
    if reading == "raw":
        return raw
    from .models import drafter_defaults  # the family of the config's model_type says (gpt-oss: a hook)

    return drafter_defaults(raw)


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's fallback: evenly spaced from layer 1 to L-3 (one draft layer: L//2)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class DFlash2Config:
    """The DFlash2 modules' sizes (research/dflash2.md §1.1): per-sublayer dynamic convs and the selector."""

    conv_kernel_size: int  # taps K
    conv_group_size: int  # channels sharing one dynamic kernel value
    selector_rank: int  # r of the codebooks and the hidden projection
    selector_top_k: int  # candidates rescored per draft row

    @classmethod
    def from_raw(cls, raw: dict, dflash: dict, directory: Path, hidden: int, vocab: int) -> "DFlash2Config":
        def req(key: str) -> int:
            value = _knob(raw, dflash, key, None, int, directory)
            if value is None:
                raise DflashError(f"{directory}/config.json is missing '{key}' (dflash_config or top level), "
                                  "which a DFlash2DraftModel needs")
            if value < 1:
                raise DflashError(f"{directory}/config.json: '{key}' must be at least 1, got {value}")
            return value

        c = cls(req("conv_kernel_size"), req("conv_group_size"), req("selector_rank"), req("selector_top_k"))
        if hidden % c.conv_group_size:
            raise DflashError(f"{directory}/config.json: hidden_size {hidden} is not a multiple of "
                              f"conv_group_size {c.conv_group_size}")
        if c.selector_top_k > vocab:
            raise DflashError(f"{directory}/config.json: selector_top_k {c.selector_top_k} exceeds the vocabulary "
                              f"({vocab})")
        return c


def _knob(raw: dict, dflash: dict, key: str, default, kind: type, directory: Path):
    """dflash_config[key], else the top-level key, else `default` (the newest reference's rule)."""
    source = dflash if dflash.get(key) is not None else raw
    return Fields(source, Path(directory)).opt(key, default, kind)


@dataclass(frozen=True)
class DrafterConfig(LayerShape):
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    vocab_size: int | None
    sliding_windows: tuple[int | None, ...]  # per draft layer
    causal: tuple[bool, ...]  # per draft layer: causal inside the block (the context is always visible)
    dflash2: DFlash2Config | None = None  # a DFlash2DraftModel's convs and selector; None for v1
    input_embedding_scale: float = 1.0  # the block's target embeddings times this
    output_multiplier: float = 1.0  # the head's logits times this, then softcapped when the cap is set
    final_logit_softcapping: float | None = None
    attention_bias: bool = False  # q/k/v/o biases (the gpt-oss drafters)
    renames: tuple[tuple[str, str], ...] = ()  # (our tensor name, the checkpoint's): other formats (speculators.py)

    @classmethod
    def from_dir(cls, directory: Path) -> "DrafterConfig":
        return cls.from_raw(read_config(directory), Path(directory))

    @classmethod
    def from_raw(cls, raw: dict, directory: Path) -> "DrafterConfig":
        from .speculators import native_config

        refuse_quantized(raw, Path(directory), None)  # drafter.py reads plain weights only
        raw, renames = native_config(raw, Path(directory))  # other formats, as the native config they mean
        raw = _as_transformers_reads(raw)
        f = Fields(raw, Path(directory))
        dflash = raw.get("dflash_config") or {}
        inner = Fields(dflash, Path(directory))
        v2 = raw.get("architectures") == ["DFlash2DraftModel"]
        for key in UNSUPPORTED_DRAFTER_KEYS:  # each would change the drafter's math: refuse, never ignore
            if (v2 and key in DFLASH2_SCALE_KEYS) or key == V1_HEAD_KEY:  # v1's: check_against
                continue
            value = dflash.get(key, raw.get(key))
            if value not in (None, False, 1, 1.0, 0, 0.0):
                raise DflashError(f"{directory}/config.json: '{key}' = {value!r} changes the drafter's math "
                                  "and is not supported by this version")

        def either(key: str) -> int:
            if raw.get(key) is not None:
                return f.req(key)
            if dflash.get(key) is not None:
                return inner.req(key)
            raise DflashError(f"{directory}/config.json is missing '{key}' (top level or dflash_config)")

        shape = LayerShape.read(raw, f)
        hidden, num_layers = shape["hidden_size"], shape["num_layers"]
        layer_ids = dflash.get("target_layer_ids")
        if v2:
            layer_ids = _knob(raw, dflash, "target_layer_ids", None, list, directory)
            if layer_ids is None:  # a guess loads cleanly and reads the wrong layers (z-lab #157)
                raise DflashError(f"{directory}/config.json is missing 'dflash_config.target_layer_ids', which a "
                                  "DFlash2DraftModel needs (no guess: the wrong layers load without error)")
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
        if "sliding_attention" in layer_types and not window:
            raise DflashError(f"{directory}/config.json: sliding_attention layers need a sliding_window")
        # Causality inside the block, as the newest reference and vLLM resolve it: `is_causal` (top
        # level), else dflash_config.causal, else sliding layers causal and full layers not.
        forced = raw.get("is_causal", dflash.get("causal"))
        causal = tuple(bool(forced) if forced is not None else t == "sliding_attention" for t in layer_types)
        vocab = f.req("vocab_size") if v2 else f.opt("vocab_size", None)  # v2: the codebooks' rows
        return cls(
            block_size=either("block_size"),
            mask_token_id=either("mask_token_id"),
            target_layer_ids=tuple(int(i) for i in layer_ids),
            vocab_size=vocab,
            **shape,
            sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
            causal=causal,
            **(_dflash2_fields(raw, dflash, Path(directory), hidden, vocab) if v2 else
               {"final_logit_softcapping": _knob(raw, dflash, V1_HEAD_KEY, None, float, directory) or None}),
            attention_bias=bool(raw.get("attention_bias", False)),
            renames=renames,
        )

    def check_against(self, target, directory: Path) -> None:
        """Fail before any weight is read when the drafter cannot serve this target."""
        where = f"drafter {directory} does not match the target:"
        if self.hidden_size != target.hidden_size:
            raise DflashError(f"{where} hidden size {self.hidden_size} vs target {target.hidden_size}")
        if self.vocab_size is not None and self.vocab_size != target.vocab_size:
            raise DflashError(f"{where} vocab size {self.vocab_size} vs target {target.vocab_size}")
        bad = [i for i in self.target_layer_ids if not 0 <= i < target.num_layers]
        if bad:
            raise DflashError(f"{where} target_layer_ids {bad} outside the target's {target.num_layers} layers")
        if len(set(self.target_layer_ids)) != len(self.target_layer_ids):  # features are gathered once per layer
            raise DflashError(f"{where} target_layer_ids {list(self.target_layer_ids)} name a layer twice")
        if not 0 <= self.mask_token_id < target.vocab_size:
            raise DflashError(f"{where} mask_token_id {self.mask_token_id} outside the vocab ({target.vocab_size})")
        if self.block_size < 2:
            raise DflashError(f"drafter {directory}: block_size must be at least 2, got {self.block_size}")
        cap = self.final_logit_softcapping
        if self.dflash2 is None and cap is not None and cap != target.logit_softcap:
            raise DflashError(f"{directory}/config.json: '{V1_HEAD_KEY}' = {cap} changes the drafter's math "
                              "and is not supported by this version (the target's head has no such soft-cap)")

    def for_target(self, embed_scale: float, logit_softcap: float | None) -> "DrafterConfig":
        """This drafter as it runs on its target: it embeds the block with the target's table, scaled as the
        target scales it (`embed_scale`: Gemma 4's √hidden, rounded to the weights' dtype), and its logits
        take the target's soft-cap (a DFlash2 drafter's own knobs win where it sets them)."""
        scale = self.input_embedding_scale if self.input_embedding_scale != 1.0 else embed_scale
        return replace(self, input_embedding_scale=scale,
                       final_logit_softcapping=self.final_logit_softcapping or logit_softcap)


def _dflash2_fields(raw: dict, dflash: dict, directory: Path, hidden: int, vocab: int) -> dict:
    """The DrafterConfig fields only a DFlash2DraftModel sets: its module sizes and the head's scales."""
    multiplier = _knob(raw, dflash, "output_multiplier", 1.0, float, directory)
    softcap = _knob(raw, dflash, "final_logit_softcapping", None, float, directory)
    scale = _knob(raw, dflash, "input_embedding_scale", 1.0, float, directory)
    # A non-positive multiplier would reverse the head's ranking (the selector takes its top-k before scaling).
    for key, value, ok, want in (
            ("output_multiplier", multiplier, 0 < multiplier < math.inf, "a positive number"),
            ("final_logit_softcapping", softcap, softcap is None or 0 <= softcap < math.inf, "a number >= 0"),
            ("input_embedding_scale", scale, math.isfinite(scale), "a finite number")):
        if not ok:
            raise DflashError(f"{directory}/config.json: '{key}' should be {want}, got {value}")
    return dict(dflash2=DFlash2Config.from_raw(raw, dflash, directory, hidden, vocab), input_embedding_scale=scale,
                output_multiplier=multiplier, final_logit_softcapping=softcap or None)
