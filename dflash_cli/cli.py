"""The `dflash` command: parses flags, calls the library, prints. Errors the user can fix are one
line on stderr and a non-zero exit (1 runtime, 2 usage); tracebacks are for bugs."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from . import __version__
from .errors import DflashError, UsageError

# Recent typer vendors its own click; older typer uses click itself. Catch both families.
_EXIT = (typer.Exit, click.exceptions.Exit)
_ABORT = (typer.Abort, click.exceptions.Abort)
_PARSER_ERRORS = (typer.TyperException, click.ClickException)

app = typer.Typer(
    name="dflash",
    help="Lossless speculative decoding (DFlash) for local LLM chat: the same tokens, several times faster.\n\n"
         "Start with `dflash chat qwen3-8b`; `dflash models` lists what can run.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SAMPLING = "Sampling"
MODEL = "Model"
OUTPUT = "Output"

# Options shared by run, chat and bench (typer reads the same declaration for each command).
MODEL_ARG = typer.Argument(None, help="Model alias (see `dflash models`); or use --target/--drafter.",
                           metavar="MODEL")
TARGET = typer.Option(None, "--target", help="Target: a Hugging Face repo id or a local directory.", rich_help_panel=MODEL)
DRAFTER = typer.Option(None, "--drafter", help="DFlash drafter: a repo id or a local directory.", rich_help_panel=MODEL)
YES = typer.Option(False, "--yes", "-y", help="Download missing models without asking.", rich_help_panel=MODEL)
BLOCK = typer.Option(None, "--block-size", "-b", min=1, help="Draft block size B (default: the drafter's).", rich_help_panel=MODEL)
NO_SPEC = typer.Option(False, "--no-spec", help="Plain autoregressive decoding (the baseline).", rich_help_panel=MODEL)
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL)
DTYPE = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32.", rich_help_panel=MODEL)
MAX_CONTEXT = typer.Option(None, "--max-context", min=2, help="Most tokens (prompt + answer) in the KV cache (default: what fits).", rich_help_panel=MODEL)
MAX_TOKENS = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens to generate per answer.")
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", help="0 is greedy.", rich_help_panel=SAMPLING)
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 disables).", rich_help_panel=SAMPLING)
TOP_K = typer.Option(0, "--top-k", help="Keep the k likeliest tokens (0 disables).", rich_help_panel=SAMPLING)
MIN_P = typer.Option(0.0, "--min-p", help="Drop tokens below min_p × the top probability.", rich_help_panel=SAMPLING)
SEED = typer.Option(None, "--seed", help="Sampling seed: the same seed gives the same answer, with or without speculation.", rich_help_panel=SAMPLING)
SYSTEM = typer.Option(None, "--system", "-s", help="System prompt.")
THINK = typer.Option(False, "--think", help="Qwen3 thinking mode (off by default: the drafters were trained without it).")


def _load(model, target, drafter, yes, no_spec, device, dtype, max_context):
    from . import loader
    from .resolve import resolve_model

    target_dir, drafter_dir = resolve_model(model, target, drafter, yes=yes, no_spec=no_spec)
    return loader.load(target_dir, drafter_dir, device=device, dtype=dtype, max_context=max_context)


def _engine(m, block_size):
    from .engine import Engine

    return Engine(m.target, m.drafter, block_size=block_size if m.drafter else None, max_context=m.max_context)


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
    model: Optional[str] = MODEL_ARG,
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from FILE ('-' for stdin); a .jsonl file runs one prompt per line."),
    target: Optional[str] = TARGET,
    drafter: Optional[str] = DRAFTER,
    yes: bool = YES,
    max_tokens: int = MAX_TOKENS,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    seed: Optional[int] = SEED,
    stop: List[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable).", rich_help_panel=SAMPLING),
    block_size: Optional[int] = BLOCK,
    no_spec: bool = NO_SPEC,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_context: Optional[int] = MAX_CONTEXT,
    system: Optional[str] = SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    think: bool = THINK,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per prompt (text, token ids, acceptance lengths).", rich_help_panel=OUTPUT),
    trace: bool = typer.Option(False, "--trace", help="With --json: every iteration's drafted tokens and how many were accepted.", rich_help_panel=OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Nothing on stderr but errors.", rich_help_panel=OUTPUT),
) -> None:
    """Answer a prompt: the answer streams to stdout, statistics go to stderr.

    \b
    Examples:
      dflash run qwen3-8b -p "Why is the sky blue?"
      cat question.txt | dflash run qwen3-8b > answer.txt
      dflash run qwen3-8b --prompt-file prompts.jsonl --json > results.jsonl
      dflash run --target ./Qwen3-8B --drafter ./Qwen3-8B-DFlash-b16 -p "2+2?" --json --trace
    """
    from .run import RunOptions, read_jsonl_prompts, run_jsonl, run_prompt
    from .sampling import SamplingParams

    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
    opts = RunOptions(max_tokens, sampling, tuple(stop), system, raw, think, json_out, trace, quiet)
    batch = text = None  # the input is read and checked before any model is loaded
    if prompt_file is not None and prompt_file.suffix == ".jsonl":
        if prompt is not None:
            raise UsageError("give either -p/--prompt or --prompt-file, not both")
        batch = read_jsonl_prompts(prompt_file)
    else:
        text = _read_prompt(prompt, prompt_file)
    m = _load(model, target, drafter, yes, no_spec, device, dtype, max_context)
    engine = _engine(m, block_size)
    seconds = engine.warm_up(sampling)  # CUDA graphs captured before any timing starts (CPU: None)
    if seconds is not None and not quiet:
        print(f"dflash: CUDA graphs captured in {seconds:.1f} s", file=sys.stderr)
    if batch is not None:
        run_jsonl(m, engine, batch, opts)
    else:
        run_prompt(m, engine, text, opts)


@app.command()
def chat(
    model: Optional[str] = MODEL_ARG,
    target: Optional[str] = TARGET,
    drafter: Optional[str] = DRAFTER,
    yes: bool = YES,
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    seed: Optional[int] = SEED,
    block_size: Optional[int] = BLOCK,
    no_spec: bool = NO_SPEC,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_context: Optional[int] = MAX_CONTEXT,
    system: Optional[str] = SYSTEM,
    think: bool = THINK,
    plain: bool = typer.Option(False, "--plain", help="Plain text: no Markdown rendering, no live status line.", rich_help_panel=OUTPUT),
    show_drafts: bool = typer.Option(False, "--show-drafts", help="Colour tokens by origin: accepted draft or the target's own.", rich_help_panel=OUTPUT),
    history: Optional[Path] = typer.Option(None, "--history", help="Input history file (default: ~/.local/share/dflash/history).", rich_help_panel=OUTPUT),
) -> None:
    """Chat in the terminal, with live speed and acceptance.

    \b
    Enter sends; Alt-Enter (or Esc then Enter) starts a new line. Ctrl-C stops an answer,
    Ctrl-D leaves. Type /help for commands (/system, /set, /think, /clear, /save, /load, /stats).
    """
    from .chat import ChatSession, run_chat
    from .sampling import SamplingParams

    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
    m = _load(model, target, drafter, yes, no_spec, device, dtype, max_context)
    session = ChatSession(m, _engine(m, block_size), sampling=sampling, max_tokens=max_tokens, system=system, think=think)
    run_chat(session, plain=plain, show_drafts=show_drafts, history=history)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="Model alias, or a shape name with --synthetic.", metavar="MODEL"),
    target: Optional[str] = TARGET,
    drafter: Optional[str] = DRAFTER,
    yes: bool = YES,
    synthetic: bool = typer.Option(False, "--synthetic", help="Random weights at MODEL's real shapes (qwen3-8b, qwen3-4b, llama3.1-8b, tiny): times each step, no download."),
    tau: Optional[float] = typer.Option(None, "--tau", help="With --synthetic: the acceptance length to project tok/s for (default: the published one)."),
    context: int = typer.Option(1024, "--context", min=1, help="With --synthetic: tokens already in the KV cache."),
    categories: Optional[str] = typer.Option(None, "--prompts", help="Built-in prompt sets to run, comma-separated: math, code, chat, story (default math,code,chat; story for `demo`)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Tokens per answer."),
    temperature: float = TEMPERATURE,
    block_size: Optional[int] = typer.Option(None, "--block-size", "-b", min=2, help="Draft block size B.", rich_help_panel=MODEL),
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_context: Optional[int] = MAX_CONTEXT,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables.", rich_help_panel=OUTPUT),
) -> None:
    """Measure: plain decoding and DFlash side by side on built-in math, code and chat prompts.

    \b
    Examples:
      dflash bench qwen3-8b
      dflash bench --synthetic qwen3-8b --tau 6.4      # check a GPU without downloading
    """
    import json

    from rich.console import Console

    from . import bench as bench_mod
    from . import loader
    from .sampling import SamplingParams

    console = Console()
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
    if categories is None:  # the demo's stories model has no chat template: it continues stories
        categories = "story" if (model or "").strip().lower() == "demo" else ",".join(bench_mod.DEFAULT_CATEGORIES)
    wanted = tuple(c.strip() for c in categories.split(",") if c.strip())
    unknown = [c for c in wanted if c not in bench_mod.CATEGORIES]
    if unknown or not wanted:
        raise UsageError(f"unknown prompt set '{(unknown or [categories])[0]}' (choose from {', '.join(bench_mod.CATEGORIES)})")
    m = _load(model, target, drafter, yes, False, device, dtype, max_context)
    if m.drafter is None:
        raise UsageError("bench compares against DFlash: give a drafter (--drafter or a model alias)")
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


TRAINING = "Training"


@app.command()
def train(
    target: Optional[str] = typer.Option(None, "--target", help="The target to draft for: a repo id, a directory, or `demo`.", rich_help_panel=MODEL),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the drafter (and its training state, for --resume)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts: .jsonl (strings or message lists) or text, one per line (default: a small built-in set)."),
    eval_prompts: Optional[Path] = typer.Option(None, "--eval-prompts", help="Held-out prompts for τ (default: the last tenth of --prompts, never trained on)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", "-b", help="Draft block size B (default 16).", rich_help_panel=MODEL),
    draft_layers: Optional[int] = typer.Option(None, "--draft-layers", help="Drafter layers (default 5).", rich_help_panel=MODEL),
    target_layer_ids: Optional[str] = typer.Option(None, "--target-layer-ids", help="Comma-separated target layers the drafter reads (default: spread over the depth, as released).", rich_help_panel=MODEL),
    mask_token_id: Optional[int] = typer.Option(None, "--mask-token-id", help="Token id of the mask (default: the tokenizer's mask, a padded or reserved row, or <unk>).", rich_help_panel=MODEL),
    steps: Optional[int] = typer.Option(None, "--steps", help="Train for N optimizer steps…", rich_help_panel=TRAINING),
    time_budget: Optional[str] = typer.Option(None, "--time", help="…or for this long: 90s, 15m, 1h30m (training only, not answer generation).", rich_help_panel=TRAINING),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint.", rich_help_panel=TRAINING),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 6e-4; warm-up 4%, cosine decay).", rich_help_panel=TRAINING),
    anchors: Optional[int] = typer.Option(None, "--anchors", help="Draft blocks per sequence per step (default 512).", rich_help_panel=TRAINING),
    batch: Optional[int] = typer.Option(None, "--batch", help="Sequences per step (default 4).", rich_help_panel=TRAINING),
    max_answer_tokens: Optional[int] = typer.Option(None, "--max-answer-tokens", help="Longest answer the target writes per prompt (default 1024).", rich_help_panel=TRAINING),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Temperature of the target's answers (default 0: greedy).", rich_help_panel=TRAINING),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Qwen3 thinking mode in the answers (default off): train in the mode you will chat in.", rich_help_panel=TRAINING),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initialisation, batches and anchors (default 0).", rich_help_panel=TRAINING),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (default: a tenth of the run).", rich_help_panel=TRAINING),
    eval_tokens: int = typer.Option(128, "--eval-tokens", min=1, help="Tokens per held-out prompt when measuring τ.", rich_help_panel=TRAINING),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute layer activations in the backward pass (less memory).", rich_help_panel=TRAINING),
    device: str = DEVICE,
    yes: bool = YES,
    json_out: bool = typer.Option(False, "--json", help="Print the final report as one JSON object.", rich_help_panel=OUTPUT),
) -> None:
    """Train a DFlash drafter for a target on its own answers; the result loads with --drafter.

    \b
    Examples:
      dflash train --target Qwen/Qwen3-4B --prompts prompts.jsonl --out qwen3-4b-dflash --time 2h
      dflash train --out qwen3-4b-dflash --resume
      dflash train --target demo --prompts stories.txt --block-size 8 --out demo-dflash --steps 2000
    """
    import json

    from rich.console import Console

    from .train.command import TrainRequest, render, run_train

    ids = None
    if target_layer_ids is not None:
        try:
            ids = [int(x) for x in target_layer_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--target-layer-ids {target_layer_ids!r}: give comma-separated layer numbers, e.g. 1,9,17") from None
    request = TrainRequest(
        target=target, out=out, prompts=prompts, eval_prompts=eval_prompts, block_size=block_size,
        draft_layers=draft_layers, target_layer_ids=ids, mask_token_id=mask_token_id, think=think,
        temperature=temperature, max_answer_tokens=max_answer_tokens, lr=lr, anchors=anchors, batch=batch,
        steps=steps, time=time_budget, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
        eval_tokens=eval_tokens, grad_checkpoint=grad_checkpoint, device=device, yes=yes,
    )
    report = run_train(request, Console(stderr=True, soft_wrap=True))
    if json_out:
        typer.echo(json.dumps(report))
    else:
        render(report, Console(soft_wrap=True))


@app.command()
def pull(model: str = typer.Argument(..., help="Model alias, or a Hugging Face repo id.", metavar="MODEL")) -> None:
    """Download a model pair (or one repo) into the Hugging Face cache; resumes where it stopped.

    Only safetensors, JSON configs and tokenizer files are fetched. Gated repos (Llama) need
    `hf auth login` or HF_TOKEN. Models already in the cache (from transformers, vLLM…) are reused.
    """
    from . import hub, registry

    if "/" in model:
        print(f"pulling {model}", file=sys.stderr)
        print(f"{model}: {hub.pull(model)}", file=sys.stderr)
        return
    pair = registry.resolve(model)
    print(f"pulling {pair.target} and {pair.drafter}", file=sys.stderr)
    for repo, path in zip((pair.target, pair.drafter), hub.pull_pair(pair)):  # one disk check for both
        print(f"{repo}: {path}", file=sys.stderr)


@app.command("models")
def models_cmd(json_out: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """List the released DFlash pairs: aliases, whether this version runs them, what is downloaded."""
    import json

    from .catalog import model_rows, render_models

    rows = model_rows()
    if json_out:
        typer.echo(json.dumps(rows))
    else:
        render_models(rows)


@app.command()
def rm(
    model: str = typer.Argument(..., help="Model alias, or a Hugging Face repo id.", metavar="MODEL"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    drafter_only: bool = typer.Option(False, "--drafter-only", help="Keep the target (it may be shared with other tools)."),
) -> None:
    """Delete a model pair (or one repo) from the Hugging Face cache."""
    from . import hub, registry
    from .resolve import ask, interactive

    if "/" in model:
        repos = [model]
    else:
        pair = registry.resolve(model)
        repos = [pair.drafter] if drafter_only else [pair.target, pair.drafter]
    present = [(r, hub.cached_size(r)) for r in repos]
    present = [(r, s) for r, s in present if s is not None]
    if not present:
        print(f"{model} is not in the cache ({hub.cache_dir()})", file=sys.stderr)
        return
    listing = ", ".join(f"{r} ({s / 1e9:.1f} GB)" for r, s in present)
    if not yes:
        if not interactive():
            raise UsageError(f"this would delete {listing}: pass --yes to confirm")
        if not ask(f"Delete {listing} from {hub.cache_dir()}?"):
            raise typer.Exit(1)
    for repo, _ in present:
        freed = hub.remove(repo)
        print(f"removed {repo} ({freed / 1e9:.1f} GB)", file=sys.stderr)


@app.command()
def doctor(model: Optional[str] = typer.Argument(None, help="Check the GPU memory this model needs.", metavar="MODEL")) -> None:
    """Check the setup: Python, torch, CUDA, Triton, GPU memory, the model cache and Hub login."""
    from .doctor import render_checks, run_checks

    checks = run_checks(model)
    render_checks(checks)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


@app.command()
def completions(shell: str = typer.Argument(..., help="bash, zsh or fish.", metavar="SHELL")) -> None:
    """Print a shell completion script.

    \b
    bash:  dflash completions bash > ~/.local/share/bash-completion/completions/dflash
    zsh:   dflash completions zsh > "${fpath[1]}/_dflash"
    fish:  dflash completions fish > ~/.config/fish/completions/dflash.fish
    """
    from .completion import SHELLS, render

    if shell not in SHELLS:
        raise UsageError(f"unknown shell '{shell}' (choose from {', '.join(SHELLS)})")
    typer.echo(render(shell), nl=False)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"dflash-cli {__version__}")
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Entry point: never a traceback for a user's mistake."""
    try:
        app(args=argv, standalone_mode=False, prog_name="dflash")
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
