"""Turn what the user typed into prompt token ids: the model's chat template, or raw text.

The chat format (formats/) does the rendering; this module is what the front ends call.
"""
from __future__ import annotations

from .formats import ChatFormat, ChatPrompt, detect, encode_raw

__all__ = ["ChatPrompt", "Prompt", "encode_chat", "encode_raw", "render_chat", "render_prompt"]

Prompt = str | list[dict]  # a user message, or a whole conversation


def render_chat(tokenizer, messages: list[dict], *, enable_thinking: bool = False, tools: list[dict] | None = None,
                template_kwargs: dict | None = None, format: ChatFormat | None = None) -> ChatPrompt:
    """Apply the checkpoint's chat template (through its format: `format`, or the tokenizer's own).
    A tokenizer without a template gets the messages' text, raw."""
    fmt = format or detect(tokenizer)
    return fmt.render(tokenizer, messages, thinking=enable_thinking, tools=tools, template_kwargs=template_kwargs)


def encode_chat(tokenizer, messages: list[dict], *, enable_thinking: bool = False) -> list[int]:
    return render_chat(tokenizer, messages, enable_thinking=enable_thinking).ids


def render_prompt(tokenizer, prompt: Prompt, *, format: ChatFormat | None = None, system: str | None = None,
                  raw: bool = False, enable_thinking: bool = False, template_kwargs: dict | None = None) -> ChatPrompt:
    """A user message or a conversation, as `dflash run` and the Python API send it: `raw` sends the
    text without the template; `system` is put first unless the conversation has its own."""
    if raw:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return ChatPrompt(encode_raw(tokenizer, text))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return render_chat(tokenizer, messages, enable_thinking=enable_thinking, template_kwargs=template_kwargs,
                       format=format)
