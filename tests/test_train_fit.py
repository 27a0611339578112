"""tests/fit.py, the helper other tests use to fit tiny drafters, runs on the real trainer."""
from __future__ import annotations

import torch

from dflash_cli import loader
from dflash_cli.train.evaluate import measure

from .fit import fit_drafter
from .tiny import drafter_config, target_config, write_drafter, write_target


def test_fit_drafter_learns_the_targets_own_continuations(tmp_path):
    cfg = target_config("qwen3", tie=False, layers=3)
    t = write_target(tmp_path / "target", cfg, seed=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (6,), generator=g).tolist() for _ in range(4)]
    dcfg = drafter_config(cfg, block_size=6, target_layer_ids=(0, 2))
    fitted = fit_drafter(t, tmp_path / "fitted", dcfg, prompts, steps=80, blocks_per_step=16, length=40, lr=1e-2)
    unfitted = write_drafter(tmp_path / "unfitted", dcfg)

    def tau(drafter_dir) -> float:
        model = loader.load(t, drafter_dir, device="cpu")
        greedy = prompts[::2]  # the continuations fitted greedily (odd prompts were sampled)
        return measure(model.target, model.drafter, greedy, block_size=6, max_new_tokens=40,
                       stop_token_ids=frozenset()).tau

    assert tau(fitted) > tau(unfitted) + 1.0
