"""Tiny Gemma 4 checkpoints in the released layouts: the 12B's `gemma4_unified` wrapper, the 31B's
`gemma4` wrapper (dense) and the 26B-A4B's (routed experts beside the MLP), written from the family's own
weight table; transformers' Gemma4 classes are the reference that reads them."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

from .tiny import drafter_config, save_weights, write_target

SLIDING, FULL = "sliding_attention", "full_attention"
WINDOW = 8  # shorter than every prompt: the window boundary is crossed


def gemma4_text(*, vocab: int = 512, hidden: int = 64, layers: int = 4, moe: bool = False, unified: bool = False,
                window: int = WINDOW, softcap: float = 3.0, tie: bool = True) -> dict:
    """The text config of a tiny Gemma 4: sliding layers of 4 heads × 16 (2 KV heads), global layers of
    32-dim heads with one KV head and no v_proj, proportional rope (a quarter of the pairs rotate); a
    soft-cap of 3 (the released 30 would never bite on a tiny model's logits)."""
    cfg = {
        "model_type": "gemma4_unified_text" if unified else "gemma4_text", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1,
        "attention_k_eq_v": True, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1024, "sliding_window": window,
        "layer_types": [SLIDING if (i + 1) % 3 else FULL for i in range(layers - 1)] + [FULL],
        "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0}},
        "final_logit_softcapping": softcap, "tie_word_embeddings": tie, "num_kv_shared_layers": 0,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }
    if not unified:
        cfg |= {"hidden_size_per_layer_input": 0, "enable_moe_block": moe}
    if moe:
        cfg |= {"num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32}
    return cfg


def gemma4_config(*, unified: bool = False, wrapper: bool = True, **kwargs) -> dict:
    """config.json of the wrapper (`Gemma4ForConditionalGeneration`, `Gemma4UnifiedForConditional
    Generation`) without its vision and audio towers, or of a text-only export (`Gemma4ForCausalLM`)."""
    text = gemma4_text(unified=unified, **kwargs)
    if not wrapper:
        return text | {"architectures": ["Gemma4UnifiedForCausalLM" if unified else "Gemma4ForCausalLM"]}
    name = "gemma4_unified" if unified else "gemma4"
    arch = "Gemma4UnifiedForConditionalGeneration" if unified else "Gemma4ForConditionalGeneration"
    return {"architectures": [arch], "model_type": name, "text_config": text, "vision_config": None,
            "audio_config": None, "tie_word_embeddings": text["tie_word_embeddings"], "torch_dtype": "float32"}


def write_gemma4(directory: Path, cfg: dict, seed: int = 0) -> Path:
    """The checkpoint, its embedding drawn at std 1/√hidden as Gemma's is (the model scales it by √hidden:
    a unit-variance table would drown the stream in the last token's row, and the model repeat it)."""
    from safetensors.torch import load_file

    d = write_target(directory, cfg, seed=seed)
    w = load_file(str(d / "model.safetensors"))
    text = cfg.get("text_config", cfg)
    name = next(n for n in w if n.endswith("embed_tokens.weight"))
    w[name] = w[name] * text["hidden_size"] ** -0.5
    save_weights(d, w)
    return d


def reference(directory: Path) -> torch.nn.Module:
    """transformers' own class for the checkpoint, fp32, every tensor read and none left over."""
    import json

    cfg = json.loads((Path(directory) / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def gemma4_drafter_config(text: dict, *, block_size: int = 8) -> dict:
    """A drafter config.json as z-lab's Gemma 4 drafters ship one: Qwen3-shaped layers, a sliding one
    (causal inside the block) and a full one (not), the target's soft-cap restated."""
    cfg = drafter_config(text, block_size=block_size, layers=2, target_layer_ids=(0, 2),
                         layer_types=[SLIDING, FULL], sliding_window=16)
    return cfg | {"final_logit_softcapping": text["final_logit_softcapping"], "tie_word_embeddings": True}


# ---- a tiny Gemma 4 tokenizer ----------------------------------------------------------------------------
GEMMA4_SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
                   "<|tool_call>", "<tool_call|>", '<|"|>', "<|tool>", "<tool|>", "<|tool_response>",
                   "<tool_response|>"]


def gemma4_template() -> str:
    """The Gemma 4 template's shape: a system turn that opens with <|think|> when thinking is on (and
    declares the tools), turns `<|turn>role\\n…<turn|>\\n` (the assistant's role is "model"), past tool
    calls as `<|tool_call>call:NAME{…}<tool_call|>`, and `<|turn>model\\n` as the generation prompt,
    followed by an empty thought channel when thinking is off."""
    return (
        "{{- bos_token -}}"
        "{%- set think = enable_thinking is defined and enable_thinking -%}"
        "{%- if think or tools or messages[0].role == 'system' -%}"
        "{{- '<|turn>system\\n' -}}{%- if think -%}{{- '<|think|>' -}}{%- endif -%}"
        "{%- if messages[0].role == 'system' -%}{{- messages[0].content -}}{%- endif -%}"
        "{%- for tool in tools or [] -%}{{- '<|tool>declaration:' + tool['function']['name'] + '<tool|>' -}}"
        "{%- endfor -%}{{- '<turn|>\\n' -}}{%- endif -%}"
        "{%- for m in messages if m.role != 'system' -%}"
        "{%- if m.role == 'tool' -%}{{- '<|tool_response>response:' + m.content + '<tool_response|>' -}}"
        "{%- else -%}{{- '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' -}}"
        "{%- for c in m.tool_calls or [] -%}{{- '<|tool_call>call:' + c['function']['name'] + '{' + "
        "c['function']['arguments'] + '}<tool_call|>' -}}{%- endfor -%}"
        "{{- m.content or '' -}}{{- '<turn|>\\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
        "{%- if not think -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}{%- endif -%}"
    )


def write_gemma4_tokenizer(directory: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer (ids 0..255 the bytes) with Gemma 4's markers as special tokens after
    them, and the template above. Returns the markers' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tiny_gpt_oss import _bytes_to_unicode

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA4_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<turn|>", pad_token="<pad>")
    fast.chat_template = gemma4_template()
    fast.save_pretrained(str(directory))
    return {t: fast.convert_tokens_to_ids(t) for t in GEMMA4_SPECIALS}
