"""Harmony, gpt-oss's chat format: the answer is messages split by token id (../harmony.py), the
analysis channel is reasoning, a message to a recipient is a tool call. gpt-oss always reasons:
`--think`/`--no-think` choose its reasoning effort (high, low); without them the template's (medium)."""
from __future__ import annotations

from ..harmony import HarmonyText, HarmonyTokens
from .base import AnswerDelta, ChatPrompt, apply_template


class HarmonyAnswer:
    def __init__(self, tokenizer, tokens: HarmonyTokens, stop_strings: tuple[str, ...] = ()):
        self._text = HarmonyText(tokenizer, tokens, stop_strings)

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    def push(self, token_ids: list[int]) -> AnswerDelta:
        reasoning, content = self._text.push(token_ids)
        return AnswerDelta(reasoning, content)

    def finish(self, reason: str) -> AnswerDelta:
        if self._text.stopped:  # a stop string in the answer: it ends there, with no call
            return AnswerDelta()
        reasoning, content = self._text.flush()
        return AnswerDelta(reasoning, content, self._text.tool_call(finished_by_stop=reason == "stop"))

    def tokens_kept(self) -> int:
        return self._text.tokens_kept()


class Harmony:
    name = "harmony"
    think_by_effort = True

    def __init__(self, tokens: HarmonyTokens):
        self.tokens = tokens

    def render(self, tokenizer, messages: list[dict], *, thinking: bool = False, tools: list[dict] | None = None,
               template_kwargs: dict | None = None) -> ChatPrompt:
        _, ids, keep = apply_template(tokenizer, messages, thinking=thinking, tools=tools,
                                      template_kwargs=template_kwargs)
        return ChatPrompt(ids, keep, self, thinking=True)

    def parser(self, tokenizer, prompt: ChatPrompt, stop_strings: tuple[str, ...] = ()) -> HarmonyAnswer:
        return HarmonyAnswer(tokenizer, self.tokens, stop_strings)

    def template_effort(self, effort: str | None, think: bool | None) -> str | None:
        """`--reasoning-effort` as given, else `--think` high and `--no-think` low (harmony has no
        "off"), else None (the template's default, medium)."""
        if effort is not None:
            return effort
        return None if think is None else ("high" if think else "low")
