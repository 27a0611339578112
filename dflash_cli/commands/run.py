"""`dflash run`: one prompt (or a JSONL batch) in, the answer on stdout, statistics on stderr."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from ..errors import UsageError
from .options import (MAX_TOKENS, MODEL_OPTIONS, OUTPUT, QUANTIZE, REASONING_OPTIONS, SAMPLING, SAMPLING_OPTIONS,
                      SYSTEM, note, with_groups)

if TYPE_CHECKING:
    from ..api import ModelOptions
    from ..formats import Reasoning
    from ..sampling import SamplingParams


@with_groups
def run(
    model: ModelOptions = MODEL_OPTIONS,
    quantize: Optional[str] = QUANTIZE,
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", metavar="TEXT", help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-' for stdin); a .jsonl file runs one prompt per line."),
    max_tokens: int = MAX_TOKENS,
    sampling: SamplingParams = SAMPLING_OPTIONS,
    stop: List[str] = typer.Option([], "--stop", metavar="TEXT", help="Stop when this text appears (repeatable).", rich_help_panel=SAMPLING),
    system: Optional[str] = SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    reasoning: Reasoning = REASONING_OPTIONS,
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
      dflash run qwen3.6-27b --quantize int4 -p "Hi"   # a 27B on a 24 GB card
    """
    from .. import precision
    from ..api import open_session, resolve
    from ..run import (RunOptions, check_length, encode_batch, is_jsonl, prompt_ids, read_jsonl_prompts, run_jsonl,
                       run_prompt, template_notes)

    if trace and not json_out:
        raise UsageError("--trace goes with --json (it adds every iteration to the JSON result)")
    opts = RunOptions(max_tokens=max_tokens, sampling=sampling, stop=tuple(stop), system=system, raw=raw,
                      think=reasoning.think, reasoning_effort=reasoning.effort, json=json_out, trace=trace, quiet=quiet)
    batch = text = None  # the input is read and checked before any model is loaded
    if prompt_file is not None and is_jsonl(prompt_file):
        if prompt is not None:
            raise UsageError("give either -p/--prompt or --prompt-file, not both")
        batch = read_jsonl_prompts(prompt_file)
    else:
        text = read_prompt(prompt, prompt_file)
    model = precision.apply(model, quantize, lambda line: note(line, quiet))
    dirs = resolve(model)
    if model.target is not None and model.drafter is None and not model.no_spec:
        note("no --drafter: plain decoding, without speculation", quiet)
    pair = open_session(model, dirs)
    m, engine = pair.model, pair.engine
    for line in template_notes(m, opts):
        note(line, quiet)
    if batch is not None:
        encoded = encode_batch(m, engine, prompt_file, batch, opts)  # every line checked before the first answer
    else:
        ids = prompt_ids(m, text, opts)
        check_length(ids.ids, engine)
    seconds = pair.warm_up(sampling)  # graphs captured, block-size costs measured, before any timing starts
    if seconds is not None and engine.graphs.enabled:
        note(f"CUDA graphs captured in {seconds:.1f} s", quiet)
    if batch is not None:
        run_jsonl(m, engine, encoded, opts)
    else:
        run_prompt(m, engine, ids, opts)


def _decode_input(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark from a Windows editor is not prompt text
    except UnicodeDecodeError as e:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return text.replace("\r\n", "\n")  # Windows line ends: the same prompt as typed with -p


def _read_stdin() -> str:
    """All of stdin, decoded strictly: undecodable bytes are a clear error, not a tokenizer crash."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already text (an embedding program's stream)
        return sys.stdin.read().replace("\r\n", "\n")
    return _decode_input(buffer.read(), "stdin")


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
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
