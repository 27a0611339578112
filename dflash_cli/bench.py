"""`dflash bench`: plain decoding, DFlash at a fixed block size B, and DFlash with the block size
chosen per iteration (auto), side by side on a built-in prompt set.

All three arms use the same engine code and kernels; the plain run is the same loop at block size 1.
Speeds are decode speeds (after the first token, as the DFlash paper reports); end-to-end speeds,
prefill included, are reported beside them. At temperature 0 the answers are also compared token for
token. In float32 that is the losslessness check on the user's own hardware. In bfloat16 a verify
pass (B rows) and a decode pass (1 row) take different GEMM kernels and round differently, so the
answers may part at a near-tie: the `same` column then names the first token that differs and the
target's top-2 logit margin there (a small margin is a tie broken by rounding, not a lost token).
The `same` column compares the fixed-B arm with plain decoding: its block sizes are pinned, so it
says the same thing every run. The auto arm's block sizes follow timed costs, so in bfloat16 two
runs of it can part from plain decoding at different tokens; it is compared too (`auto_identical`),
and must match in float32.
The report also gives this machine's break-even τ for each block size (the acceptance length at
which drafting at b commits tokens as fast as b = 1, from the auto engine's measured costs) and the
drafter's acceptance at each block position.
Every prompt runs `repeats` times per arm, the arms interleaved (plain, B, auto, plain, …) so that a
drift of the machine touches all three alike. Speeds are the median of the repeats; the spread
(min–max) is shown beside them, so that noise is not read as a regression. τ, the histograms and the
`same` column come from the first repeat: the answers are seeded, so every repeat writes the same tokens.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch

from . import ops
from .adaptive import FIRST_BUCKET, position_rates
from .engine import Engine, Request
from .generate import Stats, stream_text
from .loader import Model
from .prompt import encode_chat
from .sampling import SamplingParams

CATEGORIES = ("math", "code", "chat", "story")  # story: openings for the demo's stories model
DEFAULT_CATEGORIES = ("math", "code", "chat")


def builtin_prompts(categories: tuple[str, ...] = DEFAULT_CATEGORIES) -> list[dict]:
    data = json.loads(resources.files("dflash_cli").joinpath("data/bench_prompts.json").read_text())
    return [p for p in data if p["category"] in categories]


@dataclass
class BenchRow:
    category: str
    prompt: str
    tokens: int
    plain_tps: float
    dflash_tps: float  # fixed block size B
    auto_tps: float
    plain_e2e_tps: float
    dflash_e2e_tps: float
    auto_e2e_tps: float
    tau: float  # at B
    auto_tau: float
    auto_block_sizes: dict[int, int]  # b → iterations of the auto arm
    identical: bool  # the fixed-B arm wrote plain decoding's tokens (sampling too: the seed fixes the answer)
    auto_identical: bool = True  # the auto arm did too (in bfloat16 its timed block sizes may part at a near-tie)
    divergence: dict | None = None  # where fixed B parts from plain: {"token": i, "margin": top-1 minus top-2 logit}
    auto_divergence: dict | None = None  # where auto parts from plain
    runs: dict[str, list[float]] = field(default_factory=dict)  # SPEEDS → each repeat's figure (the fields: medians)
    tree_budgets: dict[int, int] = field(default_factory=dict)  # tree nodes → iterations of the fixed-B arm (0: chain)
    auto_tree_budgets: dict[int, int] = field(default_factory=dict)  # the same, of the auto arm

    @property
    def noise(self) -> float:
        """The widest half-range of the three decode speeds over the repeats, as a share of its median."""
        shares = [(max(v) - min(v)) / 2 / statistics.median(v)
                  for v in (self.runs.get(k) for k in ("plain_tps", "dflash_tps", "auto_tps")) if v and min(v) > 0]
        return max(shares, default=0.0)

    @property
    def speedup(self) -> float:
        return self.dflash_tps / self.plain_tps if self.plain_tps else 0.0

    @property
    def auto_speedup(self) -> float:
        return self.auto_tps / self.plain_tps if self.plain_tps else 0.0


SPEEDS = ("plain_tps", "dflash_tps", "auto_tps", "plain_e2e_tps", "dflash_e2e_tps", "auto_e2e_tps")


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": list(values)}


@dataclass
class BenchReport:
    block_size: int
    max_tokens: int
    repeats: int = 1
    rows: list[BenchRow] = field(default_factory=list)
    histogram: Counter = field(default_factory=Counter)  # τ → iterations, at B
    costs: dict[int, float] = field(default_factory=dict)  # seconds per iteration at each b (auto's measurement)
    position_acceptance: list[float | None] = field(default_factory=list)  # at B, over every prompt
    tree_budget: int | str = 0  # the DFlash arms' verified tree (0: the drafter's chain; "auto": chosen per iteration)
    tree_costs: dict[int, float] = field(default_factory=dict)  # with auto: seconds of a tree iteration at B per budget

    @property
    def break_even(self) -> dict[int, float]:
        """τ at which each b commits tokens as fast as b = 1 does: its cost over b = 1's."""
        one = self.costs.get(1)
        return {b: seconds / one for b, seconds in sorted(self.costs.items())} if one else {}

    def totals(self) -> dict:
        """Aggregate speeds as total tokens over total time (not a mean of ratios), for each repeat; the
        figures are the medians over the repeats, and `spread` gives each one's min, median, max and runs."""
        tokens = sum(r.tokens for r in self.rows)

        def rate(tps: str, i: int) -> float:
            figures = [(r.tokens, r.runs[tps][i] if r.runs else getattr(r, tps)) for r in self.rows]
            seconds = sum(n / v for n, v in figures if v)
            return tokens / seconds if seconds else 0.0

        per_repeat = []
        for i in range(self.repeats if all(r.runs for r in self.rows) else 1):
            t = {k: rate(k, i) for k in SPEEDS}
            t["speedup"] = t["dflash_tps"] / t["plain_tps"] if t["plain_tps"] else 0.0
            t["auto_speedup"] = t["auto_tps"] / t["plain_tps"] if t["plain_tps"] else 0.0
            per_repeat.append(t)
        spreads = {k: spread([t[k] for t in per_repeat]) for k in per_repeat[0]}
        iterations = sum(self.histogram.values())
        return {
            "tokens": tokens, **{k: v["median"] for k, v in spreads.items()},
            "tau": sum(t * n for t, n in self.histogram.items()) / iterations if iterations else 0.0,
            "all_identical": all(r.identical for r in self.rows),
            "auto_all_identical": all(r.auto_identical for r in self.rows),
            "repeats": len(per_repeat), "spread": spreads,
        }

    def to_json(self) -> dict:
        return {
            "block_size": self.block_size,
            "tree_budget": self.tree_budget,
            "max_tokens": self.max_tokens,
            "repeats": self.repeats,
            "rows": [asdict(r) | {"speedup": r.speedup, "auto_speedup": r.auto_speedup} for r in self.rows],
            "acceptance_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
            "iteration_seconds": {str(b): s for b, s in self.costs.items()},
            "tree_iteration_seconds": {str(n): s for n, s in self.tree_costs.items()},
            "break_even_tau": {str(b): t for b, t in self.break_even.items()},
            "position_acceptance": self.position_acceptance,
            "totals": self.totals(),
        }


def _generate(engine: Engine, model: Model, ids: list[int], max_tokens: int, sampling: SamplingParams) -> Stats:
    stats = Stats()
    for _ in stream_text(engine, model.tokenizer, Request(ids, max_tokens, model.stop_token_ids, sampling), stats):
        pass
    return stats


def first_divergence(engine: Engine, prompt: list[int], plain: list[int], spec: list[int]) -> dict:
    """The first token where two answers part, and the target's top-2 logit margin at that position
    (computed with plain decoding's context): how close to a tie the choice was."""
    i = next((n for n, (x, y) in enumerate(zip(plain, spec)) if x != y), min(len(plain), len(spec)))
    with torch.inference_mode():
        logits = engine._prefill(prompt + plain[:i]).float()[-1]
    top = torch.topk(logits, 2).values
    return {"token": i, "margin": round(float(top[0] - top[1]), 5)}


def run_bench(model: Model, prompts: list[dict], *, max_tokens: int = 256, block_size: int | None = None,
              sampling: SamplingParams | None = None, on_row=None, repeats: int = 3,
              tree_budget: int | str = 0) -> BenchReport:
    """block_size: the fixed arm's B, and the largest the auto arm may choose (default: the drafter's).
    repeats: runs of each prompt per arm, interleaved; the row's speeds are their medians.
    tree_budget: both DFlash arms verify a tree of this many nodes (0: the chain; "auto": each picks the chain or
    a tree per iteration, and the rows count the budgets they used)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    sampling = sampling or SamplingParams(seed=0)
    encoded = [encode_chat(model.tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in prompts]
    # Three engines share the device with one set of weights: size their caches for these prompts only.
    context = min(model.max_context, max(len(ids) for ids in encoded) + max_tokens + 64)
    plain = Engine(model.target, max_context=context)
    fixed = Engine(model.target, model.drafter, block_size=block_size, max_context=context, tree_budget=tree_budget)
    auto = Engine(model.target, model.drafter, block_size=block_size, max_context=context, adaptive=True,
                  tree_budget=tree_budget)
    report = BenchReport(fixed.block_size, max_tokens, repeats, tree_budget=tree_budget)
    warm = encode_chat(model.tokenizer, [{"role": "user", "content": "Hello"}])
    for engine in (plain, fixed, auto):  # first calls pay for kernel compilation, graph capture, cost measurement
        engine.warm_up(sampling)
        _generate(engine, model, warm, 8, sampling)
    sizes, taus = [], []
    for p, ids in zip(prompts, encoded):
        arms = [(_generate(plain, model, ids, max_tokens, sampling), _generate(fixed, model, ids, max_tokens, sampling),
                 _generate(auto, model, ids, max_tokens, sampling)) for _ in range(repeats)]
        a, b, c = arms[0]
        runs = {f"{arm}_{kind}": [getattr(stats[n], attr) for stats in arms]
                for n, arm in enumerate(("plain", "dflash", "auto"))
                for kind, attr in (("tps", "tokens_per_second"), ("e2e_tps", "end_to_end_tokens_per_second"))}
        median = {k: statistics.median(v) for k, v in runs.items()}
        report.histogram.update(b.acceptance_lengths)
        sizes += b.block_sizes
        taus += b.acceptance_lengths
        row = BenchRow(
            category=p["category"], prompt=p["prompt"], tokens=b.generated,
            **{k: median[k] for k in SPEEDS}, tau=b.mean_acceptance, auto_tau=c.mean_acceptance,
            auto_block_sizes=dict(sorted(Counter(c.block_sizes).items())),
            identical=a.token_ids == b.token_ids, auto_identical=a.token_ids == c.token_ids,
            divergence=None if a.token_ids == b.token_ids else first_divergence(plain, ids, a.token_ids, b.token_ids),
            auto_divergence=None if a.token_ids == c.token_ids else first_divergence(plain, ids, a.token_ids,
                                                                                      c.token_ids),
            runs={k: runs[k] for k in SPEEDS},
            tree_budgets=dict(sorted(Counter(b.tree_budgets).items())),
            auto_tree_budgets=dict(sorted(Counter(c.tree_budgets).items())),
        )
        report.rows.append(row)
        if on_row:
            on_row(row)
    measured = auto.costs.get(sampling.mode, 0) or {}
    report.costs = {b: s for b, s in measured.items() if isinstance(b, int)}
    report.tree_costs = {key[1]: s for key, s in measured.items() if isinstance(key, tuple)}
    report.position_acceptance = position_rates(sizes, taus, report.block_size - 1)
    return report


def progress_line(r: BenchRow, block_size: int) -> str:
    """One prompt's result, for stderr while the bench runs."""
    return (f"{r.category}: plain {r.plain_tps:.1f} · B={block_size} {r.dflash_tps:.1f} ({r.speedup:.2f}×, τ {r.tau:.2f}) "
            f"· auto {r.auto_tps:.1f} ({r.auto_speedup:.2f}×) tok/s")


def render(report: BenchReport, console) -> None:
    """A rich table: one row per prompt, totals; then the machine's break-even τ, the acceptance per
    position and the τ histogram at B, what auto chose, and the end-to-end speeds."""
    from rich import box
    from rich.table import Table

    from .ui import block_size_mix, rates_line

    b = report.block_size
    table = Table(title=f"dflash bench · decode tok/s · up to {report.max_tokens} tokens",
                  title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("set", no_wrap=True, min_width=4)  # three arms: a light frame keeps the table in 80 columns
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=11)
    for col in ("tokens", "plain", f"B={b}", "auto", "speedup", "auto ×", "τ", "same"):
        table.add_column(col, justify="right", no_wrap=True, min_width=max(len(col), 4))
    for r in report.rows:
        table.add_row(r.category, r.prompt, str(r.tokens), f"{r.plain_tps:.1f}", f"{r.dflash_tps:.1f}",
                      f"{r.auto_tps:.1f}", f"{r.speedup:.2f}×", f"{r.auto_speedup:.2f}×", f"{r.tau:.2f}",
                      "yes" if r.identical else f"from {r.divergence['token']} (Δ {r.divergence['margin']:.3g})")
    t = report.totals()
    table.add_section()
    table.add_row("all", "", str(t["tokens"]), f"{t['plain_tps']:.1f}", f"{t['dflash_tps']:.1f}", f"{t['auto_tps']:.1f}",
                  f"{t['speedup']:.2f}×", f"{t['auto_speedup']:.2f}×", f"{t['tau']:.2f}",
                  "yes" if t["all_identical"] else "no")
    console.print(table)
    if report.repeats > 1:
        console.print(spread_line(t, b, report.repeats))
        noisy = [f"{r.category} {n}" for n, r in enumerate(report.rows, 1) if r.noise > NOISY]
        if noisy:
            console.print(f"noisy (a speed varied by more than ±{NOISY:.0%} over the runs): {', '.join(noisy)}")
    parted = [r for r in report.rows if not r.auto_identical]
    if parted:
        first = parted[0].auto_divergence
        console.print(f"auto parted from plain decoding on {len(parted)} of {len(report.rows)} prompts (first at token "
                      f"{first['token']}, Δ {first['margin']:.3g}): its block sizes follow timed costs, so in bfloat16 "
                      "a near-tie can round either way (README: what is exact)")
    if report.break_even:
        console.print(f"break-even τ on this machine (context ≤ {FIRST_BUCKET}): "
                      + " · ".join(f"b {k}: {v:.2f}" for k, v in report.break_even.items() if k > 1))
        if report.tree_costs:
            one = report.costs[1]
            console.print(f"break-even τ of a tree at B={b}: "
                          + " · ".join(f"{n} nodes: {s / one:.2f}" for n, s in sorted(report.tree_costs.items())))
    console.print(f"acceptance by position at B={b}: {rates_line(report.position_acceptance)}")
    console.print(histogram_line(report.histogram, b))
    mix = Counter()
    for r in report.rows:
        mix.update(r.auto_block_sizes)
    console.print(f"auto chose: {block_size_mix(list(mix.elements()))}")
    if report.tree_budget:
        for arm, key in ((f"B={b}", "tree_budgets"), ("auto", "auto_tree_budgets")):
            console.print(f"tree budget {report.tree_budget}, {arm} verified: {tree_mix(report.rows, key)}")
    console.print(f"with prefill: plain {t['plain_e2e_tps']:.1f} · B={b} {t['dflash_e2e_tps']:.1f} · "
                  f"auto {t['auto_e2e_tps']:.1f} tok/s (end to end)")
    console.print("Decode speeds are after the first token; --json has every figure.")


def tree_mix(rows: list[BenchRow], key: str) -> str:
    """'chain 12 · 16 nodes 30 (iterations)': which tree budgets an arm's iterations verified."""
    mix = Counter()
    for r in rows:
        mix.update(getattr(r, key))
    return " · ".join(f"{'chain' if n == 0 else f'{n} nodes'} {count}" for n, count in sorted(mix.items())) + " iterations"


NOISY = 0.10  # a row whose speeds vary more than this (half-range over median) is named under the table


def spread_line(totals: dict, block_size: int, repeats: int) -> str:
    """The totals' min–max over the repeats: a later run inside these ranges is noise, not a regression."""
    sp = totals["spread"]

    def span(key: str, fmt: str) -> str:
        return f"{sp[key]['min']:{fmt}}–{sp[key]['max']:{fmt}}"

    return (f"medians of {repeats} runs per prompt (arms interleaved); the totals ranged over them: plain "
            f"{span('plain_tps', '.1f')} · B={block_size} {span('dflash_tps', '.1f')} · auto {span('auto_tps', '.1f')} "
            f"tok/s · speedup {span('speedup', '.2f')}× · auto {span('auto_speedup', '.2f')}×")


def histogram_line(histogram: Counter, block_size: int) -> str:
    """τ histogram as one line of bars: how often 1, 2, … B tokens were committed per iteration."""
    from .ui import tau_bars

    return f"acceptance τ=1…{block_size}: {tau_bars(histogram, block_size)}  ({sum(histogram.values())} iterations)"


def render_synthetic(report, console) -> None:
    from rich.table import Table

    r = report
    held = f" · target in {r.quantize}" if getattr(r, "quantize", None) else ""
    table = Table(title=f"synthetic {r.shape} · {r.dtype}{held} on {r.device} · context {r.context} · B={r.block_size}",
                  title_justify="left")
    table.add_column("step")
    table.add_column("time", justify="right")
    table.add_column("vs decode", justify="right")
    for name, seconds in (("decode (1 token)", r.decode_s), (f"verify ({r.block_size} tokens)", r.verify_s),
                          ("draft (+ context K/V)", r.draft_s), ("accept", r.accept_s),
                          ("commit (hybrid: state replay)", r.commit_s),
                          ("host overhead", r.host_overhead_s), ("whole iteration", r.iteration_s)):
        table.add_row(name, f"{seconds * 1e3:.3f} ms", f"{seconds / r.decode_s:.2f}×")
    console.print(table)
    console.print(f"decode reads {r.weight_bytes / 1e9:.2f} GB of weights: {r.decode_bandwidth / 1e9:.1f} GB/s, "
                  f"{100 * r.roofline_fraction:.0f}% of the measured copy rate ({r.copy_bytes_per_s / 1e9:.0f} GB/s)")
    console.print(f"plain decoding: {1 / r.decode_s:.1f} tok/s (measured step)")
    if r.iteration_by_block:
        console.print("iteration by block size (the auto engine's measurement): "
                      + " · ".join(f"b {b}: {s * 1e3:.3f} ms" for b, s in r.iteration_by_block.items()))
        console.print("break-even τ: " + " · ".join(f"b {b}: {t:.2f}" for b, t in r.break_even.items() if b > 1))
    if r.verify_by_nodes:
        one = r.verify_by_nodes[1]
        console.print("verify by node count (a best-first tree, ancestor mask; what --tree-budget auto weighs): "
                      + " · ".join(f"{n}: {s * 1e3:.3f} ms ({s / one:.2f}×)" for n, s in r.verify_by_nodes.items()))
        if max(r.verify_by_nodes) > ops.MAX_KERNEL_Q_LEN:
            console.print(f"(over {ops.MAX_KERNEL_Q_LEN} nodes the projections leave the batch-invariant kernels, so "
                          "bf16 can round apart from plain decoding: auto does not use them)")
    if r.projected_tps is not None:
        console.print(f"PROJECTION at τ = {r.tau:.2f}: {r.projected_tps:.1f} tok/s (τ / iteration time; not a generation run)")
