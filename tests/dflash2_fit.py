"""Fit a tiny DFlash2 drafter (convs and selector included) to a tiny target, so that tests see its
drafts accepted.

The v1 objective of tests/fit.py (predict tokens n+1 .. n+B-1 of the target's own continuations from
the token at n and the features of the tokens before) plus the selector's: a teacher-forced k-way
cross-entropy over the head's top-k at each row, the true previous token as the predecessor (how the
selector is trained, research/dflash2.md §1.4). It trains through the engine's own drafter code and
saves the released layout, bare codebook names included.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dflash_cli.config import DrafterConfig
from dflash_cli.drafter import Drafter, dflash2_table, tie
from dflash_cli.engine import Engine, Request
from dflash_cli.models import load_target
from dflash_cli.models.weights import random_weights
from dflash_cli.sampling import SamplingParams

from .tiny import save_weights, write_drafter


def continuations(target, prompts: list[list[int]], length: int, layer_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, target features) of the target's greedy and sampled continuations of `prompts`."""
    engine = Engine(target, max_context=max(map(len, prompts)) + length + 1)
    corpus = []
    for i, prompt in enumerate(prompts):
        sampling = SamplingParams() if i % 2 == 0 else SamplingParams(temperature=0.7, seed=i)
        ids = torch.tensor(prompt + [t for s in engine.generate(Request(prompt, length, sampling=sampling))
                                     for t in s.tokens])
        with torch.no_grad():
            _, feats = target.forward(ids, target.new_cache(len(ids) + 1), feature_layers=layer_ids, commit=True)
        corpus.append((ids, feats))
    return corpus


def selector_loss(drafter: Drafter, hidden: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over each row's top-k of the selector's score given the true previous token, on
    the rows whose true token is among the candidates. ids: [anchor, true tokens of rows 1..L]."""
    sel = drafter.selector
    values, candidates = logits.topk(sel.top_k, dim=-1)
    edges = torch.einsum("lr,lkr->lk", F.embedding(ids[:-1], sel.predecessor) * F.linear(hidden, sel.hidden_projection),
                         F.embedding(candidates, sel.successor))
    hit = candidates == ids[1:, None]
    rows = hit.any(-1)
    return F.cross_entropy((values + edges)[rows], hit[rows].float().argmax(-1)) if rows.any() else logits.sum() * 0


def trainable(drafter: Drafter) -> list[torch.Tensor]:
    convs = [c for layer in drafter.layers for c in (layer.attention_conv, layer.mlp_conv)]
    # qkv holds each layer's q, k and v (w_kv is derived from it: drafter.tie, after every step)
    return ([drafter.fc] + [t for layer in drafter.layers for t in (layer.qkv, layer.o_proj, layer.gate_up,
                                                                     layer.down)]
            + [t for c in convs for t in (c.base, c.projection)]
            + [drafter.selector.hidden_projection, drafter.selector.predecessor, drafter.selector.successor])


def released_weights(drafter: Drafter) -> dict[str, torch.Tensor]:
    """The drafter's tensors by their names in a released DFlash2 checkpoint."""
    q_rows = drafter.cfg.num_heads * drafter.cfg.head_dim
    rows = drafter.layers[0].qkv.shape[0] - q_rows
    inter = drafter.layers[0].gate_up.shape[0] // 2
    w = {"fc.weight": drafter.fc, "hidden_norm.weight": drafter.hidden_norm, "norm.weight": drafter.norm}
    for i, layer in enumerate(drafter.layers):
        p, kv = f"layers.{i}.", layer.qkv[q_rows:]
        w |= {p + "input_layernorm.weight": layer.input_norm, p + "post_attention_layernorm.weight": layer.post_norm,
              p + "self_attn.q_proj.weight": layer.qkv[:q_rows], p + "self_attn.k_proj.weight": kv[:rows // 2],
              p + "self_attn.v_proj.weight": kv[rows // 2:], p + "self_attn.o_proj.weight": layer.o_proj,
              p + "self_attn.q_norm.weight": layer.q_norm, p + "self_attn.k_norm.weight": layer.k_norm,
              p + "mlp.gate_proj.weight": layer.gate_up[:inter], p + "mlp.up_proj.weight": layer.gate_up[inter:],
              p + "mlp.down_proj.weight": layer.down}
        for name in ("attention_conv", "mlp_conv"):
            conv = getattr(layer, name)
            w |= {p + name + ".base_kernel": conv.base, p + name + ".kernel_projection.weight": conv.projection}
    s = drafter.selector
    w |= {"candidate_selector.hidden_projection.weight": s.hidden_projection,
          "candidate_selector.predecessor_codebook": s.predecessor, "candidate_selector.successor_codebook": s.successor}
    return {k: v.detach().clone() for k, v in w.items()}


def identity_init(cfg: DrafterConfig, v1_weights: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A DFlash2 checkpoint's tensors as its training starts (research/dflash2.md §1.3): the v1
    drafter's weights, every conv's base kernel the identity (tap 0 = 1, later taps 0) with a zero
    projection, a zero successor codebook (so the selector's edges vanish), and random predecessor
    codebook and hidden projection. Such a drafter is the v1 drafter."""
    w = dict(v1_weights) | random_weights(dflash2_table(cfg), seed=seed)
    for name in w:
        if name.endswith(".base_kernel"):
            w[name] = torch.zeros_like(w[name])
            w[name][:, 0] = 1.0
        elif name.endswith(".kernel_projection.weight") or name.endswith("successor_codebook"):
            w[name] = torch.zeros_like(w[name])
    return w


def as_dflash2(v1_cfg: dict) -> dict:
    """The v1 drafter's config with DFlash2's architecture and keys, same geometry and causality."""
    cfg = v1_cfg | {"architectures": ["DFlash2DraftModel"]}
    cfg["dflash_config"] = v1_cfg["dflash_config"] | {"conv_kernel_size": 2, "conv_group_size": 16,
                                                      "selector_rank": 16, "selector_top_k": 16}
    return cfg


def fit_dflash2(target_dir: Path, out_dir: Path, drafter_cfg: dict, prompts: list[list[int]], *, steps: int = 300,
                blocks_per_step: int = 4, length: int = 96, lr: float = 3e-3, selector_lr: float = 2e-2,
                seed: int = 0, init: Path | None = None) -> Path:
    """init: a fitted v1 drafter of the same geometry to start from (`identity_init`); random otherwise."""
    torch.manual_seed(seed)
    if init is None:
        write_drafter(out_dir, drafter_cfg, seed=seed)
    else:
        cfg = DrafterConfig.from_raw(drafter_cfg, out_dir)
        write_drafter(out_dir, drafter_cfg, weights=identity_init(cfg, load_file(str(init / "model.safetensors"))))
    dcfg = DrafterConfig.from_dir(out_dir)
    positions = 2048
    target = load_target(target_dir, torch.float32, torch.device("cpu"), positions)
    drafter = Drafter.load(out_dir, dcfg, target.embed, target.lm_head, positions)
    corpus = continuations(target, prompts, length, dcfg.target_layer_ids)
    params = trainable(drafter)
    for p in params:
        p.requires_grad_(True)
    selector = params[-3:]  # the codebooks start at zero or random: they learn faster at a higher rate
    opt = torch.optim.Adam([{"params": params[:-3]}, {"params": selector, "lr": selector_lr}], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    b = dcfg.block_size
    for _ in range(steps):
        opt.zero_grad()
        drafter.w_kv, drafter.b_kv = tie(dcfg, drafter.layers)  # the context projection, from the trained qkv
        loss = 0.0
        with torch.autograd.graph.allow_mutation_on_saved_tensors():  # the K/V cache is written in place
            for _ in range(blocks_per_step):
                ids, feats = corpus[int(torch.randint(len(corpus), (1,), generator=gen))]
                n = int(torch.randint(1, len(ids) - b, (1,), generator=gen))
                cache = drafter.new_cache(len(ids) + b)
                drafter.add_context(feats, cache, count=n)
                hidden = drafter.block_hidden(ids[n:n + 1], cache, b)
                logits = F.linear(hidden, drafter.lm_head)
                loss = loss + F.cross_entropy(logits, ids[n + 1:n + b]) + selector_loss(drafter, hidden, logits,
                                                                                         ids[n:n + b])
            (loss / blocks_per_step).backward()
        opt.step()
    save_weights(out_dir, released_weights(drafter))
    return out_dir
