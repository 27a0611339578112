"""Text streaming on top of the engine, and the statistics every front end shows.

`stream_text` turns committed tokens into final text (see detok.py) and ends the generation at a
stop string; `Stats` accumulates what the status line, the summary and `--json` report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .adaptive import Decision, position_rates
from .engine import Engine, Request, Step
from .formats import AnswerDelta, ChatPrompt
from .harmony import ToolCall


@dataclass
class Stats:
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    acceptance_lengths: list[int] = field(default_factory=list)  # τ per speculative/decode iteration
    block_sizes: list[int] = field(default_factory=list)  # b per iteration (1: plain decoding)
    tree_budgets: list[int] = field(default_factory=list)  # the verified tree's nodes per iteration (0: the chain)
    decision: Decision | None = None  # why the last iteration had its block size
    finish: str | None = None

    def add(self, step: Step) -> None:
        self.token_ids += step.tokens
        if step.prefill:
            self.prefill_seconds += step.seconds
        else:
            self.decode_seconds += step.seconds
            self.acceptance_lengths.append(step.acceptance_length)
            self.block_sizes.append(step.block_size)
            self.tree_budgets.append(step.tree_budget)
            self.decision = step.decision or self.decision
        self.finish = step.finish or self.finish

    def position_acceptance(self) -> list[float | None]:
        """Acceptance of draft i given drafts 1..i-1 were accepted, i = 1 .. largest b - 1 (None: never
        reached)."""
        return position_rates(self.block_sizes, self.acceptance_lengths, max(self.block_sizes, default=1) - 1)

    @property
    def generated(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time after prefill (as DFlash reports)."""
        return (self.generated - 1) / self.decode_seconds if self.decode_seconds > 0 and self.generated > 1 else 0.0

    @property
    def end_to_end_tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.generated / total if total > 0 else 0.0

    @property
    def mean_acceptance(self) -> float:
        taus = self.acceptance_lengths
        return sum(taus) / len(taus) if taus else 0.0

    def summary(self) -> str:
        line = (f"{self.generated} tokens · {self.tokens_per_second:.1f} tok/s · τ {self.mean_acceptance:.2f} · "
                f"prompt {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s")
        return line + (f" · stopped: {self.finish}" if self.finish in ("length", "interrupted", "tool_call") else "")


@dataclass
class Chunk:
    text: str  # newly final content of the answer (may be empty)
    step: Step
    draft_chars: int = 0  # with split_drafts: how much of `text` came from accepted drafts (it comes first)
    reasoning: str = ""  # newly final reasoning (`<think>` text without the tags, harmony's analysis): before `text`
    tool_call: ToolCall | None = None  # the tool call the answer ended with (harmony; finish "tool_call")


def stream_text(engine: Engine, tokenizer, request: Request, stats: Stats, stop_strings: tuple[str, ...] = (),
                split_drafts: bool = False, prompt: ChatPrompt | None = None) -> Iterator[Chunk]:
    """Generate, yielding final text per step; `stats` is updated before each yield.

    The answer is read by the format of `prompt` (the rendered prompt; None: plain text): its
    parser splits reasoning, content and a tool call (formats/). With `split_drafts`, the step's
    accepted-draft tokens are decoded before the target's own token, so a UI can show which text
    the drafter wrote. At a stop string the text ends where it begins, and so do `stats.token_ids`
    and the step's tokens: no token that wrote part of it is kept."""
    parser = (prompt or ChatPrompt(request.prompt_ids)).parser(tokenizer, stop_strings)
    stats.prompt_tokens = len(request.prompt_ids)
    steps = engine.generate(request)
    try:
        for step in steps:
            drafted = min(step.accepted, len(step.tokens)) if split_drafts and not step.prefill else 0
            delta = parser.push(step.tokens[:drafted]) if drafted else AnswerDelta()
            draft_text = delta.text
            delta += parser.push(step.tokens[drafted:])
            if parser.stopped:
                step.finish = "stop"
                keep = parser.tokens_kept()
                step.tokens = step.tokens[:max(0, keep - stats.generated)]
                delta += parser.finish("stop")
                stats.add(step)
                del stats.token_ids[keep:]  # tokens of earlier steps that were held back as a possible stop
            else:
                if step.finish is not None:
                    delta += parser.finish(step.finish)
                    step.finish = "tool_call" if delta.tool_call is not None else step.finish
                stats.add(step)
            draft_chars = len(draft_text) if delta.content == delta.text else 0  # coloured in plain answers only
            yield Chunk(delta.content, step, draft_chars, delta.reasoning, delta.tool_call)
            if step.finish is not None:
                return
    finally:
        steps.close()
