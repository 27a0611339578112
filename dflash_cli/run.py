"""`dflash run`: one prompt in, the answer on stdout, statistics on stderr (or one JSON object).

A batch (a JSONL prompt file) is checked whole before anything is generated: every line's JSON,
then, once the tokenizer is loaded, every prompt's chat template and length; an error names the
line. Ctrl-C ends the answer being written as a complete one: its text and a newline, or its JSON
object marked "interrupted", then the statistics; the command then exits 130.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from .engine import Engine, Request, prompt_too_long
from .errors import DflashError, Interrupted, UsageError
from .generate import Stats, stream_text
from .formats import Reasoning
from .jsonl import read_jsonl, validate_messages
from .loader import Model
from .prompt import ChatPrompt, Prompt, render_prompt
from .sampling import SamplingParams


@dataclass
class RunOptions:
    max_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    system: str | None = None
    raw: bool = False
    think: bool | None = None  # --think/--no-think; None: the pair's default (loader.Model.thinking)
    reasoning_effort: str | None = None  # low, medium or high, for a template that reads it; None: its default
    json: bool = False
    trace: bool = False
    quiet: bool = False


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def read_jsonl_prompts(path: Path) -> list[tuple[int, Prompt]]:
    """(line number, prompt) for each line: a JSON string (one user message) or a list of
    {role, content} messages."""
    prompts = []
    for n, item in read_jsonl(path, UsageError, "--prompt-file "):
        if isinstance(item, list):
            if not item:
                raise UsageError(f"{path}:{n}: the message list is empty")
            item = validate_messages(item, f"{path}:{n}", UsageError)
        elif not isinstance(item, str):
            raise UsageError(f"{path}:{n}: expected a string or a list of messages, got {type(item).__name__}")
        elif not item.strip():
            raise UsageError(f"{path}:{n}: the prompt is empty")
        prompts.append((n, item))
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def prompt_ids(model: Model, prompt: Prompt, opts: RunOptions) -> ChatPrompt:
    reasoning = Reasoning(opts.think, opts.reasoning_effort)
    return render_prompt(model.tokenizer, prompt, format=model.format, system=opts.system, raw=opts.raw,
                         enable_thinking=reasoning.enable_thinking(model.thinking),
                         template_kwargs=reasoning.template_kwargs(model.format))


def check_length(ids: list[int], engine: Engine) -> None:
    """The engine's own check, made before a batch starts rather than halfway through it."""
    if len(ids) >= engine.max_context:
        raise prompt_too_long(len(ids), engine.max_context, engine.target.cfg.max_position_embeddings)


def encode_batch(model: Model, engine: Engine, path: Path, prompts: list[tuple[int, Prompt]],
                 opts: RunOptions) -> list[ChatPrompt]:
    """Every prompt's token ids, or the first problem, named by its line."""
    batch = []
    for n, prompt in prompts:
        try:
            ids = prompt_ids(model, prompt, opts)
            check_length(ids.ids, engine)
        except DflashError as e:
            raise type(e)(f"{path}:{n}: {e}") from None
        batch.append(ids)
    return batch


def template_notes(model: Model, opts: RunOptions) -> list[str]:
    """What --system and --think will not do with this model and these flags, said once."""
    template = getattr(model.tokenizer, "chat_template", None) or ""
    notes = []
    if opts.reasoning_effort and (opts.raw or "reasoning_effort" not in template):
        notes.append("--reasoning-effort has no effect: " + ("--raw sends no chat template" if opts.raw
                                                              else "this model's chat template does not read it"))
    if opts.raw:
        notes += [f"{flag} has no effect with --raw" for flag, on in (("--system", opts.system), ("--think", opts.think)) if on]
    elif not template:
        if opts.system:
            notes.append("this model has no chat template: --system is put before the prompt as plain text")
        if opts.think:
            notes.append("--think has no effect: this model has no chat template")
    elif opts.think and "enable_thinking" not in template and not model.format.think_by_effort:
        notes.append("--think has no effect: this model's chat template has no thinking mode")
    return notes


def run_jsonl(model: Model, engine: Engine, batch: list[ChatPrompt], opts: RunOptions,
              out: TextIO | None = None, err: TextIO | None = None) -> None:
    """One JSON result per prompt, in order, on stdout."""
    for ids in batch:
        run_prompt(model, engine, ids, replace(opts, json=True), out=out, err=err)


def run_prompt(model: Model, engine: Engine, prompt: ChatPrompt, opts: RunOptions,
               out: TextIO | None = None, err: TextIO | None = None) -> dict:
    """Generate the answer to `prompt`, streaming its text to `out` (or writing one JSON object at the
    end); reasoning (`<think>`) streams to `err` unless quiet, and is the JSON's "reasoning". Raises
    `Interrupted` after writing what was generated when Ctrl-C stops it."""
    out, err = out or sys.stdout, err or sys.stderr
    ids = prompt.ids
    request = Request(ids, opts.max_tokens, model.stop_token_ids, opts.sampling, keep_prefix=prompt.keep_prefix)
    stats, pieces, reasoning, trace = Stats(), [], [], []
    interrupted, tool_call = False, None
    try:
        with contextlib.closing(stream_text(engine, model.tokenizer, request, stats, opts.stop,
                                            prompt=prompt)) as chunks:
            for chunk in chunks:
                pieces.append(chunk.text)
                reasoning.append(chunk.reasoning)
                if chunk.reasoning and not opts.json and not opts.quiet:
                    err.write(chunk.reasoning)
                    err.flush()
                if opts.trace and not chunk.step.prefill:
                    trace.append({"block_size": chunk.step.block_size, "drafted": chunk.step.drafts,
                                  "accepted": chunk.step.accepted, "emitted": chunk.step.tokens})
                if not opts.json and chunk.text:
                    out.write(chunk.text)
                    out.flush()
                tool_call = chunk.tool_call or tool_call
    except KeyboardInterrupt:
        interrupted = True
        stats.finish = "interrupted"
    if "".join(reasoning) and not opts.json and not opts.quiet:
        err.write("\n")  # the reasoning ends on its own line, before the statistics
    if tool_call is not None and not opts.json and not opts.quiet:
        err.write(f"dflash: the answer ends in a call to tool '{tool_call.name}' with {tool_call.arguments} "
                  "(dflash run has no tools)\n")
    result = {
        "text": "".join(pieces),
        "reasoning": "".join(reasoning),
        "token_ids": stats.token_ids,
        "prompt_tokens": len(ids),
        "generated_tokens": stats.generated,
        "finish_reason": stats.finish,
        "acceptance_lengths": stats.acceptance_lengths,
        "mean_acceptance_length": round(stats.mean_acceptance, 4),
        "block_sizes": stats.block_sizes,
        "position_acceptance": [None if r is None else round(r, 4) for r in stats.position_acceptance()],
        "tokens_per_second": round(stats.tokens_per_second, 3),
        "end_to_end_tokens_per_second": round(stats.end_to_end_tokens_per_second, 3),
        "prefill_seconds": round(stats.prefill_seconds, 4),
        "decode_seconds": round(stats.decode_seconds, 4),
        "block_size": engine.block_size,
        "adaptive": engine.adaptive,
        "tree_budget": engine.tree_setting,
        "tree_budgets": stats.tree_budgets,
    }
    if tool_call is not None:
        result["tool_call"] = {"name": tool_call.name, "arguments": tool_call.arguments}
    if opts.trace:
        result["trace"] = trace
    out.write(json.dumps(result, ensure_ascii=False) + "\n" if opts.json else "\n")
    out.flush()
    if not opts.quiet:
        stats.prompt_tokens = len(ids)
        err.write(stats.summary() + "\n")
    if interrupted:
        raise Interrupted
    return result
