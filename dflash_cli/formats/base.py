"""What every chat format shares: the rendered prompt, the answer's pieces, and the two protocols.

A `ChatFormat` renders a conversation into prompt ids (through the checkpoint's own chat template)
and makes the `AnswerParser` that turns the answer's token ids into reasoning, content and a tool
call. Every front end (run, chat, serve, the Python API, train's data) goes through these two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import DflashError
from ..harmony import ToolCall


@dataclass
class ChatPrompt:
    ids: list[int]
    # Tokens of `ids` the next turn's prompt will share: the conversation before this turn's generation
    # prompt. A target whose state cannot roll back (a hybrid) keeps a snapshot there.
    keep_prefix: int | None = None
    format: "ChatFormat | None" = None  # how the answer reads (None: plain text, as for --raw)
    opens_think: bool = False  # the prompt ends inside <think> (Qwen3.5's template): the answer starts as reasoning
    thinking: bool = False  # rendered with thinking on: an answer that opens <think> is reasoning

    def parser(self, tokenizer, stop_strings: tuple[str, ...] = ()) -> "AnswerParser":
        from .plain import PLAIN

        return (self.format or PLAIN).parser(tokenizer, self, stop_strings)


@dataclass
class AnswerDelta:
    """What became final in the answer: reasoning, then content; a tool call the answer ended with.
    `text` is the answer as decoded before the format split it (plain and think tags: the two
    front ends that colour drafted text compare it with `content`)."""

    reasoning: str = ""
    content: str = ""
    tool_call: ToolCall | None = None
    text: str = ""

    def __add__(self, other: "AnswerDelta") -> "AnswerDelta":
        return AnswerDelta(self.reasoning + other.reasoning, self.content + other.content,
                           other.tool_call or self.tool_call, self.text + other.text)


class AnswerParser(Protocol):
    stopped: bool  # a stop string appeared: the answer ends where it begins

    def push(self, token_ids: list[int]) -> AnswerDelta: ...

    def finish(self, reason: str) -> AnswerDelta:
        """The answer ended (`reason`: the engine's finish, or "stop" at a stop string): what was held back."""

    def tokens_kept(self) -> int:
        """After a stop string: how many generated tokens wrote the answer before it."""


class ChatFormat(Protocol):
    name: str
    think_by_effort: bool  # thinking is the reasoning effort (harmony: --think high, --no-think low)

    def render(self, tokenizer, messages: list[dict], *, thinking: bool = False, tools: list[dict] | None = None,
               template_kwargs: dict | None = None) -> ChatPrompt: ...

    def parser(self, tokenizer, prompt: ChatPrompt, stop_strings: tuple[str, ...] = ()) -> AnswerParser: ...

    def template_effort(self, effort: str | None, think: bool | None) -> str | None:
        """The template's reasoning_effort for `--reasoning-effort` and an explicit `--think/--no-think`."""


def apply_template(tokenizer, messages: list[dict], *, thinking: bool, tools: list[dict] | None,
                   template_kwargs: dict | None) -> tuple[str, list[int], int | None]:
    """(text, ids, keep_prefix) of the checkpoint's chat template with the generation prompt."""
    kwargs = dict(tools=tools, tokenize=False, **(template_kwargs or {}), enable_thinking=thinking)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    except Exception as e:  # a Jinja error in a third-party template, or its own raise_exception
        raise DflashError(f"the model's chat template failed: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    # The template already spells out BOS and the role markers.
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    keep = None
    if text.startswith(head):
        head_ids = tokenizer.encode(head, add_special_tokens=False, verbose=False)
        keep = len(head_ids) if ids[:len(head_ids)] == head_ids else None
    return text, ids, keep


def encode_raw(tokenizer, text: str) -> list[int]:
    # verbose=False: a prompt over the model's length is our one-line error, not transformers' warning
    return tokenizer.encode(text, add_special_tokens=True, verbose=False)
