"""Tiny gpt-oss checkpoints in the released layout, with MXFP4-packed experts, a harmony tokenizer and
transformers' own GptOssForCausalLM (eager attention) on the same weights as the reference.

The experts are drawn dense, packed with our own quantiser (scale = 2^ceil(log2(amax / 6)) per group of
32, nearest e2m1 value) and the reference gets them back through transformers' dequantiser
(`convert_moe_packed_tensors`), so both sides hold identical, exactly representable weights and the
packed layout is checked against transformers' reading of it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from .tiny import save_weights

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
PINNED_DATE = "2025-08-05"  # what `strftime_now` renders in tests (the real template prints today's date)
HARMONY_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|reserved_200000|>", "<|reserved_200001|>", "<|return|>",
                    "<|constrain|>", "<|reserved_200004|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>",
                    "<|reserved_200009|>", "<|reserved_200010|>", "<|reserved_200011|>", "<|call|>")  # the real order


def gpt_oss_config(*, vocab: int = 512, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                   head_dim: int = 16, experts: int = 8, top_k: int = 4, intermediate: int = 64, window: int = 8,
                   mxfp4: bool = True) -> dict:
    """The released config.json (research/moe-gptoss.md §2.1) with the dimensions shrunk: YaRN as
    released, a window shorter than the test prompts, and harmony's stop tokens inside the tiny vocab."""
    cfg = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "experts_per_token": top_k, "sliding_window": window,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2), "swiglu_limit": 7.0,
        "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                               "beta_slow": 1.0, "original_max_position_embeddings": 4096,
                                               "truncate": False},
        "rms_norm_eps": 1e-5, "attention_bias": True, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "initial_context_length": 4096, "router_aux_loss_coef": 0.9,
        "output_router_logits": False, "use_cache": True, "hidden_act": "silu", "torch_dtype": "float32",
        "pad_token_id": 257, "eos_token_id": 260,
    }
    if mxfp4:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return cfg


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (nn.Linear orientation, K inputs) → (blocks [..., K/32, 16] u8, scales [..., K/32] u8)."""
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True).clamp_min(2.0**-100)
    exponent = torch.ceil(torch.log2(amax / 6.0))  # amax / 2^e <= 6, the largest e2m1 magnitude
    scaled = groups / torch.exp2(exponent)
    magnitude = (scaled.abs()[..., None] - E2M1_MAGNITUDES).abs().argmin(-1)  # nearest of the 8 magnitudes
    nibble = magnitude | ((scaled < 0).long() << 3)
    blocks = (nibble[..., 0::2] | (nibble[..., 1::2] << 4)).to(torch.uint8)  # element 2i in the low nibble
    return blocks, (exponent[..., 0] + 127).to(torch.uint8)


def random_state(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """transformers' gpt-oss parameters (dense experts, [E, in, out]), drawn so that activations stay O(1),
    sinks and router biases matter, and gate/up pre-activations often pass the clamp (limit 7)."""
    g = torch.Generator().manual_seed(seed)
    h, hd, e, i = cfg["hidden_size"], cfg["head_dim"], cfg["num_local_experts"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def randn(*shape, std=1.0):
        return torch.randn(shape, generator=g) * std

    w = {"model.embed_tokens.weight": randn(cfg["vocab_size"], h), "model.norm.weight": 1 + randn(h, std=0.1),
         "lm_head.weight": randn(cfg["vocab_size"], h, std=4 / math.sqrt(h))}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w |= {p + "input_layernorm.weight": 1 + randn(h, std=0.1), p + "post_attention_layernorm.weight": 1 + randn(h, std=0.1)}
        for name, rows, cols, gain in (("q", q, h, 2.0), ("k", kv, h, 2.0), ("v", kv, h, 1.0), ("o", h, q, 1.0)):
            w[p + f"self_attn.{name}_proj.weight"] = randn(rows, cols, std=gain / math.sqrt(cols))
            w[p + f"self_attn.{name}_proj.bias"] = randn(rows, std=0.1)
        w[p + "self_attn.sinks"] = randn(cfg["num_attention_heads"], std=1.0)
        w |= {p + "mlp.router.weight": randn(e, h, std=4 / math.sqrt(h)), p + "mlp.router.bias": randn(e, std=0.5),
              p + "mlp.experts.gate_up_proj": randn(e, h, 2 * i, std=0.6),  # pre-activations of std ~5: clamped
              p + "mlp.experts.gate_up_proj_bias": randn(e, 2 * i, std=0.5),
              p + "mlp.experts.down_proj": randn(e, i, h, std=1 / math.sqrt(i)),
              p + "mlp.experts.down_proj_bias": randn(e, h, std=0.1)}
    return w


def pack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released MXFP4 layout: each dense [E, in, out] expert tensor as `_blocks`/`_scales` of [E, out, in]."""
    out = {}
    for name, t in state.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(t.transpose(1, 2))
        else:
            out[name] = t
    return out


def unpack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' own dequantiser back to its dense parameters (the reference's reading of the layout)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = {}
    for name, t in state.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            out[base] = convert_moe_packed_tensors(t, state[base + "_scales"], dtype=torch.float32)
        else:
            out[name] = t
    return out


def write_gpt_oss(directory: Path, cfg: dict, seed: int = 0, tokenizer: bool = True) -> Path:
    """A tiny gpt-oss checkpoint: MXFP4-packed experts when the config says so (the release), else
    transformers' dense parameters (a dequantised export). Weights are the dequantised ones either way."""
    directory.mkdir(parents=True, exist_ok=True)
    state = pack_experts(random_state(cfg, seed))
    if "quantization_config" not in cfg:
        state = unpack_experts(state)
    save_weights(directory, state)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        ids = write_harmony_tokenizer(directory)
        eos = [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]]
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos[1]}))
    return directory


def reference(directory: Path):
    """transformers' GptOssForCausalLM with eager attention on the checkpoint's weights, dequantised
    by transformers (its MXFP4 loader needs accelerate and kernels: built in memory instead)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    raw = json.loads((directory / "config.json").read_text())
    config = GptOssConfig(**{k: v for k, v in raw.items() if k not in ("quantization_config", "architectures")})
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).float().eval()
    model.load_state_dict(unpack_experts(load_file(str(directory / "model.safetensors"))), strict=True)
    return model


# ---- a tiny harmony tokenizer --------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = visible[:], 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(visible, map(chr, chars)))


def harmony_template() -> str:
    """A chat template that renders harmony as the gpt-oss one does (research/moe-gptoss.md §8): the system
    message with the model identity, `strftime_now` date and reasoning effort; a developer message for a
    system prompt; past assistant turns as final messages (their reasoning dropped), tool calls and tool
    results; `<|start|>assistant` as the generation prompt. Tool definitions are not rendered."""
    return (
        '{%- if model_identity is not defined %}{%- set model_identity = "You are ChatGPT, a large language model '
        'trained by OpenAI." %}{%- endif %}'
        '{%- if reasoning_effort is not defined %}{%- set reasoning_effort = "medium" %}{%- endif %}'
        '{{- "<|start|>system<|message|>" + model_identity + "\\nKnowledge cutoff: 2024-06\\nCurrent date: " + '
        'strftime_now("%Y-%m-%d") + "\\n\\nReasoning: " + reasoning_effort + "\\n\\n# Valid channels: analysis, '
        'commentary, final. Channel must be included for every message.<|end|>" }}'
        '{%- if messages[0].role == "developer" or messages[0].role == "system" %}'
        '{{- "<|start|>developer<|message|># Instructions\\n\\n" + messages[0].content + "\\n\\n<|end|>" }}'
        '{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}'
        '{%- set last_tool_call = namespace(name=none) %}'
        '{%- for message in loop_messages %}'
        '{%- if message.role == "assistant" and "tool_calls" in message %}'
        '{%- set call = message.tool_calls[0].function if message.tool_calls[0].function else message.tool_calls[0] %}'
        '{{- "<|start|>assistant to=functions." + call.name + "<|channel|>commentary json<|message|>" + '
        'call.arguments|tojson + "<|call|>" }}{%- set last_tool_call.name = call.name %}'
        '{%- elif message.role == "assistant" %}'
        '{{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}'
        '{%- elif message.role == "tool" %}'
        '{{- "<|start|>functions." + last_tool_call.name + " to=assistant<|channel|>commentary<|message|>" + '
        'message.content|tojson + "<|end|>" }}'
        '{%- elif message.role == "user" %}{{- "<|start|>user<|message|>" + message.content + "<|end|>" }}'
        '{%- endif %}{%- endfor %}'
        '{%- if add_generation_prompt %}<|start|>assistant{%- endif %}'
    )


def write_harmony_tokenizer(directory: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer (ids 0..255 are the bytes, no merges) with harmony's special tokens
    after them, in their real order (ids 256..270: inside a 512-row vocab), and the harmony template.
    Returns the special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|return|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = harmony_template()
    fast.save_pretrained(str(directory))
    return {t: fast.convert_tokens_to_ids(t) for t in HARMONY_SPECIALS}


def gpt_oss_drafter_config(target_cfg: dict, *, block_size: int = 8, layers: int = 2, target_layer_ids=(1, 3),
                           mask_token_id: int = 511, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                           intermediate: int = 128) -> dict:
    """A gpt-oss drafter's config.json as z-lab ships it (research/moe-gptoss.md §4): model_type gpt_oss,
    attention biases, rope_theta but no rope_scaling, layer_types or sliding_window keys."""
    return {
        "architectures": ["DFlashDraftModel"], "attention_bias": True, "attention_dropout": 0.0,
        "block_size": block_size, "bos_token_id": 256, "eos_token_id": 260,
        "dflash_config": {"mask_token_id": mask_token_id, "target_layer_ids": list(target_layer_ids)},
        "dtype": "float32", "head_dim": head_dim, "hidden_act": "silu", "hidden_size": target_cfg["hidden_size"],
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": intermediate,
        "max_position_embeddings": target_cfg["max_position_embeddings"], "model_type": "gpt_oss",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 150000, "vocab_size": target_cfg["vocab_size"],
    }
