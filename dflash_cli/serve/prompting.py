"""Requests to prompt token ids: the model's chat template (tools and thinking included), or raw text.

Rendered exactly as `dflash run` renders a chat (prompt.encode_chat), so that the same messages give
the same prompt, and so the same answer for the same seed. Runs on the engine's thread: the tokenizer
is used from one thread only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..prompt import encode_raw
from .protocol import ApiError, bad
from .reasoning import CLOSE, OPEN


@dataclass
class Prompt:
    ids: list[int]
    opens_think: bool = False  # the prompt ends inside <think> (Qwen3.5's template): the answer starts as reasoning


def chat_prompt(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, enable_thinking: bool = False,
                template_kwargs: dict | None = None) -> Prompt:
    if not getattr(tokenizer, "chat_template", None):
        if tools:
            raise bad("this model has no chat template, so it cannot be given tools", "tools")
        return Prompt(encode_raw(tokenizer, "\n".join(m["content"] for m in messages)))
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}), enable_thinking=enable_thinking)
    except Exception as e:  # a Jinja error, or the template's own raise_exception on a message it refuses
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise bad(f"the model's chat template refused these messages: {first}", "messages") from None
    # The template already spells out BOS and the role markers.
    return Prompt(tokenizer.encode(text, add_special_tokens=False), text.rfind(OPEN) > text.rfind(CLOSE))


def completion_prompt(tokenizer, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(encode_raw(tokenizer, prompt))
    vocab = len(tokenizer)
    wrong = next((t for t in prompt if not 0 <= t < vocab), None)
    if wrong is not None:
        raise ApiError(400, f"prompt token id {wrong} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return Prompt(list(prompt))
