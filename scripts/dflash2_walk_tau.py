"""Mean τ of DFlash2's two walks at T > 0 on a tiny fitted pair (an experiment; the engine ships only the first).

1. The argmax walk (shipped): the draft is a point mass, accepted while it equals the target's own sample.
2. The sampled walk (the reference's, research/dflash2.md §1.6, not shipped): d_t ~ q_t = softmax(S_t(d_{t-1}, ·) / T)
   over the top-k candidates, accepted while u · q_t(d_t) < p_t(d_t); at the first rejection the bonus is drawn
   from normalize(max(0, p - q)).
Both are lossless; only τ differs. Each iteration is simulated eagerly with the engine's own drafter and target
(commit, rollback and context K/V as the engine does them), T applied to the target logits, no top-p/top-k.

Usage: python scripts/dflash2_walk_tau.py OUT_DIR [TEMPERATURE]
(builds the tiny Qwen3.5 pair and fits its v1 and DFlash2 drafters there on the first run: minutes on a CPU).
On the tests' fitted pair (4 seeds × 6 prompts × 48 tokens) the two walks were level: mean τ 1.150 against
1.174 at T=0.1, 1.039 against 1.050 at T=0.3, 1.016 against 1.015 at T=0.7 (argmax first): no gain to keep.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_cli import loader  # noqa: E402
from tests.conftest import HYBRID_PROMPTS  # noqa: E402
from tests.dflash2_fit import fit_dflash2  # noqa: E402
from tests.fit import fit_drafter  # noqa: E402
from tests.tiny import drafter_config, qwen35_config, write_qwen35  # noqa: E402


def build(out: Path) -> tuple[Path, Path]:
    """The tests' qwen35_pair and dflash2_pair (tests/conftest.py, tests/test_dflash2.py)."""
    target, v1, d2 = out / "qwen35", out / "qwen35-drafter", out / "qwen35-dflash2"
    if not (d2 / "model.safetensors").is_file():
        cfg = qwen35_config()
        write_qwen35(target, cfg, seed=11, slow_decay=True)
        dcfg = drafter_config(cfg["text_config"], block_size=8, layers=2, target_layer_ids=(1, 3), heads=4,
                              kv_heads=2, head_dim=16, intermediate=128, mask_token_id=500,
                              layer_types=["sliding_attention", "full_attention"], sliding_window=16)
        fit_drafter(target, v1, dcfg, HYBRID_PROMPTS, steps=600)
        d2cfg = dcfg | {"architectures": ["DFlash2DraftModel"]}
        d2cfg["dflash_config"] = dcfg["dflash_config"] | {"conv_kernel_size": 2, "conv_group_size": 16,
                                                          "selector_rank": 16, "selector_top_k": 16}
        fit_dflash2(target, d2, json.loads(json.dumps(d2cfg)), HYBRID_PROMPTS, steps=150, init=v1)
    return target, d2


def sampled_walk(selector, hidden, logits, anchor, temperature, gen):
    """(drafts [L], candidates [L, k], q [L, k]) of the reference's sampled walk."""
    candidates, scores = selector.lattice(hidden, logits, anchor)
    chosen, drafts, qs = torch.zeros(1, dtype=torch.int64), [], []
    for t in range(scores.shape[0]):
        q = (scores[t, chosen[0]] / temperature).softmax(-1)
        chosen = torch.multinomial(q, 1, generator=gen)
        drafts.append(candidates[t, chosen[0]])
        qs.append(q)
    return torch.stack(drafts), candidates, torch.stack(qs)


def accept_point_mass(p, drafts, gen):
    """(accepted, bonus): the engine's rule, drafts accepted while equal to the target's sample."""
    y = torch.multinomial(p, 1, generator=gen)[:, 0]
    a = int((drafts == y[:-1]).int().cumprod(0).sum())
    return a, int(y[a])


def accept_sparse_q(p, drafts, candidates, qs, gen):
    """(accepted, bonus): rejection sampling against the sparse q, residual at the first rejection."""
    for i, d in enumerate(drafts.tolist()):
        q_d = float(qs[i][candidates[i] == d].sum())
        if float(torch.rand(1, generator=gen)) * q_d < float(p[i, d]):
            continue
        residual = p[i].clone().scatter_add_(0, candidates[i], -qs[i]).clamp_min_(0)
        residual = residual / residual.sum() if float(residual.sum()) > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=gen))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=gen))


@torch.inference_mode()
def mean_tau(model, prompt, temperature, sampled, seed, tokens=48, block=8):
    target, drafter, gen = model.target, model.drafter, torch.Generator().manual_seed(seed)
    capacity = len(prompt) + tokens + 2 * block
    tcache, dcache = target.new_cache(capacity, block), drafter.new_cache(capacity)
    logits, features = target.forward(torch.tensor(prompt), tcache, logits_from=-1, commit=True,
                                      feature_layers=drafter.cfg.target_layer_ids)
    drafter.add_context(features, dcache)
    bonus, taus = torch.multinomial((logits[-1] / temperature).softmax(-1), 1, generator=gen), []
    while sum(taus) < tokens:
        hidden = drafter.block_hidden(bonus, dcache, block)
        head = torch.nn.functional.linear(hidden, drafter.lm_head)
        if sampled:
            drafts, candidates, qs = sampled_walk(drafter.selector, hidden, head, bonus, temperature, gen)
        else:
            drafts = drafter.selector.walk(hidden, head, bonus)
        block_ids = torch.cat((bonus, drafts))
        logits, features = target.forward(block_ids, tcache, logits_from=0, feature_layers=drafter.cfg.target_layer_ids)
        p = (logits / temperature).softmax(-1)
        a, nxt = accept_sparse_q(p, drafts, candidates, qs, gen) if sampled else accept_point_mass(p, drafts, gen)
        target.commit(tcache, torch.tensor(a + 1))
        drafter.add_context(features, dcache, count=torch.tensor(a + 1))
        bonus, taus = torch.tensor([nxt]), taus + [a + 1]
    return taus


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "dflash2-walk")
    temperature = float(sys.argv[2]) if len(sys.argv) > 2 else 0.7
    model = loader.load(*build(out), device="cpu")
    for name, sampled in (("argmax walk, point-mass accept (shipped)", False),
                          ("sampled walk, sparse-q rejection (reference)", True)):
        taus = [t for seed in range(4) for prompt in HYBRID_PROMPTS for t in mean_tau(model, prompt, temperature,
                                                                                      sampled, seed)]
        print(f"T={temperature} {name}: mean tau {sum(taus) / len(taus):.3f} over {len(taus)} iterations")
