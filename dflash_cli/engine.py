"""The speculative loop: prefill, then draft → verify → accept → commit, yielding as tokens commit.

One loop serves both modes: with a drafter and block size B > 1 it is DFlash; with B = 1 it is
plain autoregressive decoding through the same verify path (the `--no-spec` baseline, and the
"same loop with B = 1" the DFlash paper measures speedups against).

The target cache and the drafter's context cache always hold the same committed tokens. A chat's
next turn reuses both caches for the longest common prefix of the new prompt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import ops
from .drafter import Drafter
from .errors import DflashError
from .graphs import StepGraphs
from .sampling import DeviceSampling, Mode, SamplingParams


@dataclass
class Step:
    """What one iteration committed. `tokens` are already cut at a stop token or the token limit."""

    tokens: list[int]
    drafts: list[int]  # the drafter's proposal this iteration (B - 1 ids; empty for prefill and plain decoding)
    accepted: int  # of which the target accepted
    seconds: float  # wall time since the previous step (prefill included in the first)
    prefill: bool = False
    finish: str | None = None  # "stop", "length" or None while generating

    @property
    def drafted(self) -> int:
        return len(self.drafts)

    @property
    def acceptance_length(self) -> int:
        """τ of this iteration: accepted drafts plus the target's own token."""
        return self.accepted + 1


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 512
    stop_token_ids: frozenset[int] = frozenset()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # How many prompt tokens the next request will likely share (the conversation before this turn's
    # generation prompt). A cache that cannot roll back to an arbitrary point (a recurrent state)
    # keeps a snapshot there during the prefill; the others ignore it.
    keep_prefix: int | None = None


def cache_slack(block_size: int) -> int:
    """Cache slots (and rope positions) past the context limit: the verify block of the last
    iteration, and that of the one queued behind it (`lookahead`)."""
    return 2 * block_size


class Engine:
    def __init__(self, target, drafter: Drafter | None = None, block_size: int | None = None,
                 max_context: int | None = None, prefill_chunk: int = 512, lookahead: bool | None = None):
        """max_context: the most tokens (prompt + answer) a generation may hold; the caches get
        `cache_slack` slots more, so no verify block runs past them.

        lookahead: queue iteration i+1 on the device before reading iteration i, so the GPU keeps
        working while the host streams text (default: on CUDA, where launches are asynchronous;
        on a CPU it would only compute one iteration per generation for nothing). The output is
        the same either way: an iteration queued behind the end is dropped, and the next prompt's
        prefill resets the cache lengths to what was read."""
        if drafter is None:
            block_size = 1
        elif block_size is None:
            block_size = drafter.cfg.block_size
        if not 1 <= block_size <= (drafter.cfg.block_size if drafter else 1):
            raise DflashError(f"block size must be between 1 and the drafter's {drafter.cfg.block_size}, got {block_size}")
        self.target, self.drafter, self.block_size = target, drafter, block_size
        rope_positions, slack = target.max_positions, cache_slack(block_size)
        self.max_context = min(max_context or rope_positions, rope_positions - slack)
        self.prefill_chunk = prefill_chunk
        self.lookahead = target.device.type == "cuda" if lookahead is None else lookahead
        capacity = self.max_context + slack
        self.target_cache = target.new_cache(capacity, block_size)
        self.draft_cache = drafter.new_cache(capacity) if self.speculative else None
        self.feature_layers = drafter.cfg.target_layer_ids if self.speculative else ()
        self._cached_ids: list[int] = []  # tokens whose K/V both caches hold, in order
        # Sampling values live on the device: one captured graph per sampling mode serves them all.
        self.sampling = DeviceSampling(target.device)
        self.graphs = StepGraphs(target.device, [c for c in (self.target_cache, self.draft_cache) if c is not None])

    def warm_up(self, sampling: SamplingParams | None = None) -> float | None:
        """Capture the CUDA graphs now, with a short throwaway generation, rather than during the
        user's first answer; returns the seconds it took. Nothing to do where graphs are off (CPU)."""
        if not self.graphs.enabled:
            return None
        start = time.perf_counter()
        for _ in self.generate(Request([0, 1, 2], 2 * self.block_size + 2, sampling=sampling or SamplingParams())):
            pass
        return time.perf_counter() - start

    @property
    def speculative(self) -> bool:
        return self.drafter is not None and self.block_size > 1

    @torch.inference_mode()
    def generate(self, request: Request) -> Iterator[Step]:
        prompt, limit = request.prompt_ids, self.max_context
        if not prompt:
            raise DflashError("the prompt is empty")
        if len(prompt) >= limit:
            raise DflashError(f"the prompt is {len(prompt)} tokens; the context limit is {limit} "
                              "(raise it with --max-context, or shorten the prompt)")
        mode = self.sampling.load(request.sampling)
        params = self.sampling.kernel_args(mode)
        budget = min(request.max_new_tokens, limit - len(prompt))
        stops = request.stop_token_ids
        clock = time.perf_counter()

        logits = self._prefill(prompt, request.keep_prefix)
        rows = torch.tensor([len(prompt) - 1], device=logits.device)
        bonus = ops.sample(logits, rows, **params)
        step = _cut(Step([int(bonus)], [], 0, 0.0, prefill=True), stops, budget)
        produced = len(step.tokens)
        step.seconds, clock = time.perf_counter() - clock, time.perf_counter()
        yield step
        if step.finish is not None:
            return
        runner = self.graphs.get(mode, lambda: self._device_step(mode), bonus)
        bonus = runner.launch(bonus)
        try:
            while True:
                if self.lookahead:  # the next iteration runs while this one is read and streamed
                    bonus = runner.launch(bonus)
                emitted, accepted, block = self._unpack(runner.result())
                self._cached_ids += block[: accepted + 1]
                step = _cut(Step(emitted, block[1:], accepted, 0.0), stops, budget - produced)
                produced += len(step.tokens)
                step.seconds, clock = time.perf_counter() - clock, time.perf_counter()
                yield step
                if step.finish is not None:
                    return
                if not self.lookahead:
                    bonus = runner.launch(bonus)
        finally:
            runner.discard()  # caches may hold a queued iteration: the next prefill rolls it back

    def _prefill(self, prompt: list[int], keep_prefix: int | None = None) -> torch.Tensor:
        """Fill both caches with the prompt (reusing the longest cached prefix they can restart from);
        returns the last position's logits."""
        caches = [c for c in (self.target_cache, self.draft_cache) if c is not None]
        reuse = _common_prefix(self._cached_ids, prompt, len(prompt) - 1)
        for cache in caches:  # a recurrent state restarts only from a snapshot, or from nothing
            reuse = cache.reusable(reuse)
        self._cached_ids = self._cached_ids[:reuse]  # true even if this prefill is interrupted
        for cache in caches:
            cache.rollback(reuse)
        keep = keep_prefix if keep_prefix is not None and reuse < keep_prefix < len(prompt) else None
        ends = sorted({*range(reuse + self.prefill_chunk, len(prompt), self.prefill_chunk), len(prompt)}
                      | ({keep} if keep else set()))
        device, start = self.target.device, reuse
        for end in ends:
            chunk = torch.tensor(prompt[start:end], device=device)
            logits, features = self.target.forward(chunk, self.target_cache, logits_from=-1 if end == len(prompt)
                                                   else None, feature_layers=self.feature_layers, commit=True)
            if self.draft_cache is not None:
                self.drafter.add_context(features, self.draft_cache)
            if end == keep:
                self.target_cache.keep_prefix()
            start = end
        self._cached_ids = list(prompt)
        return logits

    def _unpack(self, host: list[int]) -> tuple[list[int], int, list[int]]:
        """(emitted ids, accepted drafts, the block) from the packed result of `_device_step`."""
        a, b = host[0], self.block_size
        return host[1:2 + a], a, host[1 + b:]

    def _device_step(self, mode: Mode):
        """The device side of an iteration, free of host syncs so that a CUDA graph can capture it.
        Returns packed [accepted, y_0..y_(B-1), block_0..block_(B-1)] and the next bonus."""
        params = self.sampling.kernel_args(mode)

        def step(bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.speculative:
                block = torch.cat((bonus, self.drafter.draft(bonus, self.draft_cache, self.block_size)))
            else:
                block = bonus
            logits, features = self.target.forward(block, self.target_cache, logits_from=0,
                                                   feature_layers=self.feature_layers)
            y, accepted = ops.accept(logits, block, self.target_cache.length, **params)
            self.target.commit(self.target_cache, accepted + 1)
            if self.speculative:
                self.drafter.add_context(features, self.draft_cache, count=accepted + 1)
            return torch.cat((accepted.view(1), y, block)), y.gather(0, accepted.view(1))

        return step


def _cut(step: Step, stops: frozenset[int], budget: int) -> Step:
    """End the step at the first stop token (not emitted) or when the token budget runs out."""
    for i, token in enumerate(step.tokens[:budget]):
        if token in stops:
            step.tokens, step.finish = step.tokens[:i], "stop"
            return step
    if len(step.tokens) >= budget:
        step.tokens, step.finish = step.tokens[:budget], "length"
    return step


def _common_prefix(a: list[int], b: list[int], cap: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= cap:
            break
        n += 1
    return n
