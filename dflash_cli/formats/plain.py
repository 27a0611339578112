"""Plain text: no chat template (or `--raw`), the answer is all content."""
from __future__ import annotations

from ..detok import StreamDecoder
from ..reasoning import ThinkSplitter
from .base import AnswerDelta, ChatPrompt, encode_raw


class TextAnswer:
    """Answer ids → final text through one streaming decoder (stop strings cut it), split into
    reasoning and content by `splitter` when there is one (think tags)."""

    def __init__(self, tokenizer, prompt: ChatPrompt, stop_strings: tuple[str, ...] = (),
                 splitter: ThinkSplitter | None = None):
        self._decoder = StreamDecoder(tokenizer, stop_strings, context=prompt.ids[-1:])
        self._splitter = splitter

    @property
    def stopped(self) -> bool:
        return self._decoder.stopped

    def push(self, token_ids: list[int]) -> AnswerDelta:
        return self._split(self._decoder.push(token_ids))

    def finish(self, reason: str) -> AnswerDelta:
        delta = self._split("" if self._decoder.stopped else self._decoder.flush())
        if self._splitter is not None:
            reasoning, content = self._splitter.finish()
            delta += AnswerDelta(reasoning, content)
        return delta

    def tokens_kept(self) -> int:
        return self._decoder.tokens_in_text()

    def _split(self, text: str) -> AnswerDelta:
        if self._splitter is None:
            return AnswerDelta(content=text, text=text)
        reasoning, content = self._splitter.feed(text)
        return AnswerDelta(reasoning, content, text=text)


class Plain:
    name = "plain"
    think_by_effort = False

    def render(self, tokenizer, messages: list[dict], *, thinking: bool = False, tools: list[dict] | None = None,
               template_kwargs: dict | None = None) -> ChatPrompt:
        """No template: the messages' text, one per line, as a raw prompt."""
        return ChatPrompt(encode_raw(tokenizer, "\n".join(m["content"] for m in messages)), format=self)

    def parser(self, tokenizer, prompt: ChatPrompt, stop_strings: tuple[str, ...] = ()) -> TextAnswer:
        return TextAnswer(tokenizer, prompt, stop_strings)

    def template_effort(self, effort: str | None, think: bool | None) -> str | None:
        return effort


PLAIN = Plain()
