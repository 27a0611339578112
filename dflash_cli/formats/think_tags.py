"""Qwen-style chat templates: reasoning between `<think>` and `</think>` (reasoning.py splits it),
including the template that opens `<think>` itself (Qwen3.5: the answer starts as reasoning).
Any checkpoint with a chat template and no harmony tokens reads this way: with thinking off, or an
answer that does not open `<think>`, all of it is content."""
from __future__ import annotations

from ..reasoning import CLOSE, OPEN, ThinkSplitter
from .base import ChatPrompt, apply_template
from .plain import PLAIN, TextAnswer


class ThinkTags:
    name = "think_tags"
    think_by_effort = False

    def render(self, tokenizer, messages: list[dict], *, thinking: bool = False, tools: list[dict] | None = None,
               template_kwargs: dict | None = None) -> ChatPrompt:
        if not getattr(tokenizer, "chat_template", None):
            return PLAIN.render(tokenizer, messages)
        text, ids, keep = apply_template(tokenizer, messages, thinking=thinking, tools=tools,
                                         template_kwargs=template_kwargs)
        opens = text.rfind(OPEN) > text.rfind(CLOSE)
        return ChatPrompt(ids, keep, self, opens_think=opens, thinking=thinking)

    def parser(self, tokenizer, prompt: ChatPrompt, stop_strings: tuple[str, ...] = ()) -> TextAnswer:
        mode = "open" if prompt.opens_think else "auto" if prompt.thinking else "off"
        return TextAnswer(tokenizer, prompt, stop_strings, ThinkSplitter(mode) if mode != "off" else None)

    def template_effort(self, effort: str | None, think: bool | None) -> str | None:
        return effort  # any template that reads reasoning_effort gets it; thinking is enable_thinking


THINK_TAGS = ThinkTags()
