"""Tiny Muse-Glimmer checkpoints in the released layout (`MuseGlimmerForConditionalGeneration`: the text model
under `model.language_model.*`, a vision tower dflash never reads), and Meta's v1 assistant head
(`MuseGlimmerAssistantModel`) written from a DFlash drafter of ours."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .tiny import save_weights, write_target

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def muse_config(*, vocab: int = 512, hidden: int = 64, layers: int = 8, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 16, intermediate: int = 128, window: int = 8, theta: float = 10000.0,
                softcap: float = 20.0, multiplier: float = 0.19611613513818404, **text) -> dict:
    """The released config's shape, scaled down: every fourth layer counted from the last is full attention
    and NoPE (transformers' defaults, written out as the release writes them), the others slide over `window`."""
    nope = [(layers - 1 - i) % 4 == 0 for i in range(layers)]
    text_cfg = {
        "model_type": "muse_glimmer_text", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_activation": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024, "tie_word_embeddings": False, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "sliding_window": window,
        "layer_types": ["full_attention" if n else "sliding_attention" for n in nope],
        "layer_rope_theta": [0 if n else theta for n in nope], "final_logit_softcapping": softcap,
        "qk_scale_factor": 3.87, "output_multiplier": multiplier, "post_norm_eps": 1e-8,
        "bos_token_id": 1, "eos_token_id": 2,
    } | text
    return {"architectures": ["MuseGlimmerForConditionalGeneration"], "model_type": "muse_glimmer",
            "text_config": text_cfg, "vision_config": dict(VISION), "out_hidden_size": 32, "projector_hidden_size": 32,
            "torch_dtype": "float32"}


def write_muse(directory: Path, cfg: dict, seed: int = 0) -> Path:
    """The text weights from the family's table, plus the vision tower and projector (transformers' own
    names and shapes, so that its reference loads with nothing missing)."""
    import transformers

    with torch.device("meta"):
        hf = transformers.MuseGlimmerForConditionalGeneration(transformers.MuseGlimmerConfig(
            **{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}))
    g = torch.Generator().manual_seed(seed)
    extra = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in hf.state_dict().items()
             if not k.startswith(("model.language_model.", "lm_head."))}
    return write_target(directory, cfg, seed=seed, extra=extra)


def assistant_config(dflash_cfg: dict, target_cfg: dict) -> dict:
    """Meta's assistant config.json for the same drafter: its keys at the top level, no dflash_config."""
    c = dflash_cfg
    dflash = c.get("dflash_config", {})
    theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta"))
    return {"architectures": ["MuseGlimmerAssistantModel"], "model_type": "muse_glimmer_assistant",
            "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": c["num_attention_heads"],
            "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["head_dim"],
            "rms_norm_eps": c["rms_norm_eps"], "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "max_position_embeddings": c["max_position_embeddings"], "sliding_window": c.get("sliding_window") or 2048,
            "layer_types": c.get("layer_types") or ["sliding_attention"] * c["num_hidden_layers"],
            "block_size": dflash.get("block_size", c.get("block_size")),
            "mask_token_id": dflash.get("mask_token_id", c.get("mask_token_id")),
            "target_layer_ids": dflash.get("target_layer_ids"), "vocab_size": target_cfg["text_config"]["vocab_size"],
            "torch_dtype": "float32"}


ASSISTANT_RENAMES = {"fc.weight": "encoder.fc.weight", "hidden_norm.weight": "encoder.output_norm_enc.weight"}


def write_assistant(directory: Path, drafter_dir: Path, target_cfg: dict) -> Path:
    """A drafter of ours in Meta's assistant layout: the same tensors, two renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    w = load_file(str(Path(drafter_dir) / "model.safetensors"))
    save_weights(directory, {ASSISTANT_RENAMES.get(k, k): v for k, v in w.items()})
    cfg = assistant_config(json.loads((Path(drafter_dir) / "config.json").read_text()), target_cfg)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory
