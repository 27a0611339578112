"""The cached drafter equals a from-scratch computation of DESIGN §2, iteration after iteration."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dflash_cli import loader
from dflash_cli.engine import Engine, Request

from .tiny import drafter_config, target_config, write_drafter, write_target


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rot = torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)
    return x * cos + rot * sin


def naive_draft(w: dict, cfg: dict, embed, lm_head, features, block_ids, window=None):
    """No cache: every draft recomputes K/V of the whole context, as the paper describes it."""
    n, b = features.shape[0], block_ids.shape[0]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    ctx = _rms(features @ w["fc.weight"].T, w["hidden_norm.weight"])
    x = embed[block_ids]
    pos = torch.arange(n + b)
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        q = _rms((h @ w[p + "self_attn.q_proj.weight"].T).view(b, hq, d), w[p + "self_attn.q_norm.weight"])
        both = torch.cat((ctx, h))
        k = _rms((both @ w[p + "self_attn.k_proj.weight"].T).view(n + b, hkv, d), w[p + "self_attn.k_norm.weight"])
        v = (both @ w[p + "self_attn.v_proj.weight"].T).view(n + b, hkv, d)
        q, k = _rope(q, pos[n:]), _rope(k, pos)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
        sliding = cfg.get("layer_types", ["full_attention"] * 99)[i] == "sliding_attention"
        if window is not None and sliding:
            far = pos[n:, None] - pos[None, :] >= window
            scores = scores.masked_fill(far, float("-inf"))
        forced = cfg.get("is_causal", cfg["dflash_config"].get("causal"))
        if (forced if forced is not None else sliding):  # causal inside the block (the newest reference's rule)
            scores = scores.masked_fill(pos[None, :] > pos[n:, None], float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(b, hq * d)
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return (_rms(x, w["norm.weight"])[1:] @ lm_head.T)


def _check(tmp_path, dcfg_kwargs, window=None):
    tcfg = target_config("qwen3", tie=False)
    t = write_target(tmp_path / "t", tcfg)
    d = write_drafter(tmp_path / "d", drafter_config(tcfg, **dcfg_kwargs))
    m = loader.load(t, d, device="cpu")
    cfg = json.loads((d / "config.json").read_text())
    w = load_file(str(d / "model.safetensors"))
    engine = Engine(m.target, m.drafter)
    prompt = list(range(3, 40, 2))
    ids, calls = list(prompt), 0
    original = m.drafter.block_logits  # what every draft goes through (draft_block, draft_logits)

    def checked(block, cache, draft_window=None, x=None):
        nonlocal calls
        assert block[1:].tolist() == m.drafter.mask_ids[: block.shape[0] - 1].tolist()  # [bonus, MASK × (b - 1)]
        got = original(block, cache, draft_window, x)
        n = int(cache.length)
        with torch.inference_mode():
            feats = m.target.forward(torch.tensor(ids[:n]), m.target.new_cache(n + 1),
                                     feature_layers=m.drafter.cfg.target_layer_ids)[1]
        want = naive_draft(w, cfg, m.target.embed, m.target.lm_head, feats, block, window)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        calls += 1
        return got

    m.drafter.block_logits = checked
    for step in engine.generate(Request(prompt, 40)):
        ids += step.tokens
    assert calls >= 5


def test_cached_drafter_matches_the_uncached_definition(tmp_path):
    _check(tmp_path, dict(block_size=8, target_layer_ids=(0, 2, 3)))


def test_sliding_window_drafter_layers(tmp_path):
    _check(tmp_path, dict(block_size=8, layers=2, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=12), window=12)


def test_the_memory_plan_counts_what_the_loaded_drafter_holds(tmp_path):
    """The loaded drafter holds its checkpoint's tensors plus the k/v rows kept twice (its layers' q/k/v GEMM
    and the stacked context projection): the memory plan counts both (drafter.copy_bytes)."""
    from dflash_cli.drafter import copy_bytes, weight_table
    from dflash_cli.models.weights import table_bytes

    tcfg = target_config("qwen3", tie=False)
    m = loader.load(write_target(tmp_path / "t", tcfg), write_drafter(tmp_path / "d", drafter_config(tcfg, layers=2)),
                    device="cpu")
    d = m.drafter
    tensors = [d.fc, d.hidden_norm, d.norm, d.w_kv] + [t for layer in d.layers for t in (
        layer.input_norm, layer.qkv, layer.q_norm, layer.k_norm, layer.o_proj, layer.post_norm, layer.gate_up,
        layer.down, layer.q_proj, layer.kv_proj)]
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    assert held == table_bytes(weight_table(d.cfg), d.fc.dtype) + copy_bytes(d.cfg, d.fc.dtype)
