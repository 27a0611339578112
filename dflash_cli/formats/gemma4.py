"""Gemma 4's chat format: turns `<|turn>role … <turn|>`; with thinking on, the template puts `<|think|>`
in the system turn and the answer opens a thought channel, `<|channel>thought\\n … <channel|>`, before
the reply; a tool call is `<|tool_call>call:NAME{key:value,…}<tool_call|>`, its strings between `<|"|>`
marks (numbers, booleans, lists and objects bare). Those markers are special tokens, which decoding
drops: the answer is split by token id, as harmony's is, and each part decoded on its own."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..detok import StreamDecoder
from ..harmony import ToolCall
from .base import AnswerDelta, ChatPrompt, apply_template

THOUGHT = "thought"  # the channel's name, written after <|channel>
QUOTE = '<|"|>'


@dataclass(frozen=True)
class Gemma4Tokens:
    channel: int  # <|channel>
    channel_end: int  # <channel|>
    call: int  # <|tool_call>
    call_end: int  # <tool_call|>
    quote: int  # <|"|>

    NAMES = {"channel": "<|channel>", "channel_end": "<channel|>", "call": "<|tool_call>", "call_end": "<tool_call|>",
             "quote": QUOTE}

    @classmethod
    def of(cls, tokenizer) -> "Gemma4Tokens | None":
        """The markers' ids in `tokenizer`, or None when it is not a Gemma 4 tokenizer."""
        ids = tokenizer.convert_tokens_to_ids(list(cls.NAMES.values()))
        unknown = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or i == unknown for i in ids):
            return None
        return cls(*ids)


def call_arguments(text: str) -> str:
    """A call's `{…}` body as Gemma writes it (bare keys, `<|"|>`-quoted strings) as JSON text; the text as
    written where it does not parse."""
    out, stack, i, key_next = [], ["{"], 0, True
    while i < len(text):
        if text.startswith(QUOTE, i):
            end = text.find(QUOTE, i + len(QUOTE))
            end = len(text) if end < 0 else end
            out.append(json.dumps(text[i + len(QUOTE):end]))
            i, key_next = end + len(QUOTE), False
            continue
        ch = text[i]
        if key_next and (ch.isalnum() or ch == "_"):
            end = text.find(":", i)
            if end < 0:
                return text
            out.append(json.dumps(text[i:end].strip()) + ":")
            i, key_next = end + 1, False
            continue
        if ch in "[{":
            stack.append(ch)
        elif ch in "]}" and len(stack) > 1:
            stack.pop()
        out.append(ch)
        key_next = ch in "{," and stack[-1] == "{"
        i += 1
    try:
        return json.dumps(json.loads("{" + "".join(out) + "}"))
    except ValueError:
        return text


class Gemma4Answer:
    """Answer ids → reasoning (the thought channel), reply and a tool call, by the markers' ids."""

    def __init__(self, tokenizer, tokens: Gemma4Tokens, prompt: ChatPrompt, stop_strings: tuple[str, ...] = ()):
        self.tokens, self.tokenizer = tokens, tokenizer
        self._reply = StreamDecoder(tokenizer, stop_strings, context=prompt.ids[-1:])
        self._thought: StreamDecoder | None = None
        self._thought_head = ""  # the channel's name, until its line ends
        self._call: list[int] | None = None  # ids of the call being written
        self.calls: list[ToolCall] = []
        self._state = "thought" if prompt.opens_think else "reply"
        if self._state == "thought":
            self._open_thought()
        self._reply_at: list[int] = []  # position of each reply token among the answer's ids
        self._pushed = 0

    @property
    def stopped(self) -> bool:
        return self._reply.stopped

    def _open_thought(self) -> None:
        self._thought, self._thought_head = StreamDecoder(self.tokenizer), ""

    def push(self, token_ids: list[int]) -> AnswerDelta:
        delta = AnswerDelta()
        for t in token_ids:
            delta += self._one(t)
            self._pushed += 1
        return delta

    def _one(self, t: int) -> AnswerDelta:
        k = self.tokens
        if self._call is not None:
            if t == k.call_end:
                self._end_call()
            else:
                self._call.append(t)
            return AnswerDelta()
        if t == k.call:
            self._call = []
            return AnswerDelta()
        if t == k.channel:
            self._state = "thought"
            self._open_thought()
            return AnswerDelta()
        if t == k.channel_end and self._state == "thought":
            self._state = "reply"
            return AnswerDelta(self._thought_text(self._thought.flush()))
        if self._state == "thought":
            return AnswerDelta(self._thought_text(self._thought.push([t])))
        self._reply_at.append(self._pushed)
        text = self._reply.push([t])
        return AnswerDelta(content=text, text=text)

    def _thought_text(self, text: str) -> str:
        """The thought's text without the channel's name line (`thought\\n`) that opens it."""
        if self._thought_head is None:
            return text
        self._thought_head += text
        head = self._thought_head.lstrip()
        if len(head) < len(THOUGHT) + 1 and THOUGHT.startswith(head.rstrip("\n")) and "\n" not in head:
            return ""  # could still be the name
        self._thought_head = None
        return head[len(THOUGHT):].lstrip("\n") if head.startswith(THOUGHT) else head

    def _end_call(self) -> None:
        text = self.tokenizer.decode(self._call, skip_special_tokens=False)
        self._call = None
        if not text.startswith("call:") or "{" not in text:
            return
        name, _, body = text[len("call:"):].partition("{")
        self.calls.append(ToolCall(name.strip(), call_arguments(body[:-1] if body.endswith("}") else body)))

    def finish(self, reason: str) -> AnswerDelta:
        if self._reply.stopped:
            return AnswerDelta()
        delta = AnswerDelta()
        if self._state == "thought" and self._thought is not None:
            delta += AnswerDelta(self._thought_text(self._thought.flush()))
        text = self._reply.flush()
        return delta + AnswerDelta(content=text, tool_call=self.calls[0] if self.calls else None, text=text)

    def tokens_kept(self) -> int:
        if not self._reply.stopped:
            return self._pushed
        n = self._reply.tokens_in_text()
        return self._reply_at[n - 1] + 1 if n else (self._reply_at[0] if self._reply_at else self._pushed)


class Gemma4:
    name = "gemma4"
    think_by_effort = False

    def __init__(self, tokens: Gemma4Tokens):
        self.tokens = tokens

    def render(self, tokenizer, messages: list[dict], *, thinking: bool = False, tools: list[dict] | None = None,
               template_kwargs: dict | None = None) -> ChatPrompt:
        text, ids, keep = apply_template(tokenizer, messages, thinking=thinking, tools=tools,
                                         template_kwargs=template_kwargs)
        opens = text.rfind("<|channel>") > text.rfind("<channel|>")
        return ChatPrompt(ids, keep, self, opens_think=opens, thinking=thinking)

    def parser(self, tokenizer, prompt: ChatPrompt, stop_strings: tuple[str, ...] = ()) -> Gemma4Answer:
        return Gemma4Answer(tokenizer, self.tokens, prompt, stop_strings)

    def template_effort(self, effort: str | None, think: bool | None) -> str | None:
        return effort
