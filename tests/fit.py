"""Fit a tiny DFlash drafter to a tiny target, so that tests (and CPU demos) see real acceptance.

The drafter learns what the target itself writes: greedy and sampled continuations of the target
from varied prompts, the block-denoising objective of DFlash (predict tokens n+1 .. n+B-1 from the
token at n and the target's features of tokens < n). It trains through the engine's own drafter
code (context K/V cache writes included), so the weights it saves are in the released layout.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dflash_cli.config import DrafterConfig
from dflash_cli.drafter import Drafter
from dflash_cli.engine import Engine, Request
from dflash_cli.models import load_target
from dflash_cli.sampling import SamplingParams

from .tiny import save_weights, write_drafter


def target_corpus(target, prompts: list[list[int]], length: int, layer_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(token ids, target features) of the target's own continuations of `prompts`."""
    engine = Engine(target, max_context=max(len(p) for p in prompts) + length + 1)
    corpus = []
    for i, prompt in enumerate(prompts):
        sampling = SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.7, seed=i)
        out = [t for s in engine.generate(Request(prompt, length, sampling=sampling)) for t in s.tokens]
        ids = torch.tensor(prompt + out)
        cache = target.new_cache(len(ids) + 1)
        with torch.no_grad():
            _, feats = target.forward(ids, cache, feature_layers=layer_ids, commit=True)
        corpus.append((ids, feats))
    return corpus


def fit_drafter(target_dir: Path, out_dir: Path, drafter_cfg: dict, prompts: list[list[int]], *,
                steps: int = 300, blocks_per_step: int = 4, length: int = 96, lr: float = 3e-3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    write_drafter(out_dir, drafter_cfg, seed=seed)
    dcfg = DrafterConfig.from_dir(out_dir)
    positions = 2048
    target = load_target(target_dir, torch.float32, torch.device("cpu"), positions)
    drafter = Drafter.load(out_dir, dcfg, target.embed, target.lm_head, positions)
    corpus = target_corpus(target, prompts, length, dcfg.target_layer_ids)
    params = [drafter.fc, drafter.w_kv] + [t for layer in drafter.layers
                                           for t in (layer.q_proj, layer.o_proj, layer.gate_up, layer.down)]
    if drafter.b_kv is not None:  # attention biases (gpt-oss drafters)
        params += [drafter.b_kv] + [t for layer in drafter.layers for t in (layer.q_bias, layer.o_bias)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    b = dcfg.block_size
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.0
        # The inference code writes each layer's K/V into one cache tensor, in place: let autograd keep
        # what it saved from the earlier layers.
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            for _ in range(blocks_per_step):
                ids, feats = corpus[int(torch.randint(len(corpus), (1,), generator=gen))]
                n = int(torch.randint(1, len(ids) - b, (1,), generator=gen))
                cache = drafter.new_cache(len(ids) + b)
                drafter.add_context(feats, cache, count=n)
                logits = drafter.draft_logits(ids[n:n + 1], cache, b)
                loss = loss + F.cross_entropy(logits, ids[n + 1:n + b])
            (loss / blocks_per_step).backward()
        opt.step()
    rows = drafter.w_kv.shape[0] // dcfg.num_layers
    kv_rows = rows // 2
    weights = {"fc.weight": drafter.fc, "hidden_norm.weight": drafter.hidden_norm, "norm.weight": drafter.norm}
    inter = drafter.layers[0].gate_up.shape[0] // 2
    for i, layer in enumerate(drafter.layers):
        p, kv = f"layers.{i}.", drafter.w_kv[i * rows:(i + 1) * rows]
        weights |= {
            p + "input_layernorm.weight": layer.input_norm, p + "post_attention_layernorm.weight": layer.post_norm,
            p + "self_attn.q_proj.weight": layer.q_proj, p + "self_attn.k_proj.weight": kv[:kv_rows],
            p + "self_attn.v_proj.weight": kv[kv_rows:], p + "self_attn.o_proj.weight": layer.o_proj,
            p + "self_attn.q_norm.weight": layer.q_norm, p + "self_attn.k_norm.weight": layer.k_norm,
            p + "mlp.gate_proj.weight": layer.gate_up[:inter], p + "mlp.up_proj.weight": layer.gate_up[inter:],
            p + "mlp.down_proj.weight": layer.down,
        }
        if drafter.b_kv is not None:
            kv_bias = drafter.b_kv[i * rows:(i + 1) * rows]
            weights |= {p + "self_attn.q_proj.bias": layer.q_bias, p + "self_attn.k_proj.bias": kv_bias[:kv_rows],
                        p + "self_attn.v_proj.bias": kv_bias[kv_rows:], p + "self_attn.o_proj.bias": layer.o_bias}
    save_weights(out_dir, {k: v.detach().clone() for k, v in weights.items()})
    return out_dir
