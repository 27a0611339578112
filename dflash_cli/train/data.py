"""Training data: the target's own answers to prompts, generated with dflash's engine and kept on
disk as token ids, so that an interrupted run resumes where it stopped.

The drafter must learn the target's distribution, not a dataset's: a drafter fitted to human
text drafts what a human would write next, and the target rejects it. So every answer is the
target's own (greedy by default, or sampled at the temperature the user will chat at), in the
chat template and thinking mode the user will chat in.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence as Seq

import torch

from ..engine import Engine, Request
from ..errors import UsageError
from ..jsonl import read_jsonl, validate_messages
from ..prompt import encode_chat
from ..sampling import SamplingParams
from .objective import Sequence

Prompt = str | list[dict]


def target_features(target, ids: torch.Tensor, layer_ids: Seq[int]) -> torch.Tensor:
    """The target's features of a whole sequence, [T, len(layer_ids)·H], without gradients: the
    outputs of decoder layers `layer_ids`, as the engine hands them to the drafter.

    The one place the trainer runs the target (a fresh cache per sequence, like a prefill)."""
    cache = target.new_cache(ids.shape[0])
    with torch.no_grad():  # commit: a prefill, so a hybrid target runs its recurrent state forward
        _, features = target.forward(ids.to(target.device), cache, feature_layers=layer_ids, commit=True)
    return features


def read_prompts(path: Path | None, flag: str = "--prompts") -> list[Prompt]:
    """Prompts from a file: .jsonl (each line a string, or a list of {role, content} messages, as
    `dflash run --prompt-file`), or text (one prompt per line). None: the built-in set. `flag`: the
    option that named the file, for the errors."""
    if path is None:
        return builtin_prompts()
    if path.suffix == ".jsonl":
        prompts: list[Prompt] = []
        for n, item in read_jsonl(path, UsageError, f"{flag} "):
            if isinstance(item, list):
                item = validate_messages(item, f"{path}:{n}", UsageError)
            elif not isinstance(item, str):
                raise UsageError(f"{path}:{n}: expected a string or a list of messages, got {type(item).__name__}")
            prompts.append(item)
    else:
        try:
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not prompts:
        raise UsageError(f"{flag} {path} holds no prompts")
    return prompts


def builtin_prompts() -> list[Prompt]:
    """A small fallback set (a few dozen chat prompts): enough to try the command, far too few for
    a drafter worth using. Real runs pass --prompts with thousands from the user's own domain."""
    return json.loads(resources.files("dflash_cli").joinpath("data/train_prompts.json").read_text())


def encode_prompt(tokenizer, prompt: Prompt, think: bool) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return encode_chat(tokenizer, messages, enable_thinking=think)


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0


def answer(engine: Engine, prompt_ids: list[int], stops: frozenset[int], gen: Generation, index: int) -> Sequence:
    """The target's answer to one prompt. A stop token ends it and is kept: the drafter should
    learn to draft the end of an answer too."""
    sampling = SamplingParams(temperature=gen.temperature, seed=gen.seed * 1_000_003 + index)
    out: list[int] = []
    for step in engine.generate(Request(prompt_ids, gen.max_new_tokens, frozenset(), sampling)):
        for token in step.tokens:
            out.append(token)
            if token in stops:
                return Sequence(prompt_ids + out, len(prompt_ids))
    return Sequence(prompt_ids + out, len(prompt_ids))


class AnswerStore:
    """Answers as JSON lines of token ids ({"i", "prompt_len", "ids"}), appended and flushed one by
    one: after an interruption the complete lines are kept and generation resumes after them."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[int, Sequence]:
        done: dict[int, Sequence] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[int(row["i"])] = Sequence([int(t) for t in row["ids"]], int(row["prompt_len"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut by an interruption: generated again
        return done

    def append(self, index: int, seq: Sequence) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"i": index, "prompt_len": seq.prompt_len, "ids": seq.ids}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def generate_answers(engine: Engine, prompts: list[list[int]], stops: frozenset[int], gen: Generation,
                     store: AnswerStore | None = None,
                     on_answer: Callable[[int, Sequence], None] | None = None) -> list[Sequence]:
    """Answers to every prompt, in order; those already in `store` are not generated again."""
    done = store.load() if store else {}
    for i, ids in enumerate(prompts):
        if i in done:
            continue
        seq = answer(engine, ids, stops, gen, i)
        if store:
            store.append(i, seq)
        done[i] = seq
        if on_answer:
            on_answer(i, seq)
    return [done[i] for i in range(len(prompts))]


def trainable(seqs: Iterable[Sequence]) -> list[Sequence]:
    """Sequences with at least one anchor and a token to predict after it."""
    return [s for s in seqs if len(s.ids) - max(s.prompt_len, 1) >= 2]
