"""`dflash run`: one prompt in, the answer on stdout, statistics on stderr (or one JSON object)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from .engine import Engine, Request
from .errors import UsageError
from .generate import Stats, stream_text
from .jsonl import read_jsonl, validate_messages
from .loader import Model
from .prompt import encode_chat, encode_raw
from .sampling import SamplingParams


@dataclass
class RunOptions:
    max_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    system: str | None = None
    raw: bool = False
    think: bool = False
    json: bool = False
    trace: bool = False
    quiet: bool = False


def read_jsonl_prompts(path: Path) -> list[str | list[dict]]:
    """Each line: a JSON string (one user message) or a list of {role, content} messages."""
    prompts = []
    for n, item in read_jsonl(path, UsageError, "--prompt-file "):
        if isinstance(item, list):
            item = validate_messages(item, f"{path}:{n}", UsageError)
        elif not isinstance(item, str):
            raise UsageError(f"{path}:{n}: expected a string or a list of messages, got {type(item).__name__}")
        prompts.append(item)
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def prompt_ids(model: Model, prompt: str | list[dict], opts: RunOptions) -> list[int]:
    if opts.raw:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return encode_raw(model.tokenizer, text)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if opts.system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": opts.system})
    return encode_chat(model.tokenizer, messages, enable_thinking=opts.think)


def run_jsonl(model: Model, engine: Engine, prompts: list[str | list[dict]], opts: RunOptions,
              out: TextIO | None = None) -> None:
    """One JSON result per prompt (see read_jsonl_prompts), in order, on stdout."""
    out = out or sys.stdout
    for prompt in prompts:
        run_prompt(model, engine, prompt, replace(opts, json=True), out=out)


def run_prompt(model: Model, engine: Engine, text: str | list[dict], opts: RunOptions,
               out: TextIO | None = None, err: TextIO | None = None) -> dict:
    out, err = out or sys.stdout, err or sys.stderr
    request = Request(prompt_ids(model, text, opts), opts.max_tokens, model.stop_token_ids, opts.sampling)
    stats, pieces, trace = Stats(), [], []
    for chunk in stream_text(engine, model.tokenizer, request, stats, opts.stop):
        pieces.append(chunk.text)
        if opts.trace and not chunk.step.prefill:
            trace.append({"drafted": chunk.step.drafts, "accepted": chunk.step.accepted, "emitted": chunk.step.tokens})
        if not opts.json and chunk.text:
            out.write(chunk.text)
            out.flush()
    result = {
        "text": "".join(pieces),
        "token_ids": stats.token_ids,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated,
        "finish_reason": stats.finish,
        "acceptance_lengths": stats.acceptance_lengths,
        "mean_acceptance_length": round(stats.mean_acceptance, 4),
        "tokens_per_second": round(stats.tokens_per_second, 3),
        "prefill_seconds": round(stats.prefill_seconds, 4),
        "decode_seconds": round(stats.decode_seconds, 4),
        "block_size": engine.block_size,
    }
    if opts.trace:
        result["trace"] = trace
    if opts.json:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        out.write("\n")
    out.flush()
    if not opts.quiet:
        err.write(stats.summary() + "\n")
    return result
