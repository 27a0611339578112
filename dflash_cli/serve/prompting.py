"""Requests to prompt token ids: the model's chat template (tools and thinking included), or raw text.

Rendered exactly as `dflash run` renders a chat (prompt.encode_chat), so that the same messages give
the same prompt, and so the same answer for the same seed. Runs on the engine's thread: the tokenizer
is used from one thread only.
"""
from __future__ import annotations

from ..errors import DflashError
from ..formats import ChatFormat
from ..prompt import ChatPrompt, encode_raw, render_chat
from .protocol import ApiError, bad

Prompt = ChatPrompt  # ids, keep_prefix, and the format that reads the answer


def chat_prompt(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, enable_thinking: bool = False,
                template_kwargs: dict | None = None, format: ChatFormat | None = None) -> Prompt:
    if tools and not getattr(tokenizer, "chat_template", None):
        raise bad("this model has no chat template, so it cannot be given tools", "tools")
    try:
        return render_chat(tokenizer, messages, tools=tools, enable_thinking=enable_thinking,
                           template_kwargs=template_kwargs, format=format)
    except DflashError as e:  # a Jinja error, or the template's own raise_exception on a message it refuses
        raise bad(str(e).replace("the model's chat template failed", "the model's chat template refused these "
                                 "messages"), "messages") from None


def completion_prompt(tokenizer, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(encode_raw(tokenizer, prompt))
    vocab = len(tokenizer)
    wrong = next((t for t in prompt if not 0 <= t < vocab), None)
    if wrong is not None:
        raise ApiError(400, f"prompt token id {wrong} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return Prompt(list(prompt))
