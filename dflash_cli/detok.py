"""Streaming detokenisation and stop strings.

Text is released only once it is final: a multi-byte character split across tokens waits for its
last byte (no U+FFFD flicker), and text that could be the start of a stop string waits until it is
known not to be one.
"""
from __future__ import annotations


class StreamDecoder:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] are decoded context for the next piece
        self._read = 0
        self._held = ""  # released by the decoder, withheld from the user for the stop check
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text that is now final ("" if none)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(now[len(before):])

    def flush(self) -> str:
        """End of generation: everything still held back is final."""
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        self._prefix = self._read = len(self.ids)
        out = self._release(tail[len(before):], final=True)
        return out

    def _release(self, text: str, final: bool = False) -> str:
        text = self._held + text
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
