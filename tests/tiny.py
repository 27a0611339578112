"""Tiny checkpoints in the exact Hugging Face / DFlash layouts, written by tests.

Random weights at the default init make a model repeat one token; these are scaled (unit-variance
embeddings, 1/sqrt(fan_in) projections) so that greedy continuations vary with the context.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dflash_cli.drafter import weight_table as drafter_table
from dflash_cli.config import DrafterConfig
from dflash_cli.models import family_of
from dflash_cli.models.weights import random_weights

# Real files, kept in this repository (tests/data/README.md says where they come from).
QWEN3_TOKENIZER = Path(__file__).resolve().parent / "data" / "qwen3-tokenizer"
STORIES = Path(__file__).resolve().parents[1] / "dflash_cli" / "data" / "demo" / "stories260K"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


def target_config(family: str = "qwen3", *, vocab: int = 512, hidden: int = 64, layers: int = 4, heads: int = 4,
                  kv_heads: int = 2, head_dim: int = 16, intermediate: int = 128, max_pos: int = 1024,
                  tie: bool = True, rope_scaling: dict | None = None) -> dict:
    arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[family]
    cfg = {
        "architectures": [arch], "model_type": family, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": max_pos, "tie_word_embeddings": tie, "hidden_act": "silu",
        "attention_bias": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def write_target(directory: Path, cfg: dict, seed: int = 0, shards: int = 1,
                 extra: dict[str, torch.Tensor] | None = None, layout: str | None = None) -> Path:
    """A checkpoint in `cfg`'s family layout: random weights drawn from the family's own weight table
    (the tensors the loader reads, by their released names), plus `extra` tensors the loader must skip."""
    directory.mkdir(parents=True, exist_ok=True)
    family = family_of(cfg, directory)
    weights = random_weights(family.weight_table(family.Config.from_raw(cfg, directory), layout), seed=seed)
    save_weights(directory, weights | (extra or {}), shards)
    _write_json(directory / "config.json", cfg)
    text = cfg.get("text_config", cfg)
    _write_json(directory / "generation_config.json", {"bos_token_id": text.get("bos_token_id", cfg.get("bos_token_id")),
                                                       "eos_token_id": text.get("eos_token_id", cfg.get("eos_token_id"))})
    if text["vocab_size"] == 512:  # the stories260K tokenizer fits: 512 ids, BOS 1, EOS 2
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(STORIES / name, directory / name)
    return directory


def save_weights(directory: Path, weights: dict[str, torch.Tensor], shards: int = 1) -> None:
    weights = {k: v.contiguous() for k, v in weights.items()}
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(directory / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    _write_json(directory / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def drafter_config(target_cfg: dict, *, block_size: int = 8, layers: int = 2, target_layer_ids=(1, 2),
                   mask_token_id: int | None = None, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                   intermediate: int = 128, top_level: bool = False, layer_types=None, sliding_window=None) -> dict:
    mask = target_cfg["vocab_size"] - 1 if mask_token_id is None else mask_token_id
    cfg = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "hidden_size": target_cfg["hidden_size"], "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": target_cfg["max_position_embeddings"],
        "vocab_size": target_cfg["vocab_size"], "num_target_layers": target_cfg["num_hidden_layers"],
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "dflash_config": {"target_layer_ids": list(target_layer_ids)},
    }
    where = cfg if top_level else cfg["dflash_config"]
    where |= {"block_size": block_size, "mask_token_id": mask}
    if layer_types:
        cfg |= {"layer_types": layer_types, "sliding_window": sliding_window}
    return cfg


def dflash2_config(target_cfg: dict, *, layers: int = 2, sliding_window: int = 16, group_size: int = 16,
                   rank: int = 16, top_k: int = 16, **kwargs) -> dict:
    """A tiny DFlash2 drafter's config.json in the released layout (research/dflash2.md §1.1): every
    layer sliding and non-causal (top-level `is_causal`: false), rope in `rope_parameters`, the conv
    and selector sizes in dflash_config, no auto_map. `kwargs` go to `drafter_config`."""
    cfg = drafter_config(target_cfg, layers=layers, layer_types=["sliding_attention"] * layers,
                         sliding_window=sliding_window, **kwargs)
    del cfg["auto_map"]
    cfg |= {"architectures": ["DFlash2DraftModel"], "is_causal": False, "use_sliding_window": True,
            "rope_parameters": {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}}
    cfg["dflash_config"] |= {"conv_kernel_size": 2, "conv_group_size": group_size, "selector_rank": rank,
                             "selector_top_k": top_k}
    return cfg


def write_drafter(directory: Path, cfg: dict, seed: int = 1, weights: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = random_weights(drafter_table(DrafterConfig.from_raw(cfg, directory)), seed=seed)
    save_weights(directory, weights)
    _write_json(directory / "config.json", cfg)
    return directory


def copy_qwen3_tokenizer(directory: Path) -> None:
    for f in QWEN3_TOKENIZER.iterdir():
        shutil.copy(f, directory / f.name)


def copy_stories(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for f in STORIES.iterdir():
        if f.suffix != ".md":
            shutil.copyfile(f, directory / f.name)  # contents only: not the source's permissions
    return directory


# ---- Qwen3.5 / 3.6 hybrids (research/hybrid.md §6) ---------------------------------------------------------
def qwen35_config(*, vocab: int = 512, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                  head_dim: int = 32, intermediate: int = 96, tie: bool = False, wrapper: bool = True,
                  layer_types=None, max_pos: int = 1024) -> dict:
    """A tiny Qwen3.5 config in the released layout: the VL wrapper (text config under text_config) or a
    text-only export. Rotary dims = head_dim / 4, as released (mrope_section sums to half of them)."""
    text = {
        "model_type": "qwen3_5_text", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "rms_norm_eps": 1e-6, "max_position_embeddings": max_pos, "hidden_act": "silu",
        "layer_types": layer_types or ["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                       for i in range(layers)],
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1] if head_dim == 32 else [head_dim // 16, head_dim // 32,
                                                                             head_dim // 32],
                            "mrope_interleaved": True},
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    if not wrapper:
        return text | {"architectures": ["Qwen3_5ForCausalLM"], "tie_word_embeddings": tie}
    vision = {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": hidden, "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2,
              "num_position_embeddings": 16, "in_channels": 3}
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
            "vision_config": vision, "tie_word_embeddings": tie, "torch_dtype": "float32",
            "image_token_id": vocab - 4, "video_token_id": vocab - 3, "vision_start_token_id": vocab - 6,
            "vision_end_token_id": vocab - 5}


def write_qwen35(directory: Path, cfg: dict, seed: int = 0, slow_decay: bool = False, layout: str | None = None) -> Path:
    """A tiny Qwen3.5 checkpoint: the text weights from the family's table, and what a release also holds
    and dflash must skip: the vision tower (transformers' own tensors, so its reference loads them) and
    `mtp.*`. `slow_decay`: A_log ~ log U(0.01, 0.1), so the recurrent state remembers long."""
    extra = {"mtp.fc.weight": torch.zeros(4, 4), "mtp.layers.0.input_layernorm.weight": torch.zeros(4)}
    if "vision_config" in cfg:
        import transformers

        moe = cfg["model_type"] == "qwen3_5_moe"
        config_cls = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
        model_cls = transformers.Qwen3_5MoeForConditionalGeneration if moe else transformers.Qwen3_5ForConditionalGeneration
        torch.manual_seed(seed)
        with torch.device("meta"):  # only the vision tower's names and shapes are wanted from it
            hf = model_cls(config_cls(**{k: v for k, v in cfg.items() if k != "architectures"}))
        g = torch.Generator().manual_seed(seed)
        extra |= {"model." + k.removeprefix("model."): torch.randn(v.shape, generator=g) * 0.02
                  for k, v in hf.state_dict().items() if ".visual." in f".{k}"}
    write_target(directory, cfg, seed=seed, extra=extra, layout=layout)
    if slow_decay:
        from safetensors.torch import load_file

        w = load_file(str(directory / "model.safetensors"))
        g = torch.Generator().manual_seed(seed + 1)
        for name in [n for n in w if n.endswith("linear_attn.A_log")]:
            w[name] = torch.empty(w[name].shape).uniform_(0.01, 0.1, generator=g).log()
        save_weights(directory, w)
    return directory


def qwen35_moe_config(*, experts: int = 8, top_k: int = 2, moe_intermediate: int = 32, shared: int = 48,
                      **kw) -> dict:
    """A tiny Qwen3.5-MoE (35B-A3B layout): every layer's MLP is experts plus a gated shared expert."""
    cfg = qwen35_config(**kw)
    text = cfg.get("text_config", cfg)
    text |= {"model_type": "qwen3_5_moe_text", "num_experts": experts, "num_experts_per_tok": top_k,
             "moe_intermediate_size": moe_intermediate, "shared_expert_intermediate_size": shared}
    del text["intermediate_size"]
    if "text_config" in cfg:
        cfg |= {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe"}
        cfg["vision_config"]["model_type"] = "qwen3_5_moe_vision"
    else:
        cfg["architectures"] = ["Qwen3_5MoeForCausalLM"]
    return cfg


def qwen3_moe_config(*, vocab: int = 512, hidden: int = 64, layers: int = 3, experts: int = 16, top_k: int = 4,
                     moe_intermediate: int = 32, norm_topk_prob: bool = True, tie: bool = False) -> dict:
    """A tiny Qwen3-MoE (the Qwen3-Coder-30B-A3B layout, per-expert tensors by default)."""
    cfg = target_config("qwen3", vocab=vocab, hidden=hidden, layers=layers, tie=tie)
    return cfg | {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": experts,
                  "num_experts_per_tok": top_k, "moe_intermediate_size": moe_intermediate,
                  "norm_topk_prob": norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "intermediate_size": 96}
