"""gpt-oss (research/moe-gptoss.md §2): transformers' logits on a tiny checkpoint with MXFP4-packed experts,
sinks, a window shorter than the prompt, YaRN and pre-activations beyond the clamp; verify blocks across
the window boundary; lossless speculative decoding with a fitted drafter that has attention biases.

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
from dflash_cli.engine import Engine, Request
from dflash_cli.kernels.moe import dequantize_mxfp4
from dflash_cli.models import gpt_oss
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS, random_prompts
from .tiny_gpt_oss import (gpt_oss_config, gpt_oss_drafter_config, pack_experts, quantize_mxfp4, random_state,
                           reference, write_gpt_oss)

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_gpt_oss(tmp_path_factory.mktemp("gpt-oss") / "t", gpt_oss_config(), seed=2)


def _prefill(target, ids: list[int], chunks: list[int], capacity: int = 128):
    cache, out, start = target.new_cache(capacity, 8), [], 0
    for size in chunks:
        logits, _ = target.forward(torch.tensor(ids[start:start + size]), cache, logits_from=0, commit=True)
        out.append(logits)
        start += size
    return torch.cat(out), cache


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


@pytest.mark.parametrize("layout", ["mxfp4", "dense"])
def test_logits_equal_transformers_in_both_expert_layouts_and_any_chunking(tmp_path, tiny, layout):
    """The release (MXFP4 blocks and scales) and a dequantised export (transformers' dense [E, in, out]
    parameters under the names without the suffixes), prompts longer than the window, in chunks."""
    d = tiny if layout == "mxfp4" else write_gpt_oss(tmp_path / "dense", gpt_oss_config(mxfp4=False), seed=2)
    model = loader.load(d, None, device="cpu")
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = reference(d)(torch.tensor([ids])).logits[0]
    for chunks in ([37], [1, 3, 7, 26], [8, 8, 21]):
        got, _ = _prefill(model.target, ids, chunks)
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{layout}, chunks {chunks}: {m}")


def test_logits_equal_transformers_through_the_triton_kernels(tiny, monkeypatch):
    """MXFP4 experts dequantised inside the kernel, sinks in the split merge, the fp32-weight norm:
    interpreted here, in chunks of decode and verify sizes across the window (a prefill chunk of more than
    32 takes the same attention kernel: tests/kernels/test_attention.py)."""
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    model = loader.load(tiny, None, device="cpu")
    ids = torch.randint(0, 256, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        want = reference(tiny)(torch.tensor([ids])).logits[0]
    got, _ = _prefill(model.target, ids, [1, 5, 7])
    torch.testing.assert_close(got, want, **TOL)


def test_a_verify_block_equals_single_steps_across_the_window_boundary(tiny):
    """B = 8 tokens verified at once from position 5 (the window of 8 is crossed inside the block) give
    the logits and features of 8 single decode steps, and commit leaves the cache as they do."""
    model = loader.load(tiny, None, device="cpu")
    g = torch.Generator().manual_seed(3)
    prompt, block = torch.randint(0, 256, (5,), generator=g).tolist(), torch.randint(0, 256, (8,), generator=g)
    _, cache = _prefill(model.target, prompt, [5])
    logits, feats = model.target.forward(block, cache, logits_from=0, feature_layers=(1, 3))
    model.target.commit(cache, 8)
    _, steps = _prefill(model.target, prompt, [5])
    one = [model.target.forward(block[i:i + 1], steps, logits_from=0, feature_layers=(1, 3), commit=True)
           for i in range(8)]
    torch.testing.assert_close(logits, torch.cat([o[0] for o in one]), **TOL)
    torch.testing.assert_close(feats, torch.cat([o[1] for o in one]), **TOL)
    nxt = torch.randint(0, 256, (3,), generator=g)
    after, _ = model.target.forward(nxt, cache, logits_from=0, commit=True)
    want, _ = model.target.forward(nxt, steps, logits_from=0, commit=True)
    torch.testing.assert_close(after, want, **TOL)


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


def test_greedy_speculative_output_equals_transformers_generate(gpt_oss_pair):
    model = loader.load(*gpt_oss_pair, device="cpu")
    assert model.drafter.b_kv is not None and model.drafter.cfg.sliding_windows == (128, None)
    hf = reference(gpt_oss_pair[0])
    taus = []
    for prompt in HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=7):
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        for b in (1, 2, 4, 8):
            steps = list(Engine(model.target, model.drafter, block_size=b).generate(Request(prompt, 32)))
            assert [t for s in steps for t in s.tokens] == want, f"block size {b}, prompt {prompt}"
            if b == 8 and prompt in HYBRID_PROMPTS:
                taus += [s.acceptance_length for s in steps if not s.prefill]
    assert max(taus) >= 6 and sum(taus) / len(taus) > 1.5, taus  # drafts really are accepted


def test_seeded_sampling_equals_plain_decoding(gpt_oss_pair):
    model = loader.load(*gpt_oss_pair, device="cpu")
    for seed in range(2):
        sampling = SamplingParams(temperature=0.8, top_k=40, seed=seed)
        want = [t for s in Engine(model.target).generate(Request(HYBRID_PROMPTS[0], 24, sampling=sampling))
                for t in s.tokens]
        got = [t for s in Engine(model.target, model.drafter).generate(Request(HYBRID_PROMPTS[0], 24, sampling=sampling))
               for t in s.tokens]
        assert got == want, f"seed {seed}"


def _attention_masked_on_device(q, k_cache, v_cache, kv_len, *, causal, scale, sliding_window=None, sinks=None):
    """The reference without its host read (every cache slot, masked by positions on the device), sinks too."""
    tq, capacity = q.shape[0], k_cache.shape[1]
    q_pos = kv_len - tq + torch.arange(tq, device=q.device)[:, None]
    k_pos = torch.arange(capacity, device=q.device)[None, :]
    mask = (k_pos < kv_len) & ((k_pos <= q_pos) if causal else True)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    group = q.shape[1] // k_cache.shape[0]
    s = torch.einsum("thd,hnd->htn", q, k_cache.repeat_interleave(group, 0)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat((s, sinks.view(-1, 1, 1).expand(-1, tq, 1)), dim=-1)
    p = s.softmax(-1)[..., :capacity]
    return torch.einsum("htn,hnd->thd", p, v_cache.repeat_interleave(group, 0))


def test_the_gpt_oss_step_never_reads_back_to_the_host(gpt_oss_pair, monkeypatch):
    """Through the Triton kernels (interpreted), as a CUDA graph captures the step: the biased router, the
    packed experts and the drafter's biased context K/V add no host read."""
    from .host_reads import HostReads

    monkeypatch.setattr(ops, "attention", _attention_masked_on_device)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    model = loader.load(*gpt_oss_pair, device="cpu")
    engine = Engine(model.target, model.drafter)
    steps = engine.generate(Request(HYBRID_PROMPTS[0], 16))
    next(steps)
    with torch.inference_mode(), HostReads() as reads:
        engine._device_step(SamplingParams().mode)(torch.tensor([5]))
    assert reads.seen == []
    steps.close()


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
