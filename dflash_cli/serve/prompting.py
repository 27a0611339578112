"""Requests to prompt token ids: the model's chat template (tools and thinking included), or raw text.

Rendered exactly as `dflash run` renders a chat (prompt.encode_chat), so that the same messages give
the same prompt, and so the same answer for the same seed. Runs on the engine's thread: the tokenizer
is used from one thread only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DflashError
from ..prompt import encode_raw, render_chat
from .protocol import ApiError, bad


@dataclass
class Prompt:
    ids: list[int]
    opens_think: bool = False  # the prompt ends inside <think> (Qwen3.5's template): the answer starts as reasoning
    keep_prefix: int | None = None  # what the next turn will share (see prompt.ChatPrompt)
    harmony: bool = False  # gpt-oss: the answer is harmony messages, split by token id


def chat_prompt(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, enable_thinking: bool = False,
                template_kwargs: dict | None = None) -> Prompt:
    if tools and not getattr(tokenizer, "chat_template", None):
        raise bad("this model has no chat template, so it cannot be given tools", "tools")
    try:
        p = render_chat(tokenizer, messages, tools=tools, enable_thinking=enable_thinking,
                        template_kwargs=template_kwargs)
    except DflashError as e:  # a Jinja error, or the template's own raise_exception on a message it refuses
        raise bad(str(e).replace("the model's chat template failed", "the model's chat template refused these "
                                 "messages"), "messages") from None
    return Prompt(p.ids, p.think == "open", p.keep_prefix, p.think == "harmony")


def completion_prompt(tokenizer, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(encode_raw(tokenizer, prompt))
    vocab = len(tokenizer)
    wrong = next((t for t in prompt if not 0 <= t < vocab), None)
    if wrong is not None:
        raise ApiError(400, f"prompt token id {wrong} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return Prompt(list(prompt))
