"""`dflash bench`: plain decoding and DFlash side by side on a built-in prompt set.

Both runs use the same engine code and kernels; the plain run is the same loop at block size 1.
Speeds are decode speeds (after the first token, as the DFlash paper reports); end-to-end speeds,
prefill included, are reported beside them. At temperature 0 each answer pair is also compared
token for token. In float32 that is the losslessness check on the user's own hardware. In bfloat16 a
verify pass (B rows) and a decode pass (1 row) take different GEMM kernels and round differently, so
the two answers may part at a near-tie: the `same` column then names the first token that differs and
the target's top-2 logit margin there (a small margin is a tie broken by rounding, not a lost token).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch

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
    dflash_tps: float
    plain_e2e_tps: float
    dflash_e2e_tps: float
    tau: float
    identical: bool  # same tokens as plain decoding (sampling too: the seed fixes both answers)
    divergence: dict | None = None  # where they part: {"token": i, "margin": top-1 minus top-2 logit there}

    @property
    def speedup(self) -> float:
        return self.dflash_tps / self.plain_tps if self.plain_tps else 0.0


@dataclass
class BenchReport:
    block_size: int
    max_tokens: int
    rows: list[BenchRow] = field(default_factory=list)
    histogram: Counter = field(default_factory=Counter)  # τ → iterations

    def totals(self) -> dict:
        """Aggregate speeds as total tokens over total time (not a mean of ratios)."""
        tokens = sum(r.tokens for r in self.rows)
        plain = sum(r.tokens / r.plain_tps for r in self.rows if r.plain_tps)
        spec = sum(r.tokens / r.dflash_tps for r in self.rows if r.dflash_tps)
        iterations = sum(self.histogram.values())
        return {
            "tokens": tokens,
            "plain_tps": tokens / plain if plain else 0.0,
            "dflash_tps": tokens / spec if spec else 0.0,
            "speedup": plain / spec if spec else 0.0,
            "tau": sum(t * n for t, n in self.histogram.items()) / iterations if iterations else 0.0,
            "all_identical": all(r.identical for r in self.rows),
        }

    def to_json(self) -> dict:
        return {
            "block_size": self.block_size,
            "max_tokens": self.max_tokens,
            "rows": [asdict(r) | {"speedup": r.speedup} for r in self.rows],
            "acceptance_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
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
              sampling: SamplingParams | None = None, on_row=None) -> BenchReport:
    sampling = sampling or SamplingParams(seed=0)
    encoded = [encode_chat(model.tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in prompts]
    # Two engines share the GPU with one set of weights: size their caches for these prompts only.
    context = min(model.max_context, max(len(ids) for ids in encoded) + max_tokens + 64)
    plain = Engine(model.target, max_context=context)
    spec = Engine(model.target, model.drafter, block_size=block_size, max_context=context)
    report = BenchReport(spec.block_size, max_tokens)
    warm = encode_chat(model.tokenizer, [{"role": "user", "content": "Hello"}])
    for engine in (plain, spec):  # first calls pay for kernel compilation, graph capture, allocator growth
        engine.warm_up(sampling)
        _generate(engine, model, warm, 8, sampling)
    for p, ids in zip(prompts, encoded):
        a = _generate(plain, model, ids, max_tokens, sampling)
        b = _generate(spec, model, ids, max_tokens, sampling)
        report.histogram.update(b.acceptance_lengths)
        row = BenchRow(
            category=p["category"], prompt=p["prompt"], tokens=b.generated,
            plain_tps=a.tokens_per_second, dflash_tps=b.tokens_per_second,
            plain_e2e_tps=a.end_to_end_tokens_per_second, dflash_e2e_tps=b.end_to_end_tokens_per_second,
            tau=b.mean_acceptance, identical=a.token_ids == b.token_ids,
            divergence=None if a.token_ids == b.token_ids else first_divergence(plain, ids, a.token_ids, b.token_ids),
        )
        report.rows.append(row)
        if on_row:
            on_row(row)
    return report


def render(report: BenchReport, console) -> None:
    """A rich table: one row per prompt, totals, and the acceptance histogram."""
    from rich.table import Table

    table = Table(title=f"dflash bench · decode tok/s · block size {report.block_size} · "
                        f"up to {report.max_tokens} tokens", title_justify="left")
    table.add_column("set", no_wrap=True, min_width=4)
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=18)
    for col in ("tokens", "plain", "dflash", "speedup", "τ", "same"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for r in report.rows:
        table.add_row(r.category, r.prompt, str(r.tokens), f"{r.plain_tps:.1f}", f"{r.dflash_tps:.1f}",
                      f"{r.speedup:.2f}×", f"{r.tau:.2f}", "yes" if r.identical else
                      f"from {r.divergence['token']} (Δ {r.divergence['margin']:.3g})")
    t = report.totals()
    table.add_section()
    table.add_row("all", "", str(t["tokens"]), f"{t['plain_tps']:.1f}", f"{t['dflash_tps']:.1f}",
                  f"{t['speedup']:.2f}×", f"{t['tau']:.2f}", "yes" if t["all_identical"] else "no")
    console.print(table)
    console.print(histogram_line(report.histogram, report.block_size))
    console.print("Speeds are decode speeds (after the first token); see --json for end-to-end figures.")


def histogram_line(histogram: Counter, block_size: int) -> str:
    """τ histogram as one line of bars: how often 1, 2, … B tokens were committed per iteration."""
    from .ui import tau_bars

    return f"acceptance τ=1…{block_size}: {tau_bars(histogram, block_size)}  ({sum(histogram.values())} iterations)"


def render_synthetic(report, console) -> None:
    from rich.table import Table

    r = report
    table = Table(title=f"synthetic {r.shape} · {r.dtype} on {r.device} · context {r.context} · B={r.block_size}",
                  title_justify="left")
    table.add_column("step")
    table.add_column("time", justify="right")
    table.add_column("vs decode", justify="right")
    for name, seconds in (("decode (1 token)", r.decode_s), (f"verify ({r.block_size} tokens)", r.verify_s),
                          ("draft (+ context K/V)", r.draft_s), ("accept", r.accept_s),
                          ("host overhead", r.host_overhead_s), ("whole iteration", r.iteration_s)):
        table.add_row(name, f"{seconds * 1e3:.3f} ms", f"{seconds / r.decode_s:.2f}×")
    console.print(table)
    console.print(f"decode reads {r.weight_bytes / 1e9:.2f} GB of weights: {r.decode_bandwidth / 1e9:.1f} GB/s, "
                  f"{100 * r.roofline_fraction:.0f}% of the measured copy rate ({r.copy_bytes_per_s / 1e9:.0f} GB/s)")
    console.print(f"plain decoding: {1 / r.decode_s:.1f} tok/s (measured step)")
    if r.projected_tps is not None:
        console.print(f"PROJECTION at τ = {r.tau:.2f}: {r.projected_tps:.1f} tok/s (τ / iteration time; not a generation run)")
