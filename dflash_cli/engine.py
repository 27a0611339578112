"""The speculative loop: prefill, then draft → verify → accept → commit, yielding as tokens commit.

One loop serves both modes: with a drafter and block size b > 1 an iteration is DFlash; with b = 1
it is plain autoregressive decoding through the same verify path (the `--no-spec` baseline, and the
"same loop with B = 1" the DFlash paper measures speedups against).

The block size may change at every iteration (`adaptive`: chosen by adaptive.py from measured costs
and live acceptance). That changes no token: the sampling noise is keyed by position, and every b
runs the same forward and commit calls on the same caches. Each b is its own captured step (one CUDA
graph per sampling mode and b), so switching costs nothing on the device; the caches are sized for
the largest b. At b = 1 the drafter's context for the committed token is deferred (kept as target
features), and written in one batch before the next draft, or when DEFERRED tokens wait, or when the
generation ends.

The target cache and the drafter's context cache (with its deferred tokens) always hold the same
committed tokens. A chat's
next turn reuses both caches for the longest common prefix of the new prompt.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from . import cuda, ops
from .adaptive import Adaptive, CostTable, Decision, Pinned, Policy, read_walk, time_iterations, tree_budgets
from .cache import CommitPlan
from .drafter import DEFERRED, Drafter
from .errors import DflashError
from .graphs import EagerStep, StepGraphs
from .sampling import DeviceSampling, Mode, SamplingParams
from . import tree as trees


@dataclass
class Step:
    """What one iteration committed. `tokens` are already cut at a stop token or the token limit."""

    tokens: list[int]
    drafts: list[int]  # the drafter's proposal this iteration (b - 1 ids; empty for prefill and plain decoding)
    accepted: int  # of which the target accepted
    seconds: float  # wall time since the previous step (prefill included in the first)
    prefill: bool = False
    finish: str | None = None  # "stop", "length" or None while generating
    decision: Decision | None = None  # why this iteration's block size (None for the prefill)

    @property
    def drafted(self) -> int:
        return len(self.drafts)

    @property
    def block_size(self) -> int:
        """b of this iteration: the drafts and the target's own token."""
        return self.drafted + 1

    @property
    def acceptance_length(self) -> int:
        """τ of this iteration: accepted drafts plus the target's own token."""
        return self.accepted + 1

    @property
    def tree_budget(self) -> int:
        """Nodes of the tree this iteration verified (0: the chain, or no draft)."""
        return self.decision.tree_budget if self.decision else 0


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


# Prompt tokens of the warm-up: past ops.MAX_KERNEL_Q_LEN (a prefill chunk's attention path) and past 64
# (the hybrid's chunked Gated DeltaNet, kernels/gated_delta.py).
WARM_UP_PROMPT = 65


def prompt_too_long(length: int, limit: int, positions: int) -> DflashError:
    """The error for a prompt that leaves no room to answer; --max-context helps only below the model's positions."""
    fix = "shorten the prompt: the model has no more positions" if limit >= positions else \
        "raise it with --max-context, or shorten the prompt"
    return DflashError(f"the prompt is {length} tokens; the context limit is {limit} ({fix})")


def catch_up_due(deferred: int, block_size: int) -> bool:
    """Whether the drafter's deferred context is written before an iteration at `block_size`: before
    any draft, and once DEFERRED tokens wait (its buffer is full)."""
    return deferred > 0 and (block_size > 1 or deferred == DEFERRED)


def cache_slack(block_size: int) -> int:
    """Cache slots (and rope positions) past the context limit: the verify block of the last
    iteration, and that of the one queued behind it (`lookahead`); with a drafter, the padding rows
    of a deferred-context catch-up too."""
    return 2 * block_size + (DEFERRED if block_size > 1 else 0)


class Engine:
    def __init__(self, target, drafter: Drafter | None = None, block_size: int | None = None,
                 max_context: int | None = None, prefill_chunk: int = 512, lookahead: bool | None = None,
                 adaptive: bool = False, draft_window: int | None = None, tree_budget: int | str = 0):
        """block_size: the block size B (default: the drafter's); with `adaptive`, the largest one the
        engine may choose per iteration (`adaptive.candidates(B)`), otherwise the only one.

        max_context: the most tokens (prompt + answer) a generation may hold; the caches get
        `cache_slack` slots more, so no verify block runs past them.

        lookahead: queue iteration i+1 on the device before reading iteration i, so the GPU keeps
        working while the host streams text (default: on CUDA, where launches are asynchronous;
        on a CPU it would only compute one iteration per generation for nothing). The output is
        the same either way: an iteration queued behind the end is dropped, and the next prompt's
        prefill resets the cache lengths to what was read.

        draft_window: the drafter attends to at most this many context tokens (it bounds the draft's
        cost at long context; lossless: only which drafts are proposed, so τ, can change).

        tree_budget: verify a best-first tree of this many nodes (dflash_cli/tree.py) rather than the
        drafter's argmax chain, at every iteration that drafts (0: the chain). It may change between
        iterations (set `tree_budget`, at most the one the engine was made with: the caches are sized
        for it); each budget is its own captured step. "auto": the policy picks the chain or a tree of
        `adaptive.TREE_BUDGETS` nodes per iteration, from measured costs and the live rank acceptance
        (the chain only where trees are not supported: DFlash2 drafters)."""
        self.auto_tree = tree_budget == "auto"
        if self.auto_tree:
            dflash2 = drafter is not None and drafter.selector is not None
            # room: the largest budget whose cache slack leaves at least half the rope positions to the context
            room = [n for n in tree_budgets(1 << 30) if cache_slack(n) <= target.max_positions // 2]
            tree_budget = 0 if dflash2 or not room else max(room)
        if drafter is None:
            block_size = 1
        elif block_size is None:
            block_size = drafter.cfg.block_size
        if not 1 <= block_size <= (drafter.cfg.block_size if drafter else 1):
            raise DflashError(f"block size must be between 1 and the drafter's {drafter.cfg.block_size}, got {block_size}")
        if tree_budget < 0 or tree_budget == 1:
            raise DflashError(f"the tree budget must be 0 (the chain) or at least 2 nodes, got {tree_budget}")
        if tree_budget and drafter is not None and drafter.selector is not None:
            raise DflashError("--tree-budget: DFlash2 drafters keep their selector chain (the reference has no "
                              "DFlash2 tree); drop --tree-budget")
        if draft_window is not None and draft_window < 1:
            raise DflashError(f"the draft window must be at least 1 token, got {draft_window}")
        self.target, self.drafter, self.block_size = target, drafter, block_size
        self.draft_window = draft_window
        self.costs = CostTable()  # seconds per iteration at each b, measured when first needed
        self.most_nodes = tree_budget if drafter is not None and block_size > 1 else 0  # the caches' room
        self._tree_budget = self.most_nodes
        rope_positions, slack = target.max_positions, cache_slack(max(block_size, self.most_nodes))
        self.max_context = min(max_context or rope_positions, rope_positions - slack)
        self.prefill_chunk = prefill_chunk
        self.lookahead = cuda.is_gpu(target.device) if lookahead is None else lookahead
        capacity = self.max_context + slack
        self.target_cache = target.new_cache(capacity, max(block_size, self.most_nodes))
        budgets = tree_budgets(self.most_nodes) if self.auto_tree else ()
        self.policy: Policy = Adaptive(block_size, budgets) if adaptive and self.speculative else Pinned(block_size, budgets)
        if self.auto_tree:
            self._tree_budget = 0  # the policy picks each iteration's budget
        self.draft_cache = drafter.new_cache(capacity) if self.speculative else None
        self.feature_layers = drafter.cfg.target_layer_ids if self.speculative else ()
        self._cached_ids: list[int] = []  # tokens whose K/V both caches hold, in order
        # Sampling values live on the device: one captured graph per sampling mode serves them all.
        self.sampling = DeviceSampling(target.device)
        self.caches = [c for c in (self.target_cache, self.draft_cache) if c is not None]
        self.graphs = StepGraphs(target.device, self.caches)

    def warm_up(self, sampling: SamplingParams | None = None) -> float | None:
        """Capture the CUDA graphs (one per block size an adaptive engine may use) and measure the
        adaptive costs now, with a short throwaway generation, rather than during the user's first
        answer; returns the seconds it took. Nothing to do (None) without graphs or adaptive costs.

        Its prompt is long enough (WARM_UP_PROMPT) to take the prefill paths of a long prompt, so that
        their kernels compile (and fla's chunked Gated DeltaNet autotunes) here too."""
        if not self.graphs.enabled and not self.measures:
            # Nothing to capture or measure, but a process's first call still pays one-time costs (kernel
            # modules load on first use): a two-token throwaway keeps them out of the first answer's prefill.
            for _ in self.generate(Request([0, 0, 0], 2, sampling=sampling or SamplingParams())):
                pass
            return None
        start = time.perf_counter()
        new = 2 * self.block_size + 2
        prompt = [i % 3 for i in range(max(3, min(WARM_UP_PROMPT, self.max_context - new - 1)))]
        for _ in self.generate(Request(prompt, new, sampling=sampling or SamplingParams())):
            pass
        return time.perf_counter() - start

    @property
    def cached_ids(self) -> tuple[int, ...]:
        """The tokens whose K/V both caches hold, in order (what the next prompt may reuse)."""
        return tuple(self._cached_ids)

    def reusable_prefix(self, prompt_ids: list[int]) -> int:
        """Prompt tokens the next `generate` will not recompute: the common prefix with the cached
        tokens (at least the last prompt token is recomputed), as far as every cache can restart
        from (a recurrent state only from its prefix snapshot)."""
        reuse = _common_prefix(self._cached_ids, prompt_ids, len(prompt_ids) - 1)
        for cache in self.caches:
            reuse = cache.reusable(reuse)
        return reuse

    def step_function(self, mode: Mode, block_size: int | None = None):
        """The device side of one iteration at this block size (what a captured graph replays): a
        function of the bonus token, for benchmarks that time or capture it themselves."""
        return self._device_step(mode, block_size)

    @property
    def tree_budget(self) -> int:
        """Nodes of the tree the next drafting iteration verifies (0: the chain)."""
        return self._tree_budget

    @tree_budget.setter
    def tree_budget(self, budget: int) -> None:
        if budget < 0 or budget == 1 or budget > self.most_nodes and budget:
            raise DflashError(f"this engine's tree budget may be 0 or 2 to at most the {self.most_nodes} nodes "
                              f"its caches were sized for, got {budget}")
        self._tree_budget = budget

    @property
    def speculative(self) -> bool:
        return self.drafter is not None and self.block_size > 1

    @property
    def adaptive(self) -> bool:
        return self.policy.adaptive

    @property
    def measures(self) -> bool:
        """Whether the policy decides from measured costs (auto block size, or auto tree budget)."""
        return self.policy.adaptive or bool(getattr(self.policy, "tree_budgets", ()))

    @property
    def tree_setting(self) -> int | str:
        """The tree budget as configured, for reports: 'auto', or the fixed number of nodes (0: the chain)."""
        return "auto" if self.auto_tree else self.tree_budget

    def describe(self) -> str:
        """How this engine decodes, for banners: 'DFlash, block size auto (1…16)', '… 8', 'plain decoding'."""
        if not self.speculative:
            return "plain decoding"
        sizes = f"auto (1…{self.block_size})" if self.adaptive else str(self.block_size)
        window = f", draft window {self.draft_window}" if self.draft_window else ""
        tree = (f", tree budget auto (0, {', '.join(map(str, self.policy.tree_budgets))})"
                if self.auto_tree and self.policy.tree_budgets
                else f", tree budget {self.tree_budget}" if self.tree_budget else "")
        return f"DFlash, block size {sizes}{window}{tree}"

    @torch.inference_mode()
    def generate(self, request: Request) -> Iterator[Step]:
        prompt, limit = request.prompt_ids, self.max_context
        if not prompt:
            raise DflashError("the prompt is empty")
        if len(prompt) >= limit:
            raise prompt_too_long(len(prompt), limit, self.target.cfg.max_position_embeddings)
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
        launched: deque[tuple[EagerStep, Decision]] = deque()  # iterations queued, oldest first
        self.policy.reset()
        deferred = 0  # b = 1 iterations launched whose drafter context waits for a catch-up

        def launch(bonus: torch.Tensor) -> torch.Tensor:
            nonlocal deferred
            decision = self._decide(mode, bonus)
            if catch_up_due(deferred, decision.block_size):
                self._catch_up(bonus)
                deferred = 0
            runner = self._runner(mode, decision.block_size, decision.tree_budget, bonus)
            launched.append((runner, decision))
            deferred += self.speculative and decision.block_size == 1
            return runner.launch(bonus)

        bonus = launch(bonus)
        try:
            while True:
                if self.lookahead:  # the next iteration runs while this one is read and streamed
                    bonus = launch(bonus)
                runner, decision = launched.popleft()
                emitted, accepted, block, walk = self._unpack(runner.result(), decision.block_size, decision.tree_budget)
                if self.auto_tree and walk is not None:
                    self.policy.observe(decision.block_size, accepted, walk)
                else:
                    self.policy.observe(decision.block_size, accepted)
                self._cached_ids += block[: accepted + 1]
                step = _cut(Step(emitted, block[1:], accepted, 0.0, decision=decision), stops, budget - produced)
                produced += len(step.tokens)
                step.seconds, clock = time.perf_counter() - clock, time.perf_counter()
                yield step
                if step.finish is not None:
                    return
                if not self.lookahead:
                    bonus = launch(bonus)
        finally:
            if deferred:  # the drafter's context holds every committed token again (the next turn reuses it)
                self._catch_up(bonus)
            self.graphs.discard()  # caches may hold a queued iteration: the next prefill rolls it back

    def _catch_up(self, bonus: torch.Tensor) -> None:
        """Queue the drafter's catch-up on the deferred tokens (one captured step of its own)."""
        self.graphs.get("catch-up", lambda: self._catch_up_step, bonus).run(bonus)

    def _catch_up_step(self, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.drafter.catch_up(self.draft_cache)
        return bonus, bonus

    def _runner(self, mode: Mode, block_size: int, budget: int, bonus: torch.Tensor) -> EagerStep:
        """The step of this sampling mode and block size (and tree budget, when it drafts a tree): one
        captured graph each, made on first use."""
        if budget and block_size > 1:
            return self.graphs.get((mode, block_size, budget), lambda: self._tree_step(mode, block_size, budget), bonus)
        return self.graphs.get((mode, block_size), lambda: self._device_step(mode, block_size), bonus)

    def _decide(self, mode: Mode, bonus: torch.Tensor) -> Decision:
        """The next iteration's block size (and tree budget). An adaptive engine first measures its costs
        at this context length, once per sampling mode and context bucket (adaptive.CostTable); with
        --tree-budget auto the costs hold a tree iteration's too, keyed (b, nodes)."""
        costs = None
        if self.measures:
            context = len(self._cached_ids)  # what the host has read; a queued iteration adds at most B
            costs = self.costs.get(mode, context)
            if costs is None:
                costs = self.measure(mode, bonus)
                self.costs.put(mode, context, costs)
        if self.auto_tree and self.policy.tree_budgets:
            chain = {b: s for b, s in costs.items() if isinstance(b, int)}
            return self.policy.decide(chain, {key[1]: s for key, s in costs.items() if isinstance(key, tuple)})
        decision = self.policy.decide(costs)
        return replace(decision, tree_budget=self.tree_budget if decision.block_size > 1 else 0)

    def measure(self, mode: Mode, bonus: torch.Tensor) -> dict[int | tuple[int, int], float]:
        """Seconds of one iteration at each of the policy's block sizes (with --tree-budget auto, also of a
        tree iteration at the largest one per node budget, keyed (b, nodes)), from the caches as they are
        (after any queued iteration: the device runs in stream order). Every timed iteration really
        runs, so the caches, and `bonus` (a captured step's output buffer), are put back afterwards:
        lengths after each run (slots past them are free), whole snapshots (a recurrent state) at the end.

        The drafter's deferred context is caught up first (and put back with the rest): every draft
        runs caught up, and a timed b = 1 run defers one token more, for which a full buffer of
        DEFERRED tokens has no room (on a GPU, an out-of-bounds write that kills the context)."""
        saved = [c.snapshot() for c in self.caches]
        start = bonus.clone()
        if self.draft_cache is not None:
            self._catch_up(start)
        lengths = [c.length.clone() for c in self.caches]
        deferred = self.draft_cache.pending_count.clone() if self.draft_cache is not None else None

        def timed(block_size: int, budget: int):
            runner = self._runner(mode, block_size, budget, start)

            def run() -> None:
                runner.run(start)
                for cache, length in zip(self.caches, lengths):
                    cache.length.copy_(length)
                if deferred is not None:  # a b = 1 run deferred one more token
                    self.draft_cache.pending_count.copy_(deferred)
            return run

        try:
            runs = {b: timed(b, 0 if self.auto_tree else self.tree_budget) for b in self.policy.sizes}
            if self.auto_tree:  # a tree iteration at the largest block size, per node budget
                tree_block = self.policy.sizes[-1]
                runs |= {(tree_block, n): timed(tree_block, n) for n in self.policy.tree_budgets}
            return time_iterations(runs, self.target.device)
        finally:
            for cache, snap in zip(self.caches, saved):
                cache.restore(snap)
            bonus.copy_(start)

    def _prefill(self, prompt: list[int], keep_prefix: int | None = None) -> torch.Tensor:
        """Fill both caches with the prompt (reusing the longest cached prefix they can restart from);
        returns the last position's logits."""
        reuse = self.reusable_prefix(prompt)  # a recurrent state restarts only from a snapshot, or from nothing
        self._cached_ids = self._cached_ids[:reuse]  # true even if this prefill is interrupted
        for cache in self.caches:
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

    @staticmethod
    def _unpack(host: list[int], block_size: int, tree_budget: int = 0) -> tuple[list[int], int, list[int], object]:
        """(emitted ids, accepted drafts, the block, the walk: adaptive.Walk of a tree step, else None) from
        the packed result of `_device_step` or `_tree_step`."""
        a, b = host[0], block_size
        walk = read_walk(host[1 + 2 * b:], a) if tree_budget and b > 1 else None
        return host[1:2 + a], a, host[1 + b:1 + 2 * b], walk

    def _device_step(self, mode: Mode, block_size: int | None = None):
        """The device side of an iteration at block size b (default: B), free of host syncs so that a
        CUDA graph can capture it. Returns packed [accepted, y_0..y_(b-1), block_0..block_(b-1)] and
        the next bonus. At b = 1 there is no draft, and a speculative engine defers the committed
        token's drafter context (`DraftCache.defer`) to a batched catch-up before the next draft."""
        params = self.sampling.kernel_args(mode)
        b = block_size or self.block_size

        def step(bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if b > 1:
                block = self.drafter.draft_block(bonus, self.draft_cache, b, self.draft_window)
            else:
                block = bonus
            logits, features = self.target.forward(block, self.target_cache, logits_from=0,
                                                   feature_layers=self.feature_layers)
            # the accept kernel packs the readback, the commit count and the next bonus (no launches of their own)
            verdict = ops.verdict(logits, block, self.target_cache.length, **params)
            self.target_cache.commit(CommitPlan(verdict.count))
            if self.speculative and b > 1:
                self.drafter.add_context(features, self.draft_cache, count=verdict.count)
            elif self.speculative:  # b = 1 commits exactly this token: its drafter context waits
                self.draft_cache.defer(features)
            return verdict.packed, verdict.bonus

        return step

    def _tree_step(self, mode: Mode, block_size: int, budget: int):
        """The device side of a tree iteration (dflash_cli/tree.py): draft once, build the best-first tree
        of `budget` nodes over the b - 1 drafted positions, verify every node in one target forward with
        the ancestor mask, walk the target's own tokens down it, and commit the accepted path's rows.
        Packed as `_device_step`'s, with the path's b ids as the block, then `adaptive.walk_record`."""
        params = self.sampling.kernel_args(mode)
        depth = block_size - 1

        def step(bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.drafter.draft_logits(bonus, self.draft_cache, block_size, self.draft_window)
            tree = trees.build(bonus, logits, budget)
            nodes = tree.tokens.clamp(min=0)  # an unfilled node's id is -1: any id, never walked to
            logits, features = self.target.forward(nodes, self.target_cache, logits_from=0,
                                                    feature_layers=self.feature_layers, tree=tree)
            y = ops.sample(logits, self.target_cache.length + tree.depths, **params)
            # the walk, the packed readback (adaptive.walk_record included), the commit count and the next bonus
            packed, path, count, bonus = trees.verdict(tree, y, depth)
            self.target_cache.commit(CommitPlan(count, path))
            self.drafter.add_context(features.index_select(0, path), self.draft_cache, count=count)
            return packed, bonus

        return step


def _cut(step: Step, stops: frozenset[int], budget: int) -> Step:
    """End the step at the first stop token (not emitted) or when the token budget runs out. A cut step
    accepted only what the answer kept (the stop token included), so τ sums to the tokens written."""
    for i, token in enumerate(step.tokens[:budget]):
        if token in stops:
            step.tokens, step.finish, step.accepted = step.tokens[:i], "stop", min(step.accepted, i)
            return step
    if len(step.tokens) >= budget:
        step.tokens, step.finish = step.tokens[:budget], "length"
        step.accepted = min(step.accepted, budget - 1)
    return step


def _common_prefix(a: list[int], b: list[int], cap: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= cap:
            break
        n += 1
    return n
