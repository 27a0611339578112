"""Streaming detokenisation and stop strings.

Text is released only once it is final: a multi-byte character split across tokens waits for its
last byte (no U+FFFD flicker), and text that could be the start of a stop string waits until it is
known not to be one.

Tokens are decoded after the prompt's last token (`context`): SentencePiece tokenizers drop the
leading space of the first piece they decode ("▁and" alone is "and"), so the first generated word
would otherwise lose its space.
"""
from __future__ import annotations

from typing import Sequence


class StreamDecoder:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = (), context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.context = list(context)
        self.ids: list[int] = list(self.context)  # the context, then every generated token
        self._prefix = 0  # ids[_prefix:_read] are decoded context for the next piece
        self._read = len(self.ids)
        self._held = ""  # released by the decoder, withheld from the user for the stop check
        self.released = 0  # characters handed to the caller so far
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text that is now final ("" if none)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(now[len(before):])

    def flush(self) -> str:
        """End of generation: everything still held back is final."""
        if self.stopped:
            return ""
        tail = self._decode(self.ids[self._prefix:])
        before = self._decode(self.ids[self._prefix:self._read])
        self._prefix = self._read = len(self.ids)
        return self._release(tail[len(before):], final=True)

    def tokens_in_text(self) -> int:
        """How many generated tokens decode to text that lies wholly within what was released: after
        a stop string, the tokens that wrote the text before it (a token that wrote part of the stop
        string is not counted)."""
        start = len(self.context)
        base = len(self._decode(self.context))
        for count in range(len(self.ids) - start, 0, -1):  # the stop is found near the end: few decodes
            if len(self._decode(self.ids[:start + count])) - base <= self.released:
                return count
        return 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, text: str, final: bool = False) -> str:
        out = self._cut(self._held + text, final)
        self.released += len(out)
        return out

    def _cut(self, text: str, final: bool) -> str:
        if not self.stop_strings:
            self._held = ""
            return text
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            self.stopped, self._held = True, ""
            return text[: min(cuts)]
        keep = 0 if final else self._partial_stop_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
