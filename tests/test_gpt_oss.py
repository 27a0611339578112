"""gpt-oss (research/moe-gptoss.md §2): what its tiny checkpoint exercises (MXFP4-packed experts, sinks, a
window shorter than the prompt, YaRN and pre-activations beyond the clamp), its packed experts, configs and
drafter biases. (Its logits in both expert layouts and through the kernels, verify blocks across the
window boundary, greedy and seeded decoding and host reads: tests/test_conformance.py.)

The independent reference is transformers' own GptOssForCausalLM with eager attention, holding the
weights transformers' dequantiser reads out of the same packed checkpoint (tests/tiny_gpt_oss.py).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from dflash_cli import loader, ops
from dflash_cli.checkpoint import read_weights
from dflash_cli.config import DrafterConfig
from dflash_cli.kernels.moe import dequantize_mxfp4
from dflash_cli.models import gpt_oss

from .tiny_gpt_oss import (gpt_oss_config, gpt_oss_drafter_config, pack_experts, quantize_mxfp4, random_state,
                           reference, write_gpt_oss)

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_gpt_oss(tmp_path_factory.mktemp("gpt-oss") / "t", gpt_oss_config(), seed=2)


def test_the_tiny_checkpoint_exercises_the_clamp_the_window_and_the_sinks(tiny):
    """What the logits test relies on: gate/up pre-activations beyond ±7, a prompt longer than the window
    of the even layers, sinks and router biases of weight, YaRN's attention factor."""
    hf = reference(tiny)
    cfg = gpt_oss.Config.from_raw(json.loads((tiny / "config.json").read_text()), tiny)
    assert cfg.sliding_window == 8 and cfg.layer_types[0] == "sliding_attention" and cfg.window(1) is None
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.quant == gpt_oss.MXFP4
    seen = []
    experts = hf.model.layers[0].mlp.experts
    real = experts._apply_gate
    experts._apply_gate = lambda gu: (seen.append(gu.detach()), real(gu))[1]
    ids = torch.randint(0, 256, (29,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(ids[None]).logits
        pre = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
        assert (pre[:, 0::2] > 7).float().mean() > 0.02 and (pre[:, 1::2].abs() > 7).float().mean() > 0.02
        for layer in hf.model.layers:  # without sinks the logits move far beyond the tolerance
            layer.self_attn.sinks.fill_(-1e9)
        assert (hf(ids[None]).logits - logits).abs().max() > 100 * TOL["atol"]


def test_the_fitted_drafter_has_the_released_biases_and_windows(gpt_oss_pair):
    """What the conformance checks of the gpt-oss case (tests/test_conformance.py) run: a drafter with
    attention biases, and its first layer sliding as transformers reads the released config."""
    model = loader.load(*gpt_oss_pair, device="cpu")
    assert model.drafter.b_kv is not None and model.drafter.cfg.sliding_windows == (128, None)


def test_packed_experts_stay_bytes_through_the_loader(tiny):
    """`*_blocks` / `*_scales` are read raw: u8 whatever the run's dtype, bit for bit as stored."""
    from safetensors.torch import load_file

    cfg = gpt_oss.Config.from_raw(json.loads((tiny / "config.json").read_text()), tiny)
    stored = load_file(str(tiny / "model.safetensors"))
    for dtype in (torch.float32, torch.bfloat16):
        w = read_weights(tiny, gpt_oss.weight_table(cfg, gpt_oss.layout_of(stored)), dtype, torch.device("cpu"))
        for name in ("model.layers.0.mlp.experts.gate_up_proj_blocks", "model.layers.3.mlp.experts.down_proj_scales"):
            assert w[name].dtype == torch.uint8 and torch.equal(w[name], stored[name]), (name, dtype)
        assert w["model.layers.0.self_attn.sinks"].dtype == torch.float32  # state kept in fp32, as transformers
        assert w["model.layers.0.self_attn.q_proj.weight"].dtype == dtype
    model = loader.load(tiny, None, device="cpu", dtype="bfloat16")
    assert model.target.layers[2].mlp.gate_up.dtype == torch.uint8 and model.target.embed.dtype == torch.bfloat16


def test_our_mxfp4_reading_is_transformers_and_the_quantiser_round_trips():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = random_state(gpt_oss_config(), seed=4)
    dense = state["model.layers.1.mlp.experts.gate_up_proj"]  # [E, in, out]
    packed = pack_experts(state)
    blocks, scales = packed["model.layers.1.mlp.experts.gate_up_proj_blocks"], \
        packed["model.layers.1.mlp.experts.gate_up_proj_scales"]
    ours = dequantize_mxfp4(blocks, scales, torch.float32)  # [E, out, in]
    assert torch.equal(ours.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert (ours.transpose(1, 2) - dense).abs().max() < dense.abs().max() / 3  # a 4-bit copy of the weights
    again = dequantize_mxfp4(*quantize_mxfp4(ours), torch.float32)  # representable values pack back exactly
    assert torch.equal(again, ours)


# ---- configs --------------------------------------------------------------------------------------------
RELEASED_20B = {  # openai/gpt-oss-20b config.json (research/moe-gptoss.md §2.1)
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


def test_the_released_configs_read_as_transformers_reads_them(tmp_path):
    from dflash_cli.memory import GiB
    from dflash_cli.models.weights import table_bytes

    for raw, layers, experts in ((RELEASED_20B, 24, 32), (RELEASED_20B | {
            "num_hidden_layers": 36, "num_local_experts": 128,
            "layer_types": ["sliding_attention", "full_attention"] * 18}, 36, 128)):
        cfg = gpt_oss.Config.from_raw(raw, tmp_path)
        hf = transformers.GptOssConfig(**{k: v for k, v in raw.items() if k != "quantization_config"})
        assert (cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.quant) == (layers, experts, 4, gpt_oss.MXFP4)
        assert list(cfg.layer_types) == hf.layer_types and cfg.sliding_window == hf.sliding_window == 128
        assert cfg.rope_scaling == {k: v for k, v in hf.rope_parameters.items() if k != "rope_theta"}
        assert cfg.swiglu_alpha == hf.swiglu_alpha and cfg.swiglu_limit == hf.swiglu_limit
        table = gpt_oss.weight_table(cfg)
        expert_weights = 3 * layers * experts * 2880 * 2880  # gate, up and down of every expert
        packed = sum(table_bytes([w], torch.bfloat16) for w in table if w.name.endswith(("_blocks", "_scales")))
        assert packed == expert_weights * 17 // 32, "MXFP4: 17 bytes per 32 weights"
        total = table_bytes(table, torch.bfloat16)
        assert abs(total / GiB - (12.8 if experts == 32 else 60.8)) < 0.1, total / GiB  # OpenAI's published sizes


DRAFTER_20B = {  # z-lab/gpt-oss-20b-DFlash config.json as shipped (research/moe-gptoss.md §4)
    "architectures": ["DFlashDraftModel"], "attention_bias": True, "attention_dropout": 0.0, "block_size": 8,
    "bos_token_id": 199998, "dflash_config": {"mask_token_id": 200000, "target_layer_ids": [1, 6, 11, 16, 21]},
    "dtype": "bfloat16", "eos_token_id": 200002, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 7680,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_hidden_layers": 8,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 150000, "vocab_size": 201088,
}


def test_the_gpt_oss_drafter_config_reads_as_autoconfig_or_raw(tmp_path, monkeypatch):
    """By default as transformers' AutoConfig reads it (YaRN, a window of 128 on even draft layers: what
    SGLang sees); DFLASH_DRAFTER_CONFIG=raw reads it as written (plain RoPE θ 150000, all layers full)."""
    cfg = DrafterConfig.from_raw(DRAFTER_20B, tmp_path)
    auto = transformers.AutoConfig.for_model(**DRAFTER_20B)
    assert (cfg.block_size, cfg.mask_token_id, cfg.target_layer_ids) == (8, 200000, (1, 6, 11, 16, 21))
    assert cfg.attention_bias and cfg.rms_norm_eps == 1e-5
    assert cfg.sliding_windows == tuple(auto.sliding_window if t == "sliding_attention" else None
                                        for t in auto.layer_types) == (128, None) * 4
    assert cfg.rope_theta == 150000 and cfg.rope_scaling == {k: v for k, v in auto.rope_parameters.items()
                                                             if k != "rope_theta"}
    assert cfg.causal == (True, False) * 4  # sliding draft layers are causal inside the block (DESIGN §1)
    monkeypatch.setenv("DFLASH_DRAFTER_CONFIG", "raw")
    raw = DrafterConfig.from_raw(DRAFTER_20B, tmp_path)
    assert raw.sliding_windows == (None,) * 8 and raw.rope_scaling is None and raw.attention_bias
    monkeypatch.setenv("DFLASH_DRAFTER_CONFIG", "typo")
    with pytest.raises(Exception, match="DFLASH_DRAFTER_CONFIG must be transformers or raw"):
        DrafterConfig.from_raw(DRAFTER_20B, tmp_path)


def test_drafter_biases_are_added_before_the_k_norm(tmp_path):
    """The cached context K/V and the block's own K/V both carry the k/v bias, k's inside its norm: the
    cached drafter equals the definition written out (DESIGN §2 with biases)."""
    from dflash_cli.drafter import Drafter
    from dflash_cli.kernels.rope_cache import head_rms_norm, rotate
    from dflash_cli.models.weights import random_weights
    from dflash_cli.drafter import weight_table

    target = gpt_oss_config()
    dcfg = DrafterConfig.from_raw(gpt_oss_drafter_config(target, layers=1, target_layer_ids=(1,)), tmp_path)
    w = random_weights(weight_table(dcfg), seed=3)
    w = {k: (v * 20 if k.endswith("k_proj.bias") else v) for k, v in w.items()}  # a bias the norm must see
    embed, lm_head = torch.randn(512, 64), torch.randn(512, 64)
    drafter = Drafter.from_weights(dcfg, dict(w), embed, lm_head, 64)
    feats = torch.randn(6, 64)
    cache = drafter.new_cache(32)
    drafter.add_context(feats, cache)
    ctx_h, _ = ops.rms_norm(F.linear(feats, w["fc.weight"]), w["hidden_norm.weight"], 1e-5)
    k = F.linear(ctx_h, w["layers.0.self_attn.k_proj.weight"], w["layers.0.self_attn.k_proj.bias"]).view(6, 2, 16)
    k = rotate(head_rms_norm(k, w["layers.0.self_attn.k_norm.weight"], 1e-5), drafter.cos_sin[:6])
    torch.testing.assert_close(cache.k[0, :, :6], k.transpose(0, 1), rtol=1e-5, atol=1e-5)
    v = F.linear(ctx_h, w["layers.0.self_attn.v_proj.weight"], w["layers.0.self_attn.v_proj.bias"]).view(6, 2, 16)
    torch.testing.assert_close(cache.v[0, :, :6], v.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_the_synthetic_bench_runs_gpt_oss_with_packed_random_experts(capsys):
    """`dflash bench --synthetic` draws MXFP4 bytes at the shape's real sizes; a decode step reads the
    routed experts only (top 4 of 32: 3.45 GiB for gpt-oss-20b, research/moe-gptoss.md §5)."""
    from dflash_cli import synthetic
    from dflash_cli.cli import main
    from dflash_cli.memory import GiB

    assert abs(synthetic.weight_bytes("gpt-oss-20b", torch.bfloat16) / GiB - 3.45) < 0.02
    _, t, d, _ = synthetic.configs("gpt-oss-120b")
    assert (t.num_experts, d.block_size, d.target_layer_ids, d.attention_bias) == (128, 10, (1, 9, 17, 25, 33), True)
    assert main(["bench", "tiny-gpt-oss", "--synthetic", "--device", "cpu", "--context", "64", "--tau", "3",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["block_size"] == 8 and r["decode_s"] > 0 and r["verify_s"] > 0 and r["draft_s"] > 0
