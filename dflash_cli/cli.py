"""The `dflash` command: parses flags, calls the library, prints. Errors the user can fix are one
line on stderr and a non-zero exit (1 runtime, 2 usage); tracebacks are for bugs."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

# Recent typer vendors its own click; older typer uses click itself. Catch both families.
_EXIT = (typer.Exit, click.exceptions.Exit)
_ABORT = (typer.Abort, click.exceptions.Abort)
_PARSER_ERRORS = (typer.TyperException, click.ClickException)

from . import __version__
from .errors import DflashError, UsageError

app = typer.Typer(
    name="dflash",
    help="Lossless speculative decoding (DFlash) for local LLM chat: the same tokens, several times faster.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SAMPLING = "Sampling"
MODEL = "Model"
OUTPUT = "Output"


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """-p as given; a file or stdin without its final newline (editors and `echo` add one)."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("give either -p/--prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    if prompt_file is not None:
        if str(prompt_file) == "-":
            return sys.stdin.read().removesuffix("\n")
        try:
            return prompt_file.read_text().removesuffix("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: give -p TEXT, --prompt-file FILE, or pipe text on stdin")
    return sys.stdin.read().removesuffix("\n")


@app.command()
def run(
    model: Optional[str] = typer.Argument(None, help="Model alias (see `dflash models`); or use --target/--drafter."),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from FILE ('-' for stdin)."),
    target: Optional[Path] = typer.Option(None, "--target", help="Target model directory (Hugging Face layout).", rich_help_panel=MODEL),
    drafter: Optional[Path] = typer.Option(None, "--drafter", help="DFlash drafter directory.", rich_help_panel=MODEL),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy.", rich_help_panel=SAMPLING),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 disables).", rich_help_panel=SAMPLING),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k likeliest tokens (0 disables).", rich_help_panel=SAMPLING),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p × the top probability.", rich_help_panel=SAMPLING),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (same seed, same answer).", rich_help_panel=SAMPLING),
    stop: List[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable).", rich_help_panel=SAMPLING),
    block_size: Optional[int] = typer.Option(None, "--block-size", "-b", min=1, help="Draft block size B (default: the drafter's).", rich_help_panel=MODEL),
    no_spec: bool = typer.Option(False, "--no-spec", help="Plain autoregressive decoding (the baseline).", rich_help_panel=MODEL),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32.", rich_help_panel=MODEL),
    max_context: Optional[int] = typer.Option(None, "--max-context", min=2, help="Most tokens (prompt + answer) held in the KV cache.", rich_help_panel=MODEL),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    think: bool = typer.Option(False, "--think", help="Qwen3 thinking mode (off by default: the drafters were trained without it)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text, token ids, acceptance lengths) instead of text.", rich_help_panel=OUTPUT),
    trace: bool = typer.Option(False, "--trace", help="With --json: every iteration's drafted tokens and how many were accepted.", rich_help_panel=OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No statistics on stderr.", rich_help_panel=OUTPUT),
) -> None:
    """Answer one prompt: the answer streams to stdout, statistics go to stderr.

    \b
    Examples:
      dflash run --target ./Qwen3-8B --drafter ./Qwen3-8B-DFlash-b16 -p "Why is the sky blue?"
      cat question.txt | dflash run --target T --drafter D > answer.txt
      dflash run --target T --drafter D -p "2+2?" --json --trace | jq .acceptance_lengths
    """
    from . import loader
    from .engine import Engine
    from .run import RunOptions, run_prompt
    from .sampling import SamplingParams

    text = _read_prompt(prompt, prompt_file)
    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
    target_dir, drafter_dir = _resolve_model(model, target, drafter)
    if no_spec:
        drafter_dir = None
    m = loader.load(target_dir, drafter_dir, device=device, dtype=dtype, max_context=max_context)
    engine = Engine(m.target, m.drafter, block_size=block_size if m.drafter else None, max_context=m.max_context)
    opts = RunOptions(max_tokens, sampling, tuple(stop), system, raw, think, json_out, trace, quiet)
    run_prompt(m, engine, text, opts)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="Model alias, or a shape name with --synthetic."),
    target: Optional[Path] = typer.Option(None, "--target", help="Target model directory.", rich_help_panel=MODEL),
    drafter: Optional[Path] = typer.Option(None, "--drafter", help="DFlash drafter directory.", rich_help_panel=MODEL),
    synthetic: bool = typer.Option(False, "--synthetic", help="Random weights at MODEL's real shapes (qwen3-8b, qwen3-4b, llama3.1-8b, tiny): times each step, no download."),
    tau: Optional[float] = typer.Option(None, "--tau", help="With --synthetic: the acceptance length to project tok/s for (default: the published one)."),
    context: int = typer.Option(1024, "--context", min=1, help="With --synthetic: tokens already in the KV cache."),
    categories: str = typer.Option("math,code,chat", "--prompts", help="Built-in prompt sets to run (comma-separated)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy.", rich_help_panel=SAMPLING),
    block_size: Optional[int] = typer.Option(None, "--block-size", "-b", min=2, help="Draft block size B.", rich_help_panel=MODEL),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16 or float32.", rich_help_panel=MODEL),
    max_context: Optional[int] = typer.Option(None, "--max-context", min=2, rich_help_panel=MODEL),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables.", rich_help_panel=OUTPUT),
) -> None:
    """Measure: plain decoding and DFlash side by side on built-in math, code and chat prompts.

    \b
    Examples:
      dflash bench --target ./Qwen3-8B --drafter ./Qwen3-8B-DFlash-b16
      dflash bench --synthetic qwen3-8b --tau 6.4      # check a GPU without downloading
    """
    import json

    from rich.console import Console

    from . import bench as bench_mod
    from . import loader
    from .sampling import SamplingParams

    console = Console(stderr=False)
    if synthetic:
        from .synthetic import run_synthetic

        dev = loader.resolve_device(device)
        report = run_synthetic(model or "qwen3-8b", device=dev, dtype=loader.resolve_dtype(dtype, dev),
                               context=context, block_size=block_size, tau=tau)
        if json_out:
            typer.echo(json.dumps(report.to_json()))
        else:
            bench_mod.render_synthetic(report, console)
        return
    wanted = tuple(c.strip() for c in categories.split(",") if c.strip())
    unknown = [c for c in wanted if c not in bench_mod.CATEGORIES]
    if unknown or not wanted:
        raise UsageError(f"unknown prompt set '{(unknown or [categories])[0]}' (choose from {', '.join(bench_mod.CATEGORIES)})")
    target_dir, drafter_dir = _resolve_model(model, target, drafter)
    if drafter_dir is None:
        raise UsageError("bench compares against DFlash: give a drafter (--drafter DIR or a model alias)")
    m = loader.load(target_dir, drafter_dir, device=device, dtype=dtype, max_context=max_context)
    progress = Console(stderr=True)
    report = bench_mod.run_bench(
        m, bench_mod.builtin_prompts(wanted), max_tokens=max_tokens, block_size=block_size,
        sampling=SamplingParams(temperature=temperature, seed=0),
        on_row=lambda r: progress.print(f"[dim]{r.category}: {r.dflash_tps:.1f} vs {r.plain_tps:.1f} tok/s, τ {r.tau:.2f}[/dim]"),
    )
    if json_out:
        typer.echo(json.dumps(report.to_json()))
    else:
        bench_mod.render(report, console)


def _resolve_model(model: Optional[str], target: Optional[Path], drafter: Optional[Path]) -> tuple[Path, Optional[Path]]:
    if target is None:
        if model is None:
            raise UsageError("name a model, or give --target DIR (and --drafter DIR)")
        raise UsageError(f"model aliases are not available yet; give --target DIR --drafter DIR (got '{model}')")
    for flag, path in (("--target", target), ("--drafter", drafter)):
        if path is not None and not path.is_dir():
            raise UsageError(f"{flag} {path} is not a directory")
    return target, drafter


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"dflash-cli {__version__}")
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Entry point: never a traceback for a user's mistake."""
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        return 130
    except _PARSER_ERRORS as e:  # usage errors from the parser: exit 2
        e.show()
        return e.exit_code
    except DflashError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `dflash run ... | head`: the reader left; say nothing, and keep Python's final flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
