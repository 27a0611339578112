"""Fit a tiny DFlash drafter to a tiny target, so that tests see real acceptance: `dflash train`'s
own trainer (dflash_cli/train), on the target's own continuations of a few prompts.

The drafter learns what the target itself writes: greedy and sampled continuations, the
block-denoising objective of DFlash (predict tokens n+1 .. n+B-1 from the token at n and the
target's features of tokens < n), many blocks per sequence per step. The weights it saves are in
the released layout, and load through `loader.load`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dflash_cli import loader
from dflash_cli.engine import Engine
from dflash_cli.train.data import Generation, answer, trainable
from dflash_cli.train.loop import Schedule, Trainer, TrainOptions
from dflash_cli.train.model import new_drafter, save_weights
from dflash_cli.train.objective import loss_gamma


def fit_drafter(target_dir: Path, out_dir: Path, drafter_cfg: dict, prompts: list[list[int]], *,
                steps: int = 300, blocks_per_step: int = 4, length: int = 96, lr: float = 3e-3, seed: int = 0) -> Path:
    """Train a drafter shaped by `drafter_cfg` (a released-format config.json dict) for the target in
    `target_dir` on its continuations (`length` tokens) of `prompts` (token ids): even prompts
    greedy, odd ones sampled at T=0.7. `blocks_per_step`: draft blocks per sequence in each step
    (every sequence takes part in every step)."""
    model = loader.load(target_dir, None, device="cpu", max_context=max(len(p) for p in prompts) + length + 1)
    engine = Engine(model.target, max_context=max(len(p) for p in prompts) + length)
    seqs = []
    for i, ids in enumerate(prompts):
        gen = Generation(length, 0.0 if i % 2 == 0 else 0.7, seed)
        seqs.append(answer(engine, list(ids), frozenset(), gen, i))  # no stop token: `length` tokens each
    out_dir = Path(out_dir)
    net = new_drafter(out_dir, drafter_cfg, seed)
    b = net.cfg.block_size
    opts = TrainOptions(Schedule(steps=steps, lr=lr), batch=len(seqs), anchors=blocks_per_step, gamma=loss_gamma(b),
                        seed=seed)
    Trainer(net, model.target, trainable(seqs), opts).run(lambda: False)
    save_weights(out_dir, net, torch.float32, {"step": str(steps)})
    return out_dir
