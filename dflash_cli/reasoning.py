"""Split a streamed answer into reasoning and reply: Qwen3's `<think>…</think>`.

Text arrives in pieces cut anywhere, so a tag can straddle two pieces: text that could be the start
of a tag is held back until the next piece decides. Newlines next to the tags are layout, not text
(the Qwen chat templates strip them when they render a reasoning turn back), so they go too.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
MODES = ("off", "auto", "open")


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkSplitter:
    """mode "off": all of it is reply (thinking disabled); "auto": reasoning if the answer opens with
    <think>; "open": the prompt already opened <think> (Qwen3.5's template), so it starts as reasoning."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._state = {"off": "reply", "auto": "start", "open": "reasoning"}[mode]
        self._buf = ""
        self._strip_lead = mode == "open"  # newlines after <think>, or after </think>

    def feed(self, text: str) -> tuple[str, str]:
        """Add text; return the (reasoning, reply) text that is now final."""
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """End of the answer: everything held back is final (a truncated tag is just text)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning, reply = [], []
        while True:
            if self._state == "start":
                head = self._buf.lstrip()
                if head.startswith(OPEN):
                    self._buf, self._state, self._strip_lead = head[len(OPEN):], "reasoning", True
                    continue
                if not final and OPEN.startswith(head):
                    break  # nothing yet, or the beginning of <think>: wait for more
                self._state = "reply"
                continue
            if self._strip_lead:
                self._buf = self._buf.lstrip("\n")
                if not self._buf and not final:
                    break
                self._strip_lead = False
            if self._state == "reasoning":
                end = self._buf.find(CLOSE)
                if end >= 0:
                    reasoning.append(self._buf[:end].rstrip("\n"))
                    self._buf, self._state, self._strip_lead = self._buf[end + len(CLOSE):], "reply", True
                    continue
                if final:
                    reasoning.append(self._buf)
                    self._buf = ""
                    break
                cut = len(self._buf) - partial_tag(self._buf, CLOSE)
                body = self._buf[:cut].rstrip("\n")  # newlines may be the ones before </think>
                reasoning.append(body)
                self._buf = self._buf[len(body):]
                break
            reply.append(self._buf)
            self._buf = ""
            break
        return "".join(reasoning), "".join(reply)
