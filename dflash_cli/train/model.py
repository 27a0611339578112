"""The trainable drafter: a torch module whose parameter names are the released checkpoint's.

`DraftNet.state_dict()` holds exactly the tensors of a z-lab DFlash drafter (DESIGN §2):
`fc.weight`, `hidden_norm.weight`, `norm.weight` and per layer `layers.i.self_attn.{q,k,v,o}_proj`,
`layers.i.self_attn.{q,k}_norm`, `layers.i.mlp.{gate,up,down}_proj`,
`layers.i.{input,post_attention}_layernorm` — no embedding, no lm_head (both are the target's, and
stay frozen). `drafter_config` writes the Qwen3-style config.json with `dflash_config`, so the saved
directory loads in `dflash run --drafter DIR` unchanged, and in SGLang/vLLM.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..config import DrafterConfig


class RMSNorm(nn.Module):
    """The statistic in float32, the scale in the input dtype (as Hugging Face, and the engine)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        h, d = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(h, c.num_heads * d, bias=c.attention_bias)
        self.k_proj = nn.Linear(h, c.num_kv_heads * d, bias=c.attention_bias)
        self.v_proj = nn.Linear(h, c.num_kv_heads * d, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * d, h, bias=c.attention_bias)
        self.q_norm = RMSNorm(d, c.rms_norm_eps)
        self.k_norm = RMSNorm(d, c.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)


class DraftNet(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def reset_parameters(self, seed: int, std: float = 0.02) -> None:
        """Hugging Face's initialisation (normal, std = initializer_range 0.02; norms at 1), seeded."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def default_mask_token_id(tokenizer, vocab_size: int) -> int:
    """The mask id when none is given: a row of the target's embedding table no text ever uses.

    In order: the tokenizer's own mask token; the first padded row past the tokenizer's
    vocabulary (Qwen3: 151669, `<|MASK|>` of the released drafters); the first reserved special
    token (Llama 3: 128002, as released); the unknown token. The row is the target's, frozen: the
    drafter learns what it means."""
    if getattr(tokenizer, "mask_token_id", None) is not None and tokenizer.mask_token_id < vocab_size:
        return int(tokenizer.mask_token_id)
    if len(tokenizer) < vocab_size:
        return len(tokenizer)
    reserved = sorted(i for t, i in tokenizer.get_vocab().items() if "reserved" in t.lower() and i < vocab_size)
    if reserved:
        return reserved[0]
    if getattr(tokenizer, "unk_token_id", None) is not None:
        return int(tokenizer.unk_token_id)
    raise ValueError("no spare token id for the mask")


def drafter_config(target, *, block_size: int, num_layers: int, target_layer_ids: list[int],
                   mask_token_id: int, dtype: str = "float32", enable_thinking: bool = False) -> dict:
    """config.json of a drafter for `target` in the released layout: a Qwen3 config with the
    target's widths, plus `block_size` and `dflash_config` (DESIGN §2). `block_size` is written at
    the top level too, where the reference code and SGLang read it. `dflash_config.enable_thinking` is
    the thinking mode it was trained in: the pair's chat default (formats.thinking_default)."""
    cfg = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": target.hidden_size,
        "intermediate_size": target.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": target.num_heads,
        "num_key_value_heads": target.num_kv_heads,
        "head_dim": target.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": target.rms_norm_eps,
        "rope_theta": target.rope_theta,
        "max_position_embeddings": target.max_position_embeddings,
        "vocab_size": target.vocab_size,
        "num_target_layers": target.num_layers,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "torch_dtype": dtype,
        "block_size": block_size,
        "dflash_config": {"block_size": block_size, "mask_token_id": mask_token_id,
                          "target_layer_ids": list(target_layer_ids), "enable_thinking": enable_thinking},
    }
    if target.rope_scaling:
        cfg["rope_scaling"] = target.rope_scaling
    return cfg


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(directory: Path, config: dict) -> None:
    write_atomic(directory / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def save_weights(directory: Path, net: DraftNet, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """model.safetensors with the released names, in `dtype`, written atomically."""
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in net.state_dict().items()}
    write_atomic(directory / "model.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"format": "pt", **metadata}))


def new_drafter(directory: Path, config: dict, seed: int) -> DraftNet:
    """Write `config` as DIR/config.json and build a freshly initialised drafter from it, read back
    through the engine's own config parser (so what is trained is what will be loaded)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_config(directory, config)
    net = DraftNet(DrafterConfig.from_dir(directory))
    net.reset_parameters(seed)
    return net
