"""`dflash bench --synthetic SHAPE`: random weights at a released pair's real shapes, no download.

For checking a GPU: times each phase of an iteration at a realistic context length, compares the
decode step with the memory-bandwidth roofline (weight bytes over a measured device-to-device copy
rate), and projects tokens/s for an acceptance length τ. The projection is arithmetic on measured
step times, labelled as such; it is not a measurement of generation. Each shape is a released
config.json, read by its model family like a real checkpoint; the weights come from the family's
weight table, drawn on the device.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import drafter as drafter_module
from . import cuda, ops
from .config import DrafterConfig
from .drafter import Drafter
from . import tree as trees
from .engine import Engine, cache_slack
from .errors import DflashError, UsageError
from .graphs import capture, graphs_enabled
from .memory import GiB, needs_for, quantized_bytes, workspace_bytes
from .models import family_of
from .models.weights import random_weights
from .sampling import Mode

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=128, num_attention_heads=32,
              num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1000000, max_position_embeddings=40960,
              vocab_size=151936)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
TARGETS = {
    "qwen3-8b": _QWEN3 | dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, tie_word_embeddings=False),
    "qwen3-4b": _QWEN3 | dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, tie_word_embeddings=True),
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3,
                        max_position_embeddings=131072, vocab_size=128256, tie_word_embeddings=False),
    # Qwen3.5 / 3.6 text decoders (research/hybrid.md §1): three linear layers for every full one.
    **{name: dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", hidden_size=hidden,
                  intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=4,
                  head_dim=256, linear_num_key_heads=16, linear_num_value_heads=v_heads, linear_key_head_dim=128,
                  linear_value_head_dim=128, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
                  rope_parameters=dict(rope_type="default", rope_theta=10000000, partial_rotary_factor=0.25),
                  max_position_embeddings=262144, vocab_size=248320, tie_word_embeddings=tie)
       for name, hidden, inter, layers, heads, v_heads, tie in (
           ("qwen3.5-4b", 2560, 9216, 32, 16, 32, True), ("qwen3.5-9b", 4096, 12288, 32, 16, 32, False),
           ("qwen3.5-27b", 5120, 17408, 64, 24, 48, False))},
    # Qwen3.8-27B: the Qwen3.5-27B text config (research/hybrid.md §1), 64 layers of which every 4th is full attention.
    "qwen3.8-27b": dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", hidden_size=5120,
                        intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4,
                        head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                        linear_num_key_heads=16, linear_num_value_heads=48, rms_norm_eps=1e-6,
                        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                             mrope_section=[11, 11, 10], mrope_interleaved=True),
                        max_position_embeddings=262144, vocab_size=248320, tie_word_embeddings=False),
    "tiny": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                 rope_theta=1e6, max_position_embeddings=40960, vocab_size=512, tie_word_embeddings=False),
}


def _drafter(target: dict, block: int, layer_ids, mask: int, layers: int = 5, **extra) -> dict:
    """A released drafter's config.json for `target` (DESIGN §2): a Qwen3 config plus dflash_config."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "rope_theta", "rope_scaling", "vocab_size", "max_position_embeddings")
    return {k: target[k] for k in keys if k in target} | dict(
        architectures=["DFlashDraftModel"], model_type="qwen3", num_hidden_layers=layers,
        num_target_layers=target["num_hidden_layers"],
        dflash_config=dict(block_size=block, mask_token_id=mask, target_layer_ids=list(layer_ids))) | extra


def _dflash2(target: dict, block: int, layer_ids, mask: int, layers: int = 5, **dims) -> dict:
    """A released DFlash2 drafter's config.json (research/dflash2.md §1.1): sliding, non-causal layers
    with the convs and the selector; `dims` are its own attention and MLP sizes where they differ."""
    cfg = _drafter(target, block, layer_ids, mask, layers, **dims)
    cfg["dflash_config"] |= dict(conv_kernel_size=2, conv_group_size=16, selector_rank=256, selector_top_k=16)
    theta = target.get("rope_theta") or target["rope_parameters"]["rope_theta"]
    return cfg | dict(architectures=["DFlash2DraftModel"], is_causal=False, layer_types=["sliding_attention"] * layers,
                      sliding_window=2048, rope_theta=theta)


# shape name → (target config.json, drafter config.json, published τ or None). τ: DFlash's GSM8K figure at T=0 (DESIGN §4).
SHAPES: dict[str, tuple[dict, dict, float | None]] = {
    "qwen3-8b": (TARGETS["qwen3-8b"], _drafter(TARGETS["qwen3-8b"], 16, (1, 9, 17, 25, 33), 151669), 6.55),
    "qwen3-4b": (TARGETS["qwen3-4b"], _drafter(TARGETS["qwen3-4b"], 16, (1, 9, 17, 25, 33), 151669), None),
    "llama3.1-8b": (TARGETS["llama3.1-8b"], _drafter(TARGETS["llama3.1-8b"], 10, (1, 8, 15, 22, 29), 128002), None),
    # Its drafter's config as published (research/dflash2.md §1.1); no τ measured on the same footing.
    "qwen3.8-27b": (TARGETS["qwen3.8-27b"], _dflash2(TARGETS["qwen3.8-27b"], 8, (5, 19, 33, 47, 61), 248070,
                                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128),
                    None),
    "tiny": (TARGETS["tiny"], _drafter(TARGETS["tiny"], 8, (1, 2), 511, layers=2), None),
    "tiny-dflash2": (TARGETS["tiny"], _dflash2(TARGETS["tiny"], 8, (1, 2), 511, layers=2), None),
}
# The Qwen3.5 drafters: 5 Qwen3 layers of 32/8 heads × 128 (not the target's 256), θ 1e7; the 27B one
# (as Qwen3.6-27B-DFlash) with four causal sliding layers of 2048 and a full one (research/hybrid.md §4).
for _name, _ids in (("qwen3.5-4b", (1, 8, 15, 22, 29)), ("qwen3.5-9b", (1, 8, 15, 22, 29)),
                    ("qwen3.5-27b", (1, 16, 31, 46, 61))):
    _t = TARGETS[_name]
    _extra = dict(layer_types=["sliding_attention"] * 4 + ["full_attention"], sliding_window=2048) \
        if _name.endswith("27b") else {}
    SHAPES[_name] = (_t, _drafter(_t | dict(num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                            rope_theta=10000000), 16, _ids, 248070, **_extra), None)
SHAPES["qwen3.6-27b"] = SHAPES["qwen3.5-27b"]
# Gemma 4 (research/landscape-and-quantization.md §A8): 5 sliding layers (256-dim heads) to 1 global (512, its
# own KV heads, k = v), vocab 262144 tied, soft-cap 30. The 31B drafter as its GGUF conversion states it (5
# layers, 64/8 heads × 128, 4 causal sliding of 2048 + 1 full, mask 4); the 12B's and 26B-A4B's drafter sizes
# and taps are not published in a form seen here: the 31B's recipe scaled to their width.
_GEMMA4 = dict(architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", head_dim=256, global_head_dim=512,
               attention_k_eq_v=True, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, sliding_window=1024,
               final_logit_softcapping=30.0, max_position_embeddings=262144, vocab_size=262144,
               tie_word_embeddings=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0)
for _name, _hidden, _inter, _layers, _heads, _kv, _gkv, _moe, _ids, _dheads, _dinter in (
        ("gemma-4-12b", 3840, 15360, 48, 16, 8, 1, {}, (1, 10, 19, 28, 37, 46), 32, 7680),
        ("gemma-4-31b", 5376, 21504, 60, 32, 16, 4, {}, (1, 12, 23, 35, 46, 57), 64, 10752),
        ("gemma-4-26b-a4b", 2816, 2112, 30, 16, 8, 2,
         dict(enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704),
         (1, 6, 12, 17, 23, 28), 32, 5632)):
    TARGETS[_name] = _GEMMA4 | dict(hidden_size=_hidden, intermediate_size=_inter, num_hidden_layers=_layers,
                                    num_attention_heads=_heads, num_key_value_heads=_kv,
                                    num_global_key_value_heads=_gkv, **_moe)
    SHAPES[_name] = (TARGETS[_name], _drafter(
        TARGETS[_name] | dict(num_attention_heads=_dheads, num_key_value_heads=8, head_dim=128,
                              intermediate_size=_dinter, rope_theta=1e6), 16, _ids, 4,
        layer_types=["sliding_attention"] * 4 + ["full_attention"], sliding_window=2048,
        final_logit_softcapping=30.0), None)
# MoE targets (research/moe-gptoss.md §3-4, hybrid.md §1, §4).
TARGETS["qwen3-coder-30b-a3b"] = _QWEN3 | dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=5472,
    num_hidden_layers=48, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    norm_topk_prob=True, rope_theta=10000000, max_position_embeddings=262144, tie_word_embeddings=False)
SHAPES["qwen3-coder-30b-a3b"] = (TARGETS["qwen3-coder-30b-a3b"], _drafter(
    TARGETS["qwen3-coder-30b-a3b"] | dict(intermediate_size=6144), 16, (1, 12, 23, 34, 45), 151669, layers=8), None)
TARGETS["qwen3.5-35b-a3b"] = TARGETS["qwen3.5-4b"] | dict(
    architectures=["Qwen3_5MoeForCausalLM"], model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40,
    num_attention_heads=16, num_key_value_heads=2, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, linear_num_value_heads=32, tie_word_embeddings=False)
del TARGETS["qwen3.5-35b-a3b"]["intermediate_size"]
SHAPES["qwen3.5-35b-a3b"] = (TARGETS["qwen3.5-35b-a3b"], _drafter(
    TARGETS["qwen3.5-35b-a3b"] | dict(intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                                      head_dim=128, rope_theta=10000000), 16, (1, 10, 19, 28, 37), 248070, layers=8), None)
SHAPES["qwen3.6-35b-a3b"] = SHAPES["qwen3.5-35b-a3b"]
TARGETS["tiny-moe"] = TARGETS["qwen3-coder-30b-a3b"] | dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, vocab_size=512)
SHAPES["tiny-moe"] = (TARGETS["tiny-moe"], _drafter(TARGETS["tiny-moe"], 8, (0, 2), 511, layers=1), None)
TARGETS["tiny-hybrid"] = TARGETS["qwen3.5-4b"] | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                     linear_num_key_heads=2, linear_num_value_heads=4,
                                                     linear_key_head_dim=16, linear_value_head_dim=16, vocab_size=512)
SHAPES["tiny-hybrid"] = (TARGETS["tiny-hybrid"], _drafter(TARGETS["tiny-hybrid"] | dict(head_dim=16, rope_theta=1e7), 8,
                                                          (1, 3), 511, layers=2), None)

# Muse-Glimmer-30B (research/landscape-and-quantization.md §A8): the released text config (the VL wrapper's
# text_config; transformers' defaults for the rest) and its DFlash2 drafter's config.json (research/dflash2.md §3).
TARGETS["muse-glimmer-30b"] = dict(
    architectures=["MuseGlimmerForConditionalGeneration"], model_type="muse_glimmer", text_config=dict(
        model_type="muse_glimmer_text", vocab_size=202048, hidden_size=6656, intermediate_size=19968,
        num_hidden_layers=52, num_attention_heads=32, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        sliding_window=2048, final_logit_softcapping=20.0, tie_word_embeddings=False))
SHAPES["muse-glimmer-30b"] = (TARGETS["muse-glimmer-30b"], _dflash2(
    TARGETS["muse-glimmer-30b"]["text_config"] | dict(rope_theta=500000.0), 16, (1, 13, 25, 37, 49), 201818,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_target_layers=52) | dict(
    dflash_config=dict(block_size=16, mask_token_id=201818, target_layer_ids=[1, 13, 25, 37, 49], conv_kernel_size=2,
                       conv_group_size=16, selector_rank=256, selector_top_k=16, output_multiplier=0.19611613513818404,
                       final_logit_softcapping=20.0)), None)

# gpt-oss (research/moe-gptoss.md §2.1, §4): the released config.json, MXFP4 experts; its drafters' config.json
# as z-lab ships it (model_type gpt_oss, attention biases, no rope or window keys: read as transformers reads it).
TARGETS["gpt-oss-20b"] = dict(
    architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=2880, intermediate_size=2880,
    num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
    num_experts_per_tok=4, experts_per_token=4, sliding_window=128,
    layer_types=["sliding_attention", "full_attention"] * 12, swiglu_limit=7.0, rope_theta=150000,
    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                      original_max_position_embeddings=4096, truncate=False),
    rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False, max_position_embeddings=131072,
    vocab_size=201088, pad_token_id=199999, eos_token_id=200002,
    quantization_config=dict(quant_method="mxfp4", modules_to_not_convert=[
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]))
TARGETS["gpt-oss-120b"] = TARGETS["gpt-oss-20b"] | dict(num_hidden_layers=36, num_local_experts=128,
                                                        layer_types=["sliding_attention", "full_attention"] * 18)
TARGETS["tiny-gpt-oss"] = TARGETS["gpt-oss-20b"] | dict(
    hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_local_experts=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
    vocab_size=512)


def _gpt_oss_drafter(target: dict, block: int, layer_ids, **dims) -> dict:
    return dict(architectures=["DFlashDraftModel"], model_type="gpt_oss", attention_bias=True, block_size=block,
                dflash_config=dict(mask_token_id=min(200000, target["vocab_size"] - 1),
                                   target_layer_ids=list(layer_ids)),
                hidden_size=target["hidden_size"], intermediate_size=7680, num_hidden_layers=8,
                num_attention_heads=64, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=150000,
                max_position_embeddings=131072, vocab_size=target["vocab_size"]) | dims


SHAPES["gpt-oss-20b"] = (TARGETS["gpt-oss-20b"], _gpt_oss_drafter(TARGETS["gpt-oss-20b"], 8, (1, 6, 11, 16, 21)), None)
SHAPES["gpt-oss-120b"] = (TARGETS["gpt-oss-120b"], _gpt_oss_drafter(TARGETS["gpt-oss-120b"], 10, (1, 9, 17, 25, 33)),
                          None)
SHAPES["tiny-gpt-oss"] = (TARGETS["tiny-gpt-oss"], _gpt_oss_drafter(
    TARGETS["tiny-gpt-oss"], 8, (1, 3), intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16), None)


def configs(name: str):
    """(family module, target Config, DrafterConfig, published τ) of a synthetic shape."""
    if name not in SHAPES:
        raise UsageError(f"unknown synthetic shape '{name}' (choose from {', '.join(SHAPES)})")
    raw_target, raw_drafter, tau = SHAPES[name]
    where = Path(f"<synthetic {name}>")
    family = family_of(raw_target, where)
    return family, family.Config.from_raw(raw_target, where), DrafterConfig.from_raw(raw_drafter, where), tau


def random_pair(name: str, dtype: torch.dtype, device: torch.device, positions: int, quantize: str | None = None):
    """A target and drafter of shape `name` with random weights (the families' tables, on `device`);
    `quantize` ("int4", "int8", "fp8"): the target's projections quantized as `--quantize` writes them."""
    family, t, d, _ = configs(name)
    if quantize is not None:
        weights = random_quantized_weights(family, t, quantize, dtype, device)
    else:  # experts drawn in the fused layout the model keeps (per-expert tensors would be stacked: twice the memory)
        weights = random_weights(family.weight_table(t, "fused"), dtype=dtype, device=device)
    target = family.build(t, weights, positions)
    w = random_weights(drafter_module.weight_table(d), seed=1, dtype=dtype, device=device)
    return target, Drafter.from_weights(d.for_target(target.embed_scale, t.logit_softcap), w, target.embed,
                                        target.lm_head, positions)


def random_quantized_weights(family, cfg, scheme: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random weights with every projection quantized by quant/quantize.py (RTN: no scale search), one tensor
    at a time on `device` (a 27B is never whole in bf16), read as a compressed-tensors checkpoint of them
    would be: the packed tensors, and `Tensors.quantized` naming each projection's scheme. Experts are drawn
    one by one, as checkpoints that quantize them store them."""
    from .models.layers.linear import Tensors
    from .models.weights import random_tensor
    from .quant.plan import plan_of
    from .quant.quantize import is_projection, quantization_config, quantize_weight

    if any(w.dtype == "raw" for w in family.weight_table(cfg)):
        raise DflashError(f"--quantize {scheme}: this family's experts are stored quantized already (MXFP4)")
    g = torch.Generator(device=device).manual_seed(seed)
    out, widths, plain = {}, {}, set()
    for w in family.weight_table(cfg, "per-expert"):
        drawn, module = random_tensor(w, g), w.name.removesuffix(".weight")
        if w.name.endswith(".weight") and len(w.shape) == 2 and w.dtype == "model" and is_projection(module):
            out |= {f"{module}.{key}": v for key, v in quantize_weight(drawn, scheme, dtype, search=False).items()}
            widths[module] = w.shape[1]
        else:
            out[w.name] = drawn.to(torch.float32 if w.dtype == "float32" else dtype)
            plain.add(module)
        del drawn
    plan = plan_of({"quantization_config": quantization_config(scheme, list(widths), widths, plain)})
    return Tensors(out, quantized={m: plan.scheme_for(m) for m in widths})


def host_memory() -> int:
    """Bytes of memory the system can still give this process (Linux: available pages)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: let the allocator decide


def target_bytes(name: str, dtype: torch.dtype, quantize: str | None = None) -> int | None:
    """The synthetic target's weights held with its projections in `quantize` (memory.quantized_bytes;
    None: as its table says, in `dtype`)."""
    if quantize is None:
        return None
    family, t, _, _ = configs(name)
    return quantized_bytes(family.weight_table(t), quantize, dtype)


def check_memory(name: str, dtype: torch.dtype, device: torch.device, context: int, block: int,
                 quantize: str | None = None) -> None:
    """Refuse, with the numbers, a shape that does not fit where it would be built."""
    family, t, d, _ = configs(name)
    needs = needs_for(family, t, d, dtype, block, cache_slack(block), target_bytes(name, dtype, quantize))
    need = needs.total(context) - workspace_bytes(t, block) + workspace_bytes(t, block, prefill_chunk=1)
    gpu = cuda.is_gpu(device)
    if gpu:
        free, where = cuda.mem_get_info(device)[0], "on the GPU"
    else:
        free, where = host_memory(), "in host memory"
    if need > free:
        if needs.total(block) - workspace_bytes(t, block) + workspace_bytes(t, block, prefill_chunk=1) < free:
            fits = block  # the weights fit: the context is what does not
            while needs.total(fits * 2) - workspace_bytes(t, block) + workspace_bytes(t, block, prefill_chunk=1) < free:
                fits *= 2
            hint = f": use a shorter --context (about {fits:,} tokens fit)"
        else:
            hint = "" if gpu else ": it is meant for a GPU (try the shape 'tiny' here)"
        held = f"{quantize} (activations {str(dtype).removeprefix('torch.')})" if quantize else \
            str(dtype).removeprefix('torch.')
        raise DflashError(f"synthetic {name} in {held} needs {need / GiB:.1f} GiB {where} "
                          f"(weights {needs.weights / GiB:.1f} GiB); {free / GiB:.1f} GiB is free" + hint)


def _sync(device: torch.device) -> None:
    if cuda.is_gpu(device):
        cuda.synchronize(device)


def time_it(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call of the whole call, host included: synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def device_time(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Seconds of device time per call: on CUDA, events around `iters` calls queued back to back (no
    host sync between them, so host time hides behind the GPU's); on a CPU, `time_it`."""
    if not cuda.is_gpu(device):
        return time_it(fn, device, iters, warmup)
    for _ in range(warmup):
        fn()
    start, end = cuda.event(timing=True), cuda.event(timing=True)
    _sync(device)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` captured as a CUDA graph and replayed per call, as the engine runs its step, so that a
    phase is timed without the launch overhead the engine does not pay; `fn` itself where graphs
    are off (CPU, DFLASH_CUDA_GRAPHS=0)."""
    if not graphs_enabled(device):
        return fn
    graph, _ = capture(fn)
    return graph.replay


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the practical roofline."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    seconds = device_time(lambda: dst.copy_(src), device, iters=20)
    return 2 * nbytes / seconds


def copy_size(device: torch.device) -> int:
    """Bytes the copy roofline moves: 1 GiB on a GPU (far past its caches), at most an eighth of what
    is free there; 128 MiB on a CPU."""
    if not cuda.is_gpu(device):
        return 1 << 27
    return min(1 << 30, cuda.mem_get_info(device)[0] // 8)


def weight_bytes(name: str, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Bytes one decode step reads: every weight but the embedding table (a forward reads only its rows;
    the lm_head is the embedding when tied), and of the experts only the top-k a token routes to; with
    `quantize`, the projections as that format holds them (packed codes, scales, zero points)."""
    from .models.weights import table_bytes

    def size(ws):
        return table_bytes(ws, dtype) if quantize is None else quantized_bytes(ws, quantize, dtype)

    family, t, _, _ = configs(name)
    table = family.weight_table(t, "fused")
    tied = not any(w.name == "lm_head.weight" for w in table)
    read = [w for w in table if w.init != "embed" or tied]
    experts = [w for w in read if ".mlp.experts." in w.name and w.shape[0] == getattr(t, "num_experts", 0)]
    dense = size([w for w in read if w not in experts])
    return dense + size(experts) * t.top_k // t.num_experts if experts else dense


NODE_COUNTS = (1, 4, 8, 16, 32, 64)  # the verify forward timed at each (bench --synthetic)


@dataclass
class SyntheticReport:
    shape: str
    device: str
    dtype: str
    context: int
    block_size: int
    decode_s: float  # one plain-decoding iteration, whole (device work, readback, host), synced
    verify_s: float  # device time of each phase, replayed as graphs of their own
    draft_s: float
    accept_s: float
    iteration_s: float  # one DFlash iteration, whole, synced (read back before the next is launched)
    step_device_s: float  # device time of that iteration's captured step, back to back
    weight_bytes: int
    copy_bytes_per_s: float
    tau: float | None
    decode_device_s: float = 0.0  # device time of the plain-decoding step
    commit_s: float = 0.0  # device time of the target's commit after a verify (a hybrid's masked replay)
    # The auto engine's cost curve: one iteration at each candidate block size, as the engine measures it.
    iteration_by_block: dict[int, float] = field(default_factory=dict)
    # The target's verify forward at each node count (1: a plain decode row; more: a best-first tree of that
    # many nodes, ancestor mask): what --tree-budget auto weighs a tree's τ against. Empty where trees are
    # not supported (a hybrid target).
    verify_by_nodes: dict[int, float] = field(default_factory=dict)
    quantize: str | None = None  # the target's projections in int4 / int8 / fp8 (None: in `dtype`)

    @property
    def break_even(self) -> dict[int, float]:
        """τ at which each block size commits tokens as fast as b = 1 (the same engine at b = 1)."""
        one = self.iteration_by_block.get(1)
        return {b: s / one for b, s in self.iteration_by_block.items()} if one else {}

    @property
    def host_overhead_s(self) -> float:
        """What one iteration costs beyond its device work: launch, readback, Python (measured as the
        synced iteration minus the device time of its step; lookahead hides most of it)."""
        return max(0.0, self.iteration_s - self.step_device_s)

    @property
    def decode_bandwidth(self) -> float:
        return self.weight_bytes / (self.decode_device_s or self.decode_s)

    @property
    def roofline_fraction(self) -> float:
        return self.decode_bandwidth / self.copy_bytes_per_s

    @property
    def projected_tps(self) -> float | None:
        return self.tau / self.iteration_s if self.tau else None

    def to_json(self) -> dict:
        out = dict(vars(self))
        out["iteration_by_block"] = {str(b): t for b, t in self.iteration_by_block.items()}
        out["verify_by_nodes"] = {str(n): t for n, t in self.verify_by_nodes.items()}
        out |= {"break_even_tau": {str(b): t for b, t in self.break_even.items()}, "host_overhead_s": self.host_overhead_s, "decode_bandwidth": self.decode_bandwidth,
                "roofline_fraction": self.roofline_fraction, "projected_tps": self.projected_tps,
                "plain_tps": 1 / self.decode_s, "projection": "tau / iteration_s, from measured step times"}
        return out


def run_synthetic(shape: str, *, device: torch.device, dtype: torch.dtype, context: int = 1024,
                  block_size: int | None = None, tau: float | None = None, iters: int = 20,
                  quantize: str | None = None) -> SyntheticReport:
    """Time shape `shape`; `quantize` ("int4", "int8", "fp8"): its target's projections held in that
    format (the drafter stays in `dtype`), planned and read as such."""
    family, target_cfg, drafter_cfg, published = configs(shape)
    b = block_size or drafter_cfg.block_size
    if not 2 <= b <= drafter_cfg.block_size:
        raise UsageError(f"--block-size must be between 2 and the drafter's {drafter_cfg.block_size}, got {b}")
    if tau is not None and tau > b:  # an iteration commits at most its block
        raise UsageError(f"--tau {tau:g} is more than the block size {b}: an iteration commits at most {b} tokens")
    if cuda.is_gpu(device):
        cuda.set_device(device)
    check_memory(shape, dtype, device, context + b, drafter_cfg.block_size, quantize)
    # Rope rows as the loader gives them: the context, then the caches' slack (verify blocks in flight,
    # the drafter's catch-up rows), which every timed step may write into.
    nodes = max(NODE_COUNTS)  # the caches hold a tree of this many nodes too (the verify by node count)
    slack = cache_slack(max(drafter_cfg.block_size, nodes))
    target, drafter = random_pair(shape, dtype, device, context + b + slack, quantize)
    # its cost curve too; its caches sized for the largest tree, its own steps the chain's
    try:
        engine = Engine(target, drafter, block_size=b, max_context=context + b, adaptive=True, tree_budget=nodes)
        engine.tree_budget = 0
    except DflashError:  # a hybrid target: no tree verify yet
        engine = Engine(target, drafter, block_size=b, max_context=context + b, adaptive=True)
    plain = Engine(target, max_context=context + b)
    with torch.inference_mode():
        for cache in (engine.target_cache, engine.draft_cache, plain.target_cache):
            cache.length.fill_(context)  # `context` tokens held (timing does not depend on their values)
        caches = (engine.target_cache, engine.draft_cache, plain.target_cache)
        saved = [c.snapshot() for c in caches]
        greedy = Mode(greedy=True)
        params = dict(mode=greedy, temperature=0.0, seed=0)
        bonus = torch.zeros(1, dtype=torch.int64, device=device)
        block = torch.zeros(b, dtype=torch.int64, device=device)
        logits = torch.randn(b, target_cfg.vocab_size, dtype=dtype, device=device)
        features = torch.randn(b, len(drafter_cfg.target_layer_ids) * target_cfg.hidden_size, dtype=dtype, device=device)

        def at_context(fn):  # every timed call starts from the same caches
            def call():
                fn()
                for cache, snap in zip(caches, saved):
                    cache.restore(snap)
            return call

        # decode and iteration are whole engine iterations (their own graph, host readback, Python);
        # the phases are replayed as graphs of their own and timed on the device.
        def runner(e: Engine):
            return e.graphs.get(greedy, lambda: e.step_function(greedy), bonus)

        def iterate(e: Engine):  # one whole iteration, read back before the next (no lookahead)
            r = runner(e)
            return at_context(lambda: (r.launch(bonus), r.result()))

        def step_only(e: Engine):  # the captured step alone (eager on a CPU)
            r = runner(e)
            return at_context(lambda: r.run(bonus))

        verify = graphed(at_context(lambda: target.forward(block, engine.target_cache, logits_from=0,
                                                           feature_layers=drafter_cfg.target_layer_ids)), device)
        draft = graphed(at_context(lambda: (drafter.add_context(features, engine.draft_cache, count=b),
                                            drafter.draft(bonus, engine.draft_cache, b))), device)
        accept = graphed(at_context(lambda: ops.accept(logits, block, engine.target_cache.length, **params)), device)
        at_context(lambda: target.forward(block, engine.target_cache, logits_from=0))()  # what a commit replays
        half = torch.tensor(max(1, b // 2), device=device)  # half the block accepted
        commit = graphed(at_context(lambda: target.commit(engine.target_cache, half)), device)
        verify_by_nodes = {}
        if engine.most_nodes:  # the engine took the tree budget (a DFlash2 drafter keeps its chain)
            draft_logits = torch.randn(b - 1, target_cfg.vocab_size, dtype=torch.float32, device=device)
            for n in NODE_COUNTS:
                tree = trees.build(bonus, draft_logits, n) if n > 1 else None
                ids = tree.tokens.clamp(min=0) if tree else bonus
                verify = at_context(lambda ids=ids, tree=tree: target.forward(
                    ids, engine.target_cache, logits_from=0, feature_layers=drafter_cfg.target_layer_ids, tree=tree))
                verify_by_nodes[n] = device_time(graphed(verify, device), device, iters)
        report = SyntheticReport(
            shape=shape, device=str(device), dtype=str(dtype).removeprefix("torch."), context=context, block_size=b,
            decode_s=time_it(iterate(plain), device, iters), verify_s=device_time(verify, device, iters),
            draft_s=device_time(draft, device, iters), accept_s=device_time(accept, device, iters),
            iteration_s=time_it(iterate(engine), device, iters),
            step_device_s=device_time(step_only(engine), device, iters),
            decode_device_s=device_time(step_only(plain), device, iters),
            commit_s=device_time(commit, device, iters),
            weight_bytes=weight_bytes(shape, dtype, quantize), quantize=quantize,
            copy_bytes_per_s=copy_bandwidth(device, copy_size(device)),
            tau=tau if tau is not None else published,
            iteration_by_block=engine.measure(greedy, bonus), verify_by_nodes=verify_by_nodes,
        )
    return report
