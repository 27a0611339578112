"""Acceptance measured with the engine itself: greedy DFlash decoding of held-out prompts with the
drafter as saved, the mean acceptance length τ, and how often each draft position is accepted."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DrafterConfig
from ..drafter import Drafter
from ..engine import Engine, Request
from ..sampling import SamplingParams


def attach_drafter(target, drafter_dir: Path) -> Drafter:
    """The saved drafter, on the target already in memory (loading the pair again would hold a
    second copy of the target). The one place the trainer builds an engine drafter."""
    cfg = DrafterConfig.from_dir(drafter_dir).for_target(target.embed_scale, target.cfg.logit_softcap)
    return Drafter.load(drafter_dir, cfg, target.embed, target.lm_head, target.cos_sin.shape[0])


@dataclass
class Acceptance:
    block_size: int
    prompts: int
    tokens: int
    histogram: Counter = field(default_factory=Counter)  # τ (accepted drafts + 1) → iterations

    @property
    def iterations(self) -> int:
        return sum(self.histogram.values())

    @property
    def tau(self) -> float:
        n = self.iterations
        return sum(t * c for t, c in self.histogram.items()) / n if n else 0.0

    def accepted_at(self, k: int) -> float:
        """Share of iterations whose k-th draft (k = 1..B-1) was accepted."""
        n = self.iterations
        return sum(c for t, c in self.histogram.items() if t > k) / n if n else 0.0

    def to_json(self) -> dict:
        return {
            "tau": self.tau, "block_size": self.block_size, "prompts": self.prompts, "tokens": self.tokens,
            "iterations": self.iterations,
            "acceptance_histogram": {str(t): c for t, c in sorted(self.histogram.items())},
            "accepted_at_position": [self.accepted_at(k) for k in range(1, self.block_size)],
        }


def measure(target, drafter: Drafter, prompts: list[list[int]], *, block_size: int, max_new_tokens: int,
            stop_token_ids: frozenset[int]) -> Acceptance:
    """τ over greedy answers to `prompts` (T = 0: the acceptance a user sees at temperature 0)."""
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(target, drafter, block_size=block_size, max_context=longest)
    result = Acceptance(block_size, len(prompts), 0)
    for ids in prompts:
        for step in engine.generate(Request(ids, max_new_tokens, stop_token_ids, SamplingParams())):
            result.tokens += len(step.tokens)
            if not step.prefill:
                result.histogram[step.acceptance_length] += 1
    return result
