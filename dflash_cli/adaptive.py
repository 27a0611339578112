"""The block size of each iteration: measured cost per block size, live acceptance, and the choice.

Any block size at any iteration writes the same tokens (the sampling noise is keyed by position, and
the caches only ever hold committed tokens), so the engine may pick b afresh every iteration. It
picks the b that maximises expected tokens per second:

    expected tokens at b = 1 + Σ_{i<b} Π_{j≤i} p_j        seconds at b = measured (CostTable)

where p_i is the chance that draft i is accepted given that drafts 1..i-1 were. b = 1 is plain
decoding (no draft forward): when drafting does not pay, the engine stops drafting, and says why
(`Decision`). What that still costs against plain decoding (its first blocks, its probes, and the
deferred drafter context) is small on a GPU and a few to 18 percent on a CPU with the tiny demo pair,
where any drafted block costs over two plain steps (docs/benchmarks.md).

The estimates p_i are exponentially weighted counts with a prior: each position that an iteration
reaches is one observation (older ones weigh `OBSERVED` less each time); a position not reached (an
earlier draft was rejected, or the block was shorter) learns nothing and keeps what it saw.

When drafting pauses, nothing new is learnt, so the engine probes: it drafts one block at the best
drafting b now and then, and resumes if the probe does well. Probes are paced by what they are
expected to cost, not by a clock. A probe loses, against b = 1, its cost at b minus the tokens it is
expected to commit times the cost at b = 1; the paused iterations earn probes a budget of
`PROBE_SHARE` of their own time, and a probe runs once the budget covers its expected loss. So
probes cost at most that share of the paused time whatever the machine: near the break-even τ a
probe costs almost nothing and comes soon (a pause on a bad stretch ends quickly), while a drafter
that keeps failing is probed ever more rarely, as each failure lowers its estimate and raises the
loss. b = 1 costs about what plain decoding costs: the drafter's context for those tokens is
deferred, and written in one batch before the next draft (drafter.DraftCache), so drafting can
resume at any iteration.

With `--tree-budget auto` the same choice also weighs trees (dflash_cli/tree.py) of `TREE_BUDGETS` nodes
at the largest b: their seconds are measured with the chain's (a tree iteration per budget; verify cost
grows with the node count, nearly flat to ~32 rows on a GPU, steeply on a CPU), and their expected tokens
come from acceptance per drafter rank: at each position, the chance that the target's token is the
drafter's rank r given it is none of ranks 0..r-1 (rank 0's is p_i). A tree iteration reads back, with
its tokens, each accepted node's rank and the stop node's number of children (`walk_record`), which is
exactly what the walk judged; a chain iteration judges rank 0 only. The expected tokens of a budget are
those of the best-first tree over these estimates (`tree_tokens`), as the device builds it over the
drafter's own scores; a tree is picked over the chain only where its tokens per second are higher.

`benchmarks/adaptive_replay.py` replays this policy on recorded acceptance at this machine's costs
(how the constants below were chosen), and `benchmarks/adaptive.py` times it against plain decoding
and fixed B.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol

import torch

from . import cuda, ops

PRIOR = 0.8  # acceptance assumed for a position with no evidence: optimistic enough to try drafting
PRIOR_WEIGHT = 0.5  # the prior counts as half an observation: little bias once a position is observed
OBSERVED = 0.95  # weight kept by older observations at each new one (~20 recent iterations)
START = 1.0  # a request starts with this many observations at the prior, which fade like any other
PROBE_SHARE = 0.02  # while drafting is paused, probes may cost this share of the time (expected loss)
# --tree-budget auto: the node budgets it chooses among (beside 0, the chain); each is one captured step. A
# budget past ops.MAX_KERNEL_Q_LEN rows is left out (`tree_budgets`): such a verify's projections leave the
# batch-invariant kernels (kernels/invariant_linear.py serves up to 32 rows), so bf16 could round apart.
TREE_BUDGETS = (4, 8, 16, 32, 64)
# Chance that the target's token is the drafter's rank r >= 1 at a position, given it is none of ranks
# 0..r-1 (a hazard), assumed with no evidence: high enough that a cheap tree is tried and learnt from.
RANK_PRIOR = 0.3
# Drafter ranks the estimate follows per position (a tree's rank-r node for larger r is counted as unlikely
# as never): past rank 8 the chances left are tiny, and the policy runs every iteration.
RANKS = 8


def candidates(largest: int) -> list[int]:
    """The block sizes an adaptive engine may use: 1, the powers of two below `largest`, and `largest`.
    Each is one captured graph, so the list stays short."""
    sizes, b = {1, largest}, 2
    while b < largest:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def tree_budgets(room: int) -> tuple[int, ...]:
    """The node budgets `--tree-budget auto` may use in an engine whose caches have room for `room` nodes:
    at most ops.MAX_KERNEL_Q_LEN (the verify stays on the batch-invariant kernels)."""
    return tuple(n for n in TREE_BUDGETS if n <= min(room, ops.MAX_KERNEL_Q_LEN))


@dataclass(frozen=True)
class Walk:
    """What one tree iteration tells of the drafter's ranks (read back with its tokens): the rank among
    its siblings of each node the walk descended to (depth 1..accepted; rank r is the drafter's r-th
    likeliest id at that depth), and how many children the node it stopped at had (the target's token
    was none of them, so its rank there is at least that; 0: nothing was judged there)."""

    ranks: tuple[int, ...]
    stop_children: int


class Acceptance:
    """Per-position acceptance estimates p_1 .. p_(B-1) (conditional on the earlier drafts), and for trees
    the same per drafter rank: at each position, the chance that the target's token is the drafter's
    rank r given it is none of ranks 0..r-1 (rank 0's is p_i)."""

    def __init__(self, positions: int, prior: float = PRIOR):
        self.prior = prior
        self.hits = [START * prior] * positions  # weighted accepted observations per position
        self.seen = [START] * positions  # weighted observations per position
        # ranks 1.. per position, grown as trees observe them: [position][rank - 1]
        self.rank_hits: list[list[float]] = [[] for _ in range(positions)]
        self.rank_seen: list[list[float]] = [[] for _ in range(positions)]

    @property
    def positions(self) -> int:
        return len(self.seen)

    def rates(self) -> list[float]:
        return [(h + PRIOR_WEIGHT * self.prior) / (n + PRIOR_WEIGHT) for h, n in zip(self.hits, self.seen)]

    def observe(self, drafted: int, accepted: int) -> None:
        """One iteration: `drafted` drafts (b - 1), of which the first `accepted` were accepted.
        Draft i was judged if drafts 1..i-1 were accepted: positions 1..min(accepted + 1, drafted)."""
        for i in range(min(accepted + 1, drafted)):
            self.hits[i] = OBSERVED * self.hits[i] + (i < accepted)
            self.seen[i] = OBSERVED * self.seen[i] + 1.0

    def expected_tokens(self, block_size: int) -> float:
        """Tokens one iteration at `block_size` commits on average: 1 + Σ_{i<b} Π_{j≤i} p_j."""
        total, chain = 1.0, 1.0
        for p in self.rates()[: block_size - 1]:
            chain *= p
            total += chain
        return total

    def observe_walk(self, drafted: int, walk: Walk) -> None:
        """One tree iteration over `drafted` positions: each descended node is a hit at its rank (and a
        miss at every rank above it); the stop node's children are misses. Positions past the stop, and
        ranks past the judged ones, learn nothing."""
        for i, rank in enumerate(walk.ranks[:drafted]):
            self._judge(i, rank + 1, rank)
        i = len(walk.ranks)
        if i < drafted and walk.stop_children > 0:
            self._judge(i, walk.stop_children, None)

    def _judge(self, i: int, ranks: int, hit: int | None) -> None:
        """Ranks 0..ranks-1 at position i were judged; `hit` (if any) held the target's token."""
        self.hits[i] = OBSERVED * self.hits[i] + (hit == 0)
        self.seen[i] = OBSERVED * self.seen[i] + 1.0
        hits, seen = self.rank_hits[i], self.rank_seen[i]
        while len(seen) < ranks - 1:
            hits.append(START * RANK_PRIOR)
            seen.append(START)
        for r in range(1, ranks):
            hits[r - 1] = OBSERVED * hits[r - 1] + (hit == r)
            seen[r - 1] = OBSERVED * seen[r - 1] + 1.0

    def rank_probabilities(self, positions: int, ranks: int) -> list[list[float]]:
        """q[i][r]: the chance, given drafts 1..i were accepted, that the target's token at position i + 1
        is the drafter's rank r (r < ranks), for the first `positions` positions."""
        out = []
        for i, p in enumerate(self.rates()[:positions]):
            hits, seen = self.rank_hits[i], self.rank_seen[i]
            left, row = 1.0, []
            for r in range(ranks):
                h = p if r == 0 else ((hits[r - 1] + PRIOR_WEIGHT * RANK_PRIOR) / (seen[r - 1] + PRIOR_WEIGHT)
                                      if r - 1 < len(seen) else RANK_PRIOR)
                row.append(left * h)
                left *= 1.0 - h
            out.append(row)
        return out

    def expected_tree_tokens(self, block_size: int, budget: int) -> float:
        """Tokens one tree iteration of `budget` nodes over b - 1 drafted positions commits on average
        (the estimates' best-first tree: `tree_tokens`)."""
        return tree_tokens(self.rank_probabilities(block_size - 1, min(max(budget - 1, 1), RANKS)), budget)


def tree_tokens(q: list[list[float]], budget: int) -> float:
    """1 + the summed chance of each non-anchor node of the best-first tree of `budget` nodes built as
    tree.build builds it (a popped node pushes its next sibling and its first child), where a node's
    chance is the product of q[depth][rank] along its path: the tokens it commits on average, if the
    ranks at each position are independent of the path. At budget b it is at least the chain's τ at b."""
    return tree_tokens_by_budget(q, (budget,))[budget]


def tree_tokens_by_budget(q: list[list[float]], budgets) -> dict[int, float]:
    """`tree_tokens` for each budget in one best-first pass: a smaller tree is the first nodes popped."""
    total, ranks, out, wanted = 1.0, len(q[0]) if q else 0, {}, sorted(budgets)
    frontier = [(-q[0][0], 0, 0, 1.0)] if q and ranks else []
    for nodes in range(1, wanted[-1] + 1):
        while wanted and wanted[0] == nodes:
            out[wanted.pop(0)] = total
        if not frontier:
            continue
        neg, depth, rank, base = heapq.heappop(frontier)
        total -= neg
        if rank + 1 < ranks:
            heapq.heappush(frontier, (-base * q[depth][rank + 1], depth, rank + 1, base))
        if depth + 1 < len(q):
            heapq.heappush(frontier, (neg * q[depth + 1][0], depth + 1, 0, -neg))
    return out


@dataclass(frozen=True)
class Decision:
    """The block size of one iteration, and the figures that chose it (for the status line)."""

    block_size: int
    expected_tau: float  # expected tokens per iteration at block_size
    break_even: float  # τ at which block_size commits tokens as fast as b = 1 (1.0 for b = 1)
    # With b = 1 while drafting is possible: the best drafting block size, its τ and break-even.
    rival: int | None = None
    rival_tau: float = 0.0
    rival_break_even: float = 0.0
    probe: bool = False  # a block drafted while paused, to learn whether drafting pays again
    tree_budget: int = 0  # nodes of the verified tree (0: the drafter's chain)

    @property
    def paused(self) -> bool:
        return self.block_size == 1 and self.rival is not None

    def describe(self) -> str:
        """'b 16 · τ 6.1', 'b 16 · tree 32 · τ 7.0', 'b 1 · drafting paused: τ 1.2 < break-even 1.5', or
        'b 8 · probe: τ 1.4 < …'."""
        if self.paused:
            return f"b 1 · drafting paused: τ {self.rival_tau:.1f} < break-even {self.rival_break_even:.1f}"
        if self.probe:
            return f"b {self.block_size} · probe: τ {self.expected_tau:.1f} < break-even {self.break_even:.1f}"
        if self.block_size == 1:
            return "b 1"
        tree = f" · tree {self.tree_budget}" if self.tree_budget else ""
        return f"b {self.block_size}{tree} · τ {self.expected_tau:.1f}"


def choose(costs: dict[int, float], acceptance: Acceptance, tree_costs: dict[int, float] | None = None,
           tree_block: int = 0) -> Decision:
    """The block size with the most expected tokens per second; ties go to the smaller b. With
    `tree_costs` (seconds of a tree iteration at block size `tree_block`, per node budget), a tree
    instead where its expected tokens (`Acceptance.expected_tree_tokens`) per second beat the chain's;
    ties go to the chain, then to the smaller budget."""
    chain = _choose_chain(costs, acceptance)
    if not tree_costs or tree_block < 2:
        return chain
    q = acceptance.rank_probabilities(tree_block - 1, min(max(max(tree_costs) - 1, 1), RANKS))
    expected = tree_tokens_by_budget(q, tree_costs)
    best = max(expected, key=lambda n: (expected[n] / tree_costs[n], -n))
    if expected[best] / tree_costs[best] <= chain.expected_tau / costs[chain.block_size]:
        return chain
    one = costs.get(1)
    return Decision(tree_block, expected[best], tree_costs[best] / one if one else 0.0, tree_budget=best)


def _choose_chain(costs: dict[int, float], acceptance: Acceptance) -> Decision:
    expected = _expected_by_size(acceptance.rates(), sorted(costs))
    rate = {b: expected[b] / costs[b] for b in expected}
    best = max(rate, key=lambda b: (rate[b], -b))
    one = costs.get(1)

    def break_even(b: int) -> float:
        return costs[b] / one if one else 0.0

    if best == 1 and len(costs) > 1:
        rival = max((b for b in rate if b > 1), key=lambda b: (rate[b], -b))
        return Decision(1, 1.0, 1.0, rival, expected[rival], break_even(rival))
    return Decision(best, expected[best], break_even(best))


def _expected_by_size(rates: list[float], sizes: list[int]) -> dict[int, float]:
    """`Acceptance.expected_tokens` for each size in one pass (the policy runs every iteration)."""
    expected, total, chain, position = {}, 1.0, 1.0, 1
    for b in sizes:
        while position < b:
            chain *= rates[position - 1]
            total += chain
            position += 1
        expected[b] = total
    return expected


class Policy(Protocol):
    """What the engine asks each iteration (`decide`) and tells after it (`observe`)."""

    adaptive: bool
    acceptance: Acceptance

    def reset(self) -> None: ...

    def decide(self, costs: dict[int, float] | None) -> Decision: ...

    def observe(self, block_size: int, accepted: int) -> None: ...


class TreePolicy(Policy, Protocol):
    """A policy that also chooses the tree budget (`--tree-budget auto`): `decide` gets the tree costs
    (node budget → seconds at the largest block size) and `observe` the walk of a tree iteration."""

    tree_budgets: tuple[int, ...]

    def decide(self, costs: dict[int, float] | None, tree_costs: dict[int, float] | None = None) -> Decision: ...

    def observe(self, block_size: int, accepted: int, walk: Walk | None = None) -> None: ...


class Adaptive:
    """Chooses among `candidates(largest)` from the measured costs and the live acceptance, and probes
    while drafting is paused (module docstring)."""

    adaptive = True

    def __init__(self, largest: int, budgets: tuple[int, ...] = ()):
        self.sizes = candidates(largest)
        self.tree_budgets = budgets  # with --tree-budget auto: trees of these many nodes at b = largest
        self.acceptance = Acceptance(largest - 1)
        self.budget = 0.0  # seconds of expected loss that probes may spend now

    def reset(self) -> None:
        """A new request starts from the prior: how well the drafter does depends on the text (prose
        or code, one client or another), so one answer's evidence is not carried into the next."""
        self.acceptance = Acceptance(self.acceptance.positions)
        self.budget = 0.0

    def decide(self, costs: dict[int, float] | None, tree_costs: dict[int, float] | None = None) -> Decision:
        assert costs is not None, "an adaptive engine measures its costs before deciding"
        decision = choose(costs, self.acceptance, tree_costs, self.sizes[-1])
        if not decision.paused:
            self.budget = 0.0
            return decision
        loss = costs[decision.rival] - decision.rival_tau * costs[1]  # a probe's expected loss against b = 1
        if self.budget >= loss:
            self.budget = 0.0
            return Decision(decision.rival, decision.rival_tau, decision.rival_break_even, probe=True)
        self.budget += PROBE_SHARE * costs[1]
        return decision

    def observe(self, block_size: int, accepted: int, walk: Walk | None = None) -> None:
        if walk is None:
            self.acceptance.observe(block_size - 1, accepted)
        else:
            self.acceptance.observe_walk(block_size - 1, walk)


class Pinned:
    """Always `block_size` (`--block-size N`, or plain decoding); still estimates τ for the status line.
    With `budgets` (--tree-budget auto) it chooses between the chain and those trees at that block size."""

    adaptive = False

    def __init__(self, block_size: int, budgets: tuple[int, ...] = ()):
        self.sizes = [block_size]
        self.tree_budgets = budgets if block_size > 1 else ()
        self.acceptance = Acceptance(max(block_size - 1, 0))

    def reset(self) -> None:
        self.acceptance = Acceptance(self.acceptance.positions)

    def decide(self, costs: dict[int, float] | None, tree_costs: dict[int, float] | None = None) -> Decision:
        b = self.sizes[0]
        if tree_costs and costs:
            return choose({b: costs[b]}, self.acceptance, tree_costs, b)
        return Decision(b, self.acceptance.expected_tokens(b), costs[b] / costs[1] if costs and 1 in costs else 0.0)

    def observe(self, block_size: int, accepted: int, walk: Walk | None = None) -> None:
        if walk is None:
            self.acceptance.observe(block_size - 1, accepted)
        else:
            self.acceptance.observe_walk(block_size - 1, walk)


# ---- measured costs ---------------------------------------------------------------------------------
FIRST_BUCKET = 512  # contexts up to this share one measurement; then one per doubling
ROUNDS = {"cuda": 3, "cpu": 9}  # timed iterations per block size (the fastest kept): a CPU is noisier
CPU_BUDGET_S = 2.0  # a big model on a CPU takes fewer rounds (at least one) so measuring stays this short
KEEP: Callable[[list[float]], float] = min  # what a block size's timed rounds become: the fastest


def bucket(context: int, first: int = FIRST_BUCKET) -> int:
    """The context bucket whose measurement serves `context` tokens: `first`, then powers of two."""
    return max(first, 1 << max(context - 1, 0).bit_length())


@dataclass
class CostTable:
    """Seconds per iteration for each block size, measured per (sampling mode, context bucket): verify
    and draft cost grow with the context, and the sampling filters cost per verified row."""

    first_bucket: int = FIRST_BUCKET
    table: dict[tuple[Hashable, int], dict[int, float]] = field(default_factory=dict)

    def get(self, mode: Hashable, context: int) -> dict[int, float] | None:
        return self.table.get((mode, bucket(context, self.first_bucket)))

    def put(self, mode: Hashable, context: int, costs: dict[int, float]) -> None:
        self.table[(mode, bucket(context, self.first_bucket))] = costs


def cpu_clock() -> Callable[[], float]:
    """The clock a CPU iteration is timed with: wall time, but with torch on one thread that thread's
    CPU time. On a shared machine wall time also counts the neighbours' time slices, which slow every
    b alike and say nothing of the ratios the policy compares."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def time_iterations(runs: dict[int, Callable[[], object]], device: torch.device, rounds: int | None = None
                    ) -> dict[int, float]:
    """Seconds of one call of each `runs[b]`: the fastest of `rounds`, the block sizes interleaved (a busy
    moment hits them alike), after one untimed call each. Noise only ever adds time, and one measurement
    serves a whole context bucket, so the fastest round is kept: one disturbed stretch of rounds cannot
    skew every decision after it (the median could: `benchmarks/adaptive_costs.py` compares both with
    the real iterations). On CUDA, device time between events (with lookahead the host queues ahead);
    on a CPU, `cpu_clock`, with as many rounds as fit in `CPU_BUDGET_S` (an 8B model's iteration takes
    seconds there)."""
    start = time.perf_counter()
    for run in runs.values():
        run()
    gpu = cuda.is_gpu(device)
    if rounds is None:
        rounds = ROUNDS["cuda" if gpu else "cpu"]
        if not gpu:  # the untimed calls are a fair guess of a round's cost on a CPU
            rounds = max(1, min(rounds, int(CPU_BUDGET_S / max(time.perf_counter() - start, 1e-9))))
    clock = cpu_clock()
    times: dict[int, list[float]] = {b: [] for b in runs}
    for _ in range(rounds):
        for b, run in runs.items():
            if gpu:
                start, end = cuda.event(timing=True), cuda.event(timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times[b].append(start.elapsed_time(end) / 1e3)
            else:
                begin = clock()
                run()
                times[b].append(clock() - begin)
    return {b: KEEP(t) for b, t in times.items()}


def position_rates(block_sizes: list[int], acceptance_lengths: list[int], positions: int) -> list[float | None]:
    """Measured acceptance of draft i given drafts 1..i-1 were accepted, for i = 1..positions
    (None where no iteration reached it): what `--json` and `dflash bench` report."""
    hits, seen = [0] * positions, [0] * positions
    for b, tau in zip(block_sizes, acceptance_lengths):
        accepted = tau - 1
        for i in range(min(accepted + 1, b - 1, positions)):
            seen[i] += 1
            hits[i] += i < accepted
    return [h / n if n else None for h, n in zip(hits, seen)]


def walk_record(tree, path: torch.Tensor) -> torch.Tensor:
    """On the device, what `Walk` reads back from a tree iteration (`tree`: tree.Tree; `path` [D + 1]: the
    walk's nodes): [the rank among its siblings of path[1..D] (D), the children of path[0..D] (D + 1)].
    Siblings enter the tree in rank order (tree.build pushes rank r + 1 when it pops rank r), so a node's
    rank is the number of its siblings with a smaller index. No host read: fixed shapes per budget."""
    n = tree.tokens.shape[0]
    index = torch.arange(n, device=tree.tokens.device)
    real = (tree.tokens >= 0) & (index > 0)  # a node of the tree other than the anchor
    older = (tree.parents.view(-1, 1) == tree.parents.view(1, -1)) & real.view(1, -1) & (index.view(1, -1) < index.view(-1, 1))
    rank = older.sum(1)
    children = torch.zeros(n, dtype=torch.int64, device=index.device).index_add_(0, tree.parents, real.long())
    return torch.cat((rank.index_select(0, path[1:]), children.index_select(0, path)))


def read_walk(record: list[int], accepted: int) -> Walk:
    """`Walk` from `walk_record`'s values after a walk that descended `accepted` nodes."""
    depth = (len(record) - 1) // 2
    ranks, children = record[:depth], record[depth:]
    return Walk(tuple(ranks[:accepted]), children[accepted] if accepted < depth else 0)
