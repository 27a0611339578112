"""Tool calls in a streamed reply, in the Qwen / Hermes format the Qwen chat templates teach:
`<tool_call>\\n{"name": "f", "arguments": {…}}\\n</tool_call>`, one block per call.

Each call becomes OpenAI `tool_calls` deltas as it is written: the name (with a new call id) as soon
as `{"name": "…", "arguments": ` is complete, then the arguments' JSON text piece by piece, exactly
as the model wrote it (so the pieces join to the final `arguments` string). A block that is not this
JSON (another model's format) stays reply text. Whitespace around calls is layout and is dropped.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable

from ..reasoning import partial_tag

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_DECODER = json.JSONDecoder()


@dataclass
class ToolCallDelta:
    index: int  # which call (0, 1, … in order of appearance)
    id: str | None = None  # on a call's first delta, with its name
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        out: dict = {"index": self.index}
        if self.id is not None:
            out |= {"id": self.id, "type": "function"}
        fn = {"arguments": self.arguments}
        if self.name is not None:
            fn = {"name": self.name, **fn}
        out["function"] = fn
        return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self._new_id = new_id
        self._buf = ""  # reply text not yet released
        self._held = ""  # trailing whitespace of the reply: dropped if a call follows
        self._after_call = False  # drop whitespace right after a call
        self._call: str | None = None  # the open block's text, while inside <tool_call>
        self.started = 0  # calls whose name was sent
        self.completed = 0  # calls whose </tool_call> was seen
        self._begin_call()

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add reply text; return (reply text now final, tool-call deltas)."""
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._drain(final=True)

    # ---- internals -------------------------------------------------------------------------
    def _drain(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        reply: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._call is None:
                start = self._buf.find(OPEN)
                if start < 0:
                    keep = 0 if final else partial_tag(self._buf, OPEN)
                    reply.append(self._release(self._buf[:len(self._buf) - keep], final))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                reply.append(self._release(self._buf[:start], final=False, before_call=True))
                self._buf, self._call = self._buf[start + len(OPEN):], ""
                self._begin_call()
            self._call += self._buf
            self._buf = ""
            end = self._call.find(CLOSE)
            if end < 0:
                if final:
                    reply.append(self._end_call(self._call, closed=False, deltas=deltas))
                    break
                self._stream(self._call, deltas)
                break
            body, self._buf = self._call[:end], self._call[end + len(CLOSE):]
            reply.append(self._end_call(body, closed=True, deltas=deltas))
        return "".join(reply), deltas

    def _release(self, text: str, final: bool, before_call: bool = False) -> str:
        """Reply text, minus whitespace that only separates it from tool calls."""
        text = self._held + text
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        if before_call:
            self._held = ""
            return text.rstrip()
        if final:
            self._held = ""
            return text
        body = text.rstrip()
        self._held = text[len(body):]
        return body

    def _begin_call(self) -> None:
        self._named = False  # the name delta was sent
        self._args_at = 0  # where the arguments' JSON starts in the block
        self._streaming = False  # the arguments are an object whose text is being streamed
        self._sent = 0  # characters of arguments text sent so far
        self._args_done = False

    def _stream(self, body: str, deltas: list[ToolCallDelta]) -> None:
        if not self._named:
            head = _HEAD.match(body)
            if head is None or head.end() >= len(body):
                return  # the name is not complete yet (or this is not a JSON call: decided at </tool_call>)
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                return
            self._named, self._args_at = True, head.end()
            self._streaming = body[head.end()] == "{"
            deltas.append(ToolCallDelta(self.started, self._new_id(), name, ""))
            self.started += 1
        if self._streaming and not self._args_done:
            text = body[self._args_at:]
            text = text[:len(text) - partial_tag(text, CLOSE)]
            try:
                _, end = _DECODER.raw_decode(text)
                safe, self._args_done = text[:end], True
            except ValueError:
                # Closing braces at the end may be the outer object's: hold them until more text comes.
                safe = text.rstrip(" \t\r\n}")
            self._send(safe, deltas)

    def _send(self, text: str, deltas: list[ToolCallDelta]) -> None:
        if len(text) > self._sent:
            deltas.append(ToolCallDelta(self.started - 1, arguments=text[self._sent:]))
            self._sent = len(text)

    def _end_call(self, body: str, closed: bool, deltas: list[ToolCallDelta]) -> str:
        """Finish a block; return text that turned out to be reply text ("" for a tool call)."""
        self._call = None
        self._stream(body, deltas)
        try:
            call = json.loads(body)
        except ValueError:
            call = None
        valid = isinstance(call, dict) and isinstance(call.get("name"), str)
        if not self._named and not valid:
            # Not a JSON tool call: the text stays, tags included.
            return OPEN + body + (CLOSE if closed else "")
        self._after_call = True
        if closed:
            self.completed += 1
        if not self._named:  # valid, but not in the streamable layout (e.g. "arguments" first)
            args = call.get("arguments", {})
            text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            deltas.append(ToolCallDelta(self.started, self._new_id(), call["name"], text))
            self.started += 1
            return ""
        rest = body[self._args_at:]
        if not self._streaming:  # a string or other non-object arguments value: sent whole
            args = call.get("arguments", {}) if valid else rest.rstrip()
            self._send(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False), deltas)
            return ""
        try:
            _, end = _DECODER.raw_decode(rest)
            final = rest[:end]
        except ValueError:
            final = rest.rstrip()  # malformed or cut short: passed on as written
            if closed and final.endswith("}"):
                final = final[:-1].rstrip()
        if not final.startswith(rest[:self._sent]) or len(final) < self._sent:
            final = rest[:self._sent]  # never take back what was sent
        self._send(final, deltas)
        return ""
