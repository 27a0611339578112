"""`dflash bench`: plain decoding, DFlash at B and DFlash with auto block size, side by side
(../bench.py measures; --synthetic times random weights at a real model's shapes: ../synthetic.py)."""
from __future__ import annotations

import math
from typing import Optional

import typer

from ..errors import UsageError
from .options import (DEVICE, DRAFTER, DTYPE, MAX_CONTEXT, MODEL, OUTPUT, QUANTIZE, TARGET, TEMPERATURE, TREE_BUDGET, YES,
                      model_or_directory, note)


def bench(
    model: Optional[str] = typer.Argument(None, help="Model alias, or a shape name with --synthetic.", metavar="MODEL"),
    target: Optional[str] = TARGET,
    drafter: Optional[str] = DRAFTER,
    yes: bool = YES,
    synthetic: bool = typer.Option(False, "--synthetic", help="Random weights at MODEL's real shapes (qwen3-8b, llama3.1-8b, qwen3.5-27b, gpt-oss-20b, tiny and more: a wrong name lists them all): times each step, no download."),
    tau: Optional[float] = typer.Option(None, "--tau", metavar="TAU", help="With --synthetic: the acceptance length to project tok/s for (default: the published one)."),
    context: int = typer.Option(1024, "--context", min=1, metavar="TOKENS", help="With --synthetic: tokens already in the KV cache."),
    categories: Optional[str] = typer.Option(None, "--prompts", metavar="SETS", help="Built-in prompt sets to run, comma-separated: math, code, chat, story (default math,code,chat; story for `demo`)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, metavar="N", help="Tokens per answer."),
    temperature: float = TEMPERATURE,
    block_size: Optional[int] = typer.Option(None, "--block-size", "-b", min=2, metavar="B", help="The fixed arm's block size, and the largest the auto arm may choose (default: the drafter's).", rich_help_panel=MODEL),
    tree_budget: str = TREE_BUDGET,
    device: str = DEVICE,
    dtype: str = DTYPE,
    quantize: Optional[str] = QUANTIZE,
    max_context: Optional[int] = MAX_CONTEXT,
    repeats: int = typer.Option(3, "--repeats", min=1, metavar="N", help="Runs of each prompt per arm, interleaved: the table shows medians and their spread (--json: every run)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables.", rich_help_panel=OUTPUT),
) -> None:
    """Measure: plain decoding, DFlash at block size B and DFlash with auto block size, side by side on
    built-in math, code and chat prompts; with this machine's break-even τ per block size.

    \b
    Examples:
      dflash bench qwen3-8b
      dflash bench --synthetic qwen3-8b --tau 6.4      # check a GPU without downloading
      dflash bench --synthetic qwen3.6-27b --quantize int4   # a 27B target in int4, as on a 24 GB card
    """
    import json

    from rich.console import Console

    from .. import bench as bench_mod
    from .. import loader
    from ..api import ModelOptions, open_session, parse_tree_budget, resolve
    from ..sampling import SamplingParams

    if tau is not None and not (math.isfinite(tau) and tau >= 1):  # one iteration commits at least one token
        raise UsageError(f"--tau must be a number of at least 1 (tokens per iteration), got {tau}")
    budget = parse_tree_budget(tree_budget)

    from .. import precision

    console = Console()
    if synthetic:
        from ..synthetic import run_synthetic

        fmt = precision.parse(quantize)
        if fmt == "auto":
            raise UsageError("--synthetic times the format it is given: --quantize none, int4, int8 or fp8")
        dev = loader.resolve_device(device)
        report = run_synthetic(model or "qwen3-8b", device=dev, dtype=loader.resolve_dtype(dtype, dev),
                               context=context, block_size=block_size, tau=tau,
                               quantize=None if fmt in (None, "none") else fmt)
        if json_out:
            typer.echo(json.dumps(report.to_json()))
        else:
            bench_mod.render_synthetic(report, console)
        return
    if categories is None:  # the demo's stories model has no chat template: it continues stories
        categories = "story" if (model or "").strip().lower() == "demo" else ",".join(bench_mod.DEFAULT_CATEGORIES)
    wanted = tuple(c.strip() for c in categories.split(",") if c.strip())
    unknown = [c for c in wanted if c not in bench_mod.CATEGORIES]
    if unknown or not wanted:
        raise UsageError(f"unknown prompt set '{(unknown or [categories])[0]}' (choose from {', '.join(bench_mod.CATEGORIES)})")
    model, target = model_or_directory(model, target)
    opts = ModelOptions(model=model, target=target, drafter=drafter, yes=yes, block_size=block_size, device=device,
                        dtype=dtype, max_context=max_context)
    opts = precision.apply(opts, quantize, note)
    dirs = resolve(opts, least_block=2)
    if dirs[1] is None:
        raise UsageError("bench compares against DFlash: give a drafter (--drafter or a model alias)")
    m = open_session(opts, dirs).model  # bench builds its own engines: one per arm
    progress = Console(stderr=True, highlight=False, soft_wrap=True)
    report = bench_mod.run_bench(
        m, bench_mod.builtin_prompts(wanted), max_tokens=max_tokens, block_size=block_size,
        sampling=SamplingParams(temperature=temperature, seed=0), repeats=repeats,
        tree_budget=budget,
        on_row=lambda r: progress.print(bench_mod.progress_line(r, block_size or m.drafter.cfg.block_size), style="dim"),
    )
    if json_out:
        typer.echo(json.dumps(report.to_json()))
    else:
        bench_mod.render(report, console)
