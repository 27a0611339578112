"""The `dflash` command: parses flags, calls the library, prints. Errors the user can fix are one
line on stderr and a non-zero exit (1 runtime, 2 usage, 130 Ctrl-C); tracebacks are for bugs."""
from __future__ import annotations

import errno
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from . import __version__
from .errors import DflashError, Interrupted, UsageError

# Recent typer vendors its own click; older typer uses click itself. Catch both families.
_EXIT = (typer.Exit, click.exceptions.Exit)
_ABORT = (typer.Abort, click.exceptions.Abort)
_PARSER_ERRORS = (typer.TyperException, click.ClickException)
HELP_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="dflash",
    help="Lossless speculative decoding (DFlash) for local LLM chat: the same tokens, several times faster.\n\n"
         "Start with `dflash chat qwen3-8b`; `dflash models` lists what can run.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_NAMES},
)

SAMPLING = "Sampling"
MODEL = "Model"
OUTPUT = "Output"
SERVER = "Server"
ENGINE = "Hand-off to SGLang / vLLM"

# Options shared by run, chat and bench (typer reads the same declaration for each command).
MODEL_ARG = typer.Argument(None, help="Model alias (see `dflash models`); or use --target/--drafter.",
                           metavar="MODEL")
TARGET = typer.Option(None, "--target", metavar="ID|DIR", help="Target: a Hugging Face repo id or a local directory.", rich_help_panel=MODEL)
DRAFTER = typer.Option(None, "--drafter", metavar="ID|DIR", help="DFlash drafter: a repo id or a local directory.", rich_help_panel=MODEL)
YES = typer.Option(False, "--yes", "-y", help="Download missing models without asking.", rich_help_panel=MODEL)
BLOCK = typer.Option("auto", "--block-size", "-b", metavar="auto|B", help="Draft block size: auto picks it per iteration from measured costs and live acceptance (1 when drafting does not pay); B pins it.", rich_help_panel=MODEL)
DRAFT_WINDOW = typer.Option(None, "--draft-window", min=1, metavar="TOKENS", help="The drafter attends to at most this many recent tokens (bounds its cost at long context; the answer is the same).", rich_help_panel=MODEL)
NO_SPEC = typer.Option(False, "--no-spec", help="Plain autoregressive decoding (the baseline).", rich_help_panel=MODEL)
DEVICE = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL)
DTYPE = typer.Option("auto", "--dtype", metavar="DTYPE", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32.", rich_help_panel=MODEL)
MAX_CONTEXT = typer.Option(None, "--max-context", min=2, metavar="TOKENS", help="Most tokens (prompt + answer) in the KV cache (default: what fits).", rich_help_panel=MODEL)
MAX_TOKENS = typer.Option(512, "--max-tokens", "-n", min=1, metavar="N", help="Most tokens to generate per answer.")
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", metavar="T", help="0 is greedy.", rich_help_panel=SAMPLING)
TOP_P = typer.Option(1.0, "--top-p", metavar="P", help="Nucleus sampling mass (1 disables).", rich_help_panel=SAMPLING)
TOP_K = typer.Option(0, "--top-k", metavar="K", help="Keep the k likeliest tokens (0 disables).", rich_help_panel=SAMPLING)
MIN_P = typer.Option(0.0, "--min-p", metavar="P", help="Drop tokens below min_p × the top probability.", rich_help_panel=SAMPLING)
SEED = typer.Option(None, "--seed", metavar="INT", help="Sampling seed: the same seed gives the same answer, with or without speculation.", rich_help_panel=SAMPLING)
SYSTEM = typer.Option(None, "--system", "-s", metavar="TEXT", help="System prompt.")
THINK = typer.Option(None, "--think/--no-think", help="Thinking mode (default: as the drafter was trained: off for the Qwen3 b16 pairs, on for Qwen3.5/3.6; gpt-oss: --think is high reasoning effort, --no-think low).")
EFFORT = typer.Option(None, "--reasoning-effort", metavar="LEVEL", help="low, medium or high: gpt-oss's reasoning (medium by default), or any chat template that reads reasoning_effort.")


def _effort(effort: Optional[str]) -> Optional[str]:
    """--reasoning-effort, checked (what --think means for gpt-oss is harmony.template_effort's)."""
    from .harmony import EFFORTS

    if effort is not None and effort not in EFFORTS:
        raise UsageError(f"--reasoning-effort must be one of {', '.join(EFFORTS)}, got '{effort}'")
    return effort


def _resolve(model, target, drafter, yes, no_spec) -> tuple[Path, Optional[Path]]:
    from .resolve import resolve_model

    return resolve_model(model, target, drafter, yes=yes, no_spec=no_spec)


def _load(target_dir: Path, drafter_dir: Optional[Path], device: str, dtype: str, max_context: Optional[int]):
    from . import loader

    return loader.load(target_dir, drafter_dir, device=device, dtype=dtype, max_context=max_context)


def parse_block_size(text: str) -> Optional[int]:
    """`--block-size auto` (None: chosen per iteration) or a pinned B >= 1."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--block-size must be auto or a whole number, got '{text}'") from None
    if value < 1:
        raise UsageError(f"--block-size must be auto or at least 1, got {value}")
    return value


def _check_block_size(drafter_dir: Optional[Path], block_size: Optional[int], least: int = 1) -> None:
    """-b against the drafter's config.json, before any weight is read (None: auto, always fits)."""
    if block_size is None or drafter_dir is None:
        return
    import warnings

    from .config import DrafterConfig

    with warnings.catch_warnings():  # the loader reads the config again and says what it has to say
        warnings.simplefilter("ignore")
        limit = DrafterConfig.from_dir(drafter_dir).block_size
    if block_size > limit:
        raise UsageError(f"--block-size must be between {least} and the drafter's {limit}, got {block_size}")


def _engine(m, block_size: Optional[int], draft_window: Optional[int] = None):
    """block_size None: adaptive up to the drafter's B; a number pins it."""
    from .engine import Engine

    return Engine(m.target, m.drafter, block_size=block_size if m.drafter else None, max_context=m.max_context,
                  adaptive=block_size is None, draft_window=draft_window)


def _note(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"dflash: {text}", file=sys.stderr)


def _decode_input(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark from a Windows editor is not prompt text
    except UnicodeDecodeError as e:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _read_stdin() -> str:
    """All of stdin, decoded strictly: undecodable bytes are a clear error, not a tokenizer crash."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already text (an embedding program's stream)
        return sys.stdin.read()
    return _decode_input(buffer.read(), "stdin")


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """-p as given; a file or stdin without its final newline (editors and `echo` add one)."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("give either -p/--prompt or --prompt-file, not both")
    if prompt is not None:
        text, where = prompt, "-p"
    elif prompt_file is not None and str(prompt_file) == "-":
        text, where = _read_stdin().removesuffix("\n"), "stdin"
    elif prompt_file is not None:
        try:
            data = prompt_file.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
        text, where = _decode_input(data, f"--prompt-file {prompt_file}").removesuffix("\n"), f"--prompt-file {prompt_file}"
    elif sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: give -p TEXT, --prompt-file FILE, or pipe text on stdin")
    else:
        text, where = _read_stdin().removesuffix("\n"), "stdin"
    if not text.strip():
        raise UsageError(f"the prompt is empty ({where} gave no text)")
    return text


@app.command()
def run(
    model: Optional[str] = MODEL_ARG,
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", metavar="TEXT", help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-' for stdin); a .jsonl file runs one prompt per line."),
    target: Optional[str] = TARGET,
    drafter: Optional[str] = DRAFTER,
    yes: bool = YES,
    max_tokens: int = MAX_TOKENS,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    seed: Optional[int] = SEED,
    stop: List[str] = typer.Option([], "--stop", metavar="TEXT", help="Stop when this text appears (repeatable).", rich_help_panel=SAMPLING),
    block_size: str = BLOCK,
    draft_window: Optional[int] = DRAFT_WINDOW,
    no_spec: bool = NO_SPEC,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_context: Optional[int] = MAX_CONTEXT,
    system: Optional[str] = SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    think: Optional[bool] = THINK,
    reasoning_effort: Optional[str] = EFFORT,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per prompt (text, reasoning, token ids, acceptance lengths).", rich_help_panel=OUTPUT),
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
    from dataclasses import replace

    from .run import (RunOptions, check_length, encode_batch, is_jsonl, prompt_ids, read_jsonl_prompts, run_jsonl,
                      run_prompt, template_notes)
    from .sampling import SamplingParams

    if trace and not json_out:
        raise UsageError("--trace goes with --json (it adds every iteration to the JSON result)")
    block = parse_block_size(block_size)
    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
    opts = RunOptions(max_tokens, sampling, tuple(stop), system, raw, think, _effort(reasoning_effort), json_out,
                      trace, quiet)
    batch = text = None  # the input is read and checked before any model is loaded
    if prompt_file is not None and is_jsonl(prompt_file):
        if prompt is not None:
            raise UsageError("give either -p/--prompt or --prompt-file, not both")
        batch = read_jsonl_prompts(prompt_file)
    else:
        text = _read_prompt(prompt, prompt_file)
    target_dir, drafter_dir = _resolve(model, target, drafter, yes, no_spec)
    _check_block_size(drafter_dir, block)
    if target is not None and drafter is None and not no_spec:
        _note("no --drafter: plain decoding, without speculation", quiet)
    m = _load(target_dir, drafter_dir, device, dtype, max_context)
    engine = _engine(m, block, draft_window)
    for note in template_notes(m, opts):
        _note(note, quiet)
    opts = replace(opts, think=m.thinks if think is None else think)  # the model's default when not asked
    if batch is not None:
        encoded = encode_batch(m, engine, prompt_file, batch, opts)  # every line checked before the first answer
    else:
        ids = prompt_ids(m, text, opts)
        check_length(ids.ids, engine)
    seconds = engine.warm_up(sampling)  # graphs captured, block-size costs measured, before any timing starts
    if seconds is not None and engine.graphs.enabled:
        _note(f"CUDA graphs captured in {seconds:.1f} s", quiet)
    if batch is not None:
        run_jsonl(m, engine, encoded, opts)
    else:
        run_prompt(m, engine, ids, opts)


@app.command()
def chat(
    model: Optional[str] = MODEL_ARG,
    target: Optional[str] = TARGET,
    drafter: Optional[str] = DRAFTER,
    yes: bool = YES,
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", min=1, metavar="N", help="Most tokens per answer."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    min_p: float = MIN_P,
    seed: Optional[int] = SEED,
    block_size: str = BLOCK,
    draft_window: Optional[int] = DRAFT_WINDOW,
    no_spec: bool = NO_SPEC,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_context: Optional[int] = MAX_CONTEXT,
    system: Optional[str] = SYSTEM,
    think: Optional[bool] = THINK,
    reasoning_effort: Optional[str] = EFFORT,
    plain: bool = typer.Option(False, "--plain", help="Plain text: no Markdown rendering, no live status line.", rich_help_panel=OUTPUT),
    show_drafts: bool = typer.Option(False, "--show-drafts", help="Colour tokens by origin: accepted draft or the target's own.", rich_help_panel=OUTPUT),
    history: Optional[Path] = typer.Option(None, "--history", metavar="FILE", help="Input history file (default: ~/.local/share/dflash/history).", rich_help_panel=OUTPUT),
) -> None:
    """Chat in the terminal, with live speed and acceptance.

    \b
    Enter sends; Alt-Enter (or Esc then Enter) starts a new line. Ctrl-C stops an answer,
    Ctrl-D leaves. Type /help for commands (/system, /set, /think, /clear, /save, /load, /stats).
    """
    from .chat import ChatSession, run_chat
    from .harmony import template_effort
    from .sampling import SamplingParams

    block = parse_block_size(block_size)
    sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
    effort = _effort(reasoning_effort)  # checked before anything loads
    target_dir, drafter_dir = _resolve(model, target, drafter, yes, no_spec)
    _check_block_size(drafter_dir, block)
    m = _load(target_dir, drafter_dir, device, dtype, max_context)
    effort = template_effort(effort, think, m.harmony is not None)
    session = ChatSession(m, _engine(m, block, draft_window), sampling=sampling, max_tokens=max_tokens, system=system,
                          think=m.thinks if think is None else think, reasoning_effort=effort)
    run_chat(session, plain=plain, show_drafts=show_drafts, history=history)


@app.command()
def serve(
    model: Optional[str] = MODEL_ARG,
    target: Optional[str] = TARGET,
    drafter: Optional[str] = DRAFTER,
    yes: bool = YES,
    host: str = typer.Option("127.0.0.1", "--host", metavar="HOST", help="Address to listen on; anything but loopback needs --api-key or --no-auth.", rich_help_panel=SERVER),
    port: int = typer.Option(8000, "--port", metavar="PORT", min=0, max=65535, help="Port (0 picks a free one; the URL printed says which).", rich_help_panel=SERVER),
    api_key: Optional[str] = typer.Option(None, "--api-key", metavar="KEY", envvar="DFLASH_API_KEY", show_envvar=True, help="Require Authorization: Bearer KEY.", rich_help_panel=SERVER),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve a non-loopback --host without a key (prints a warning).", rich_help_panel=SERVER),
    cors_origin: List[str] = typer.Option([], "--cors-origin", metavar="ORIGIN", help="Allow browser pages from this origin (repeatable; none by default).", rich_help_panel=SERVER),
    max_queue: int = typer.Option(16, "--max-queue", metavar="N", min=0, help="Requests that may wait behind the running one; more get 503.", rich_help_panel=SERVER),
    timeout: float = typer.Option(600.0, "--timeout", metavar="SECONDS", min=1, help="Seconds a request may take, queueing included.", rich_help_panel=SERVER),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", metavar="MIB", help="Largest request body, in MiB.", rich_help_panel=SERVER),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Thinking when a request does not say (default: what the drafter was trained with)."),
    reasoning_effort: Optional[str] = typer.Option(None, "--reasoning-effort", metavar="LEVEL", help="gpt-oss: low, medium or high when a request does not say."),
    block_size: str = BLOCK,
    draft_window: Optional[int] = DRAFT_WINDOW,
    no_spec: bool = NO_SPEC,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_context: Optional[int] = MAX_CONTEXT,
    engine: Optional[str] = typer.Option(None, "--engine", metavar="ENGINE", help="Hand the pair to sglang or vllm (several GPUs) instead of serving it here.", rich_help_panel=ENGINE),
    tp: Optional[int] = typer.Option(None, "--tp", metavar="GPUS", min=1, help="With --engine: GPUs for tensor parallelism (default: the pair's suggestion).", rich_help_panel=ENGINE),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --engine: print the command instead of running it.", rich_help_panel=ENGINE),
) -> None:
    """Serve a model over an OpenAI-compatible API (chat, completions, streaming, tools, reasoning).

    \b
    Examples:
      dflash serve qwen3-8b                            # http://127.0.0.1:8000/v1
      dflash serve qwen3-8b --host 0.0.0.0 --api-key "$KEY"
      dflash serve --engine vllm qwen3.5-122b-a10b --tp 4 --dry-run
    """
    from .serve.launch import ServeFlags
    from .serve.launch import serve as serve_flags

    serve_flags(ServeFlags(model, target, drafter, yes, host, port, api_key, no_auth, tuple(cors_origin), max_queue,
                           timeout, max_body_mb, think, parse_block_size(block_size), no_spec, device, dtype,
                           max_context, engine, tp, dry_run, draft_window, _effort(reasoning_effort)))


@app.command()
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
    device: str = DEVICE,
    dtype: str = DTYPE,
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
    """
    import json

    from rich.console import Console

    from . import bench as bench_mod
    from . import loader
    from .sampling import SamplingParams

    if tau is not None and not (math.isfinite(tau) and tau >= 1):  # one iteration commits at least one token
        raise UsageError(f"--tau must be a number of at least 1 (tokens per iteration), got {tau}")
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
    target_dir, drafter_dir = _resolve(model, target, drafter, yes, False)
    if drafter_dir is None:
        raise UsageError("bench compares against DFlash: give a drafter (--drafter or a model alias)")
    _check_block_size(drafter_dir, block_size, least=2)
    m = _load(target_dir, drafter_dir, device, dtype, max_context)
    progress = Console(stderr=True, highlight=False, soft_wrap=True)
    report = bench_mod.run_bench(
        m, bench_mod.builtin_prompts(wanted), max_tokens=max_tokens, block_size=block_size,
        sampling=SamplingParams(temperature=temperature, seed=0), repeats=repeats,
        on_row=lambda r: progress.print(bench_mod.progress_line(r, block_size or m.drafter.cfg.block_size), style="dim"),
    )
    if json_out:
        typer.echo(json.dumps(report.to_json()))
    else:
        bench_mod.render(report, console)


TRAINING = "Training"


@app.command()
def train(
    target: Optional[str] = typer.Option(None, "--target", metavar="ID|DIR", help="The target to draft for: a repo id, a directory, or `demo`.", rich_help_panel=MODEL),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Directory for the drafter (and its training state, for --resume)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", metavar="FILE", help="Prompts: .jsonl (strings or message lists) or text, one per line (default: a small built-in set)."),
    eval_prompts: Optional[Path] = typer.Option(None, "--eval-prompts", metavar="FILE", help="Held-out prompts for τ (default: the last tenth of --prompts, never trained on)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", "-b", metavar="B", help="Draft block size B (default 16).", rich_help_panel=MODEL),
    draft_layers: Optional[int] = typer.Option(None, "--draft-layers", metavar="N", help="Drafter layers (default 5).", rich_help_panel=MODEL),
    target_layer_ids: Optional[str] = typer.Option(None, "--target-layer-ids", metavar="IDS", help="Comma-separated target layers the drafter reads (default: spread over the depth, as released).", rich_help_panel=MODEL),
    mask_token_id: Optional[int] = typer.Option(None, "--mask-token-id", metavar="ID", help="Token id of the mask (default: the tokenizer's mask, a padded or reserved row, or the unknown token).", rich_help_panel=MODEL),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", help="Train for N optimizer steps…", rich_help_panel=TRAINING),
    time_budget: Optional[str] = typer.Option(None, "--time", metavar="DURATION", help="…or for this long: 90s, 15m, 1h30m (training only, not answer generation).", rich_help_panel=TRAINING),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint.", rich_help_panel=TRAINING),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="LR", help="Peak learning rate (default 6e-4; warm-up 4%, cosine decay).", rich_help_panel=TRAINING),
    anchors: Optional[int] = typer.Option(None, "--anchors", metavar="N", help="Draft blocks per sequence per step (default 512).", rich_help_panel=TRAINING),
    batch: Optional[int] = typer.Option(None, "--batch", metavar="N", help="Sequences per step (default 4).", rich_help_panel=TRAINING),
    max_answer_tokens: Optional[int] = typer.Option(None, "--max-answer-tokens", metavar="N", help="Longest answer the target writes per prompt (default 1024).", rich_help_panel=TRAINING),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", metavar="T", help="Temperature of the target's answers (default 0: greedy).", rich_help_panel=TRAINING),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Qwen3 thinking mode in the answers (default off): train in the mode you will chat in.", rich_help_panel=TRAINING),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="INT", help="Seed of the initialisation, batches and anchors (default 0).", rich_help_panel=TRAINING),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", metavar="N", help="Steps between checkpoints (default: a tenth of the run).", rich_help_panel=TRAINING),
    eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens", min=1, metavar="N", help="Tokens per held-out prompt when measuring τ (default 128).", rich_help_panel=TRAINING),
    grad_checkpoint: Optional[bool] = typer.Option(None, "--grad-checkpoint/--no-grad-checkpoint", help="Recompute layer activations in the backward pass (less memory; default off). --resume keeps this, --checkpoint-every, --eval-tokens and --device unless given again.", rich_help_panel=TRAINING),
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
        hub.check_repo_id(model)
        print(f"pulling {model}", file=sys.stderr)
        print(f"{model}: {hub.pull(model)}", file=sys.stderr)
        return
    pair = registry.resolve(model)
    if not pair.supported:
        _note(f"this version cannot run {pair.alias} yet ({pair.note}); downloading it anyway")
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
        hub.check_repo_id(model)
        repos = [model]
    else:
        pair = registry.resolve(model)
        repos = [pair.drafter] if drafter_only else [pair.target, pair.drafter]
    present = [(r, hub.cached_size(r)) for r in repos]
    present = [(r, s) for r, s in present if s is not None]
    if not present:
        print(f"{model} is not in the cache ({hub.cache_dir()})", file=sys.stderr)
        return
    listing = ", ".join(f"{r} ({hub.format_size(s)})" for r, s in present)
    if not yes:
        if not interactive():
            raise UsageError(f"this would delete {listing}: pass --yes to confirm")
        if not ask(f"Delete {listing} from {hub.cache_dir()}?"):
            raise typer.Exit(1)
    for repo, _ in present:
        freed = hub.remove(repo)
        print(f"removed {repo} ({hub.format_size(freed)})", file=sys.stderr)


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
    bash:  mkdir -p ~/.local/share/bash-completion/completions
           dflash completions bash > ~/.local/share/bash-completion/completions/dflash
    zsh:   mkdir -p ~/.zfunc && dflash completions zsh > ~/.zfunc/_dflash
           then, in ~/.zshrc before `compinit`:  fpath=(~/.zfunc $fpath)
    fish:  mkdir -p ~/.config/fish/completions
           dflash completions fish > ~/.config/fish/completions/dflash.fish
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


def command() -> typer.core.TyperGroup:
    """The click command behind `app`, with help that shows no type placeholders (`<bool>`,
    `<str>`): flags and arguments show none, value options their metavar."""
    group = typer.main.get_command(app)
    for cmd in (group, *getattr(group, "commands", {}).values()):
        ctx = cmd.context_class(cmd, info_name=cmd.name, help_option_names=HELP_NAMES)
        for param in (*cmd.params, cmd.get_help_option(ctx)):
            if param is not None and (param.param_type_name == "argument" or getattr(param, "is_flag", False)):
                param.display_type_rich = lambda ctx: None
    return group


def main(argv: list[str] | None = None) -> int:
    """Entry point: the documented exit code (0 ok, 1 runtime error, 2 usage, 130 Ctrl-C; 0 when
    the reader of stdout leaves early), and never a traceback for a user's mistake.

    The command runs outside typer's own `main`, which would turn Ctrl-C into a *returned* 130,
    a closed pipe into exit 1, and hide both from this function."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cmd = command()
        with cmd.make_context("dflash", args) as ctx:
            cmd.invoke(ctx)
        return 0
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        print("", file=sys.stderr)
        return 130
    except _PARSER_ERRORS as e:  # usage errors from the parser: exit 2
        e.show()
        return e.exit_code
    except DflashError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted:  # the partial answer and its statistics are out already
        return 130
    except KeyboardInterrupt:
        print("", file=sys.stderr)  # the shell's prompt must not land on the "^C" line
        return 130
    except BrokenPipeError:
        # `dflash run ... | head`: the reader left; say nothing, and keep Python's final flush quiet.
        _silence_stdout()
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # `dflash run ... > /dev/full`: stdout is the only file a command writes without its own check.
        _silence_stdout()
        print(f"Error: cannot write the output: {e.strerror}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still buffered
    does not fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
