"""Harmony, gpt-oss's chat format: the answer is a sequence of messages, split by token id.

After the generation prompt `<|start|>assistant` the model writes, e.g.
    <|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…<|return|>
or ends with a tool call:
    <|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{…}<|call|>
A header (role, `to=` recipient, channel) runs from `<|start|>` (or the answer's first token) to
`<|message|>`; the content from there to `<|end|>` (another message follows), `<|return|>` (done) or
`<|call|>` (a tool call, done). The special tokens are recognised by their ids, looked up in the
tokenizer (never hard-coded), never by their text: a message may spell "<|channel|>" in plain text.

Channels: analysis is reasoning; final, and commentary without a recipient (a preamble meant for the
user), are the answer; a message to a recipient is a tool call. openai-harmony does the same but
downloads its vocabulary at run time, so this small state machine stands in for it. The chat format
that renders and reads harmony for the front ends is formats/harmony.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .detok import StreamDecoder

REASONING, ANSWER, TOOL = "reasoning", "answer", "tool"
_RECIPIENT = re.compile(r"\bto=(\S+)")


@dataclass(frozen=True)
class HarmonyTokens:
    start: int
    end: int
    message: int
    channel: int
    return_: int
    call: int
    endoftext: int
    constrain: int | None = None

    NAMES = {"start": "<|start|>", "end": "<|end|>", "message": "<|message|>", "channel": "<|channel|>",
             "return_": "<|return|>", "call": "<|call|>", "endoftext": "<|endoftext|>"}

    @classmethod
    def of(cls, tokenizer) -> "HarmonyTokens | None":
        """The ids of harmony's special tokens in `tokenizer`, or None when it is not a harmony tokenizer."""
        names = [*cls.NAMES.values(), "<|constrain|>"]
        ids = tokenizer.convert_tokens_to_ids(names)  # a token it lacks: None, or the unknown token's id
        unknown = getattr(tokenizer, "unk_token_id", None)
        found = {n: i for n, i in zip(names, ids) if i is not None and i != unknown}
        if not all(token in found for token in cls.NAMES.values()):
            return None
        return cls(**{name: found[token] for name, token in cls.NAMES.items()}, constrain=found.get("<|constrain|>"))

    @property
    def stops(self) -> frozenset[int]:
        """Where an answer ends: never <|end|>, which only ends one message of it."""
        return frozenset((self.return_, self.call, self.endoftext))


@dataclass
class ToolCall:
    name: str  # the function's name: "get_weather" for a message "to=functions.get_weather"
    arguments: str  # the message's text, as written (JSON for a `json` constraint)


class HarmonyParser:
    """Generated ids → (kind, position in the ids fed, id) of every content token, kind REASONING, ANSWER
    or TOOL. Starts inside the header of the first message (the prompt ends with `<|start|>assistant`);
    after a terminal token (<|return|>, <|call|>, <|endoftext|>) it takes nothing more."""

    def __init__(self, tokens: HarmonyTokens, decode: Callable[[list[int]], str]):
        self.tokens, self._decode = tokens, decode
        self._header: list[int] = []
        self.in_header = True
        self.kind: str | None = None  # of the message being read
        self.recipient: str | None = None
        self.ended_by: int | None = None  # the terminal token, once seen
        self.messages = 0  # headers read so far

    def feed(self, ids: Iterable[int]) -> list[tuple[str, int, int]]:
        t, out = self.tokens, []
        for pos, i in enumerate(ids):
            if self.ended_by is not None:
                break
            if i in t.stops:
                self.ended_by = i
            elif self.in_header:
                if i == t.message:
                    self._open()
                elif i == t.start:  # a new header (the previous one was never opened)
                    self._header = []
                else:
                    self._header.append(i)
            elif i in (t.end, t.start):  # the message is over (a missing <|end|> before <|start|> too)
                self.in_header, self._header, self.kind = True, [], None
            else:
                out.append((self.kind, pos, i))
        return out

    def _open(self) -> None:
        """Read the finished header: its channel and recipient decide what the content is."""
        t, header = self.tokens, self._header
        cut = header.index(t.channel) if t.channel in header else len(header)
        role = self._decode(header[:cut])
        channel_ids = header[cut + 1:]
        if t.constrain is not None and t.constrain in channel_ids:  # "<|constrain|>json": a format, not the channel
            channel_ids = channel_ids[:channel_ids.index(t.constrain)]
        channel_text = self._decode(channel_ids)
        channel = (channel_text.split() or [""])[0]
        found = _RECIPIENT.search(role) or _RECIPIENT.search(channel_text)
        self.recipient = found.group(1) if found else None
        if self.recipient is not None:
            self.kind = TOOL
        else:
            self.kind = REASONING if channel == "analysis" else ANSWER
        self.in_header, self._header, self.messages = False, [], self.messages + 1


@dataclass
class HarmonyText:
    """Generated ids → the reasoning and answer text that is final, each through its own streaming
    decoder (a character split across tokens never crosses channels); stop strings apply to the answer."""

    tokenizer: object
    tokens: HarmonyTokens
    stop_strings: tuple[str, ...] = ()
    generated: int = 0  # tokens pushed so far
    _answer_at: list[int] = field(default_factory=list)  # the position of each answer token among them
    _tool_ids: list[int] = field(default_factory=list)  # the content of the last tool message
    _tool_message: int = 0

    def __post_init__(self):
        self.parser = HarmonyParser(self.tokens, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
        self._reasoning = StreamDecoder(self.tokenizer)
        self._answer = StreamDecoder(self.tokenizer, self.stop_strings)

    @property
    def stopped(self) -> bool:
        """A stop string appeared in the answer."""
        return self._answer.stopped

    def push(self, ids: list[int]) -> tuple[str, str]:
        """Add generated tokens; return the (reasoning, answer) text now final."""
        reasoning, answer = [], []
        start, self.generated = self.generated, self.generated + len(ids)
        for kind, pos, i in self.parser.feed(ids):
            if kind == REASONING:
                reasoning.append(self._reasoning.push([i]))
            elif kind == ANSWER:
                self._answer_at.append(start + pos)
                answer.append(self._answer.push([i]))
            else:
                if self._tool_message != self.parser.messages:  # a new tool message: its own arguments
                    self._tool_ids, self._tool_message = [], self.parser.messages
                self._tool_ids.append(i)
        return "".join(reasoning), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """End of generation: what the decoders still hold back is final."""
        return self._reasoning.flush(), self._answer.flush()

    def tokens_kept(self) -> int:
        """After a stop string in the answer: how many generated tokens to keep (up to the last answer
        token written wholly before the stop string)."""
        kept = self._answer.tokens_in_text()
        return self._answer_at[kept] if kept < len(self._answer_at) else self.generated

    def tool_call(self, finished_by_stop: bool) -> ToolCall | None:
        """The tool call the answer ended with: a message to a recipient that a stop token closed
        (the engine cuts <|call|> before the parser sees it; a length cut leaves no call)."""
        p = self.parser
        closed = p.ended_by == self.tokens.call or (finished_by_stop and p.ended_by is None)
        if p.kind != TOOL or p.in_header or not closed:
            return None
        name = p.recipient.removeprefix("functions.")
        return ToolCall(name, self.tokenizer.decode(self._tool_ids, skip_special_tokens=True))
