"""From the answer's reasoning and content (as the chat format split them, formats/) to an OpenAI
assistant message: reasoning, content and tool calls, as streamed deltas and as the whole message
(the non-streamed answer is the deltas joined, so the two never disagree). Qwen's `<tool_call>`
JSON in the content is parsed here (tools.py)."""
from __future__ import annotations

from .tools import ToolCallDelta, ToolCallParser, new_call_id


class ReplyStream:
    def __init__(self, tools: bool = False, parallel_tool_calls: bool = True):
        self._tools = ToolCallParser() if tools else None
        self._parallel = parallel_tool_calls
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, dict] = {}
        self.done = False  # parallel_tool_calls is false and the first call is complete: the rest is not wanted

    def feed(self, reasoning: str, content: str) -> list[dict]:
        return self._deltas(reasoning, content, final=False)

    def finish(self) -> list[dict]:
        return self._deltas("", "", final=True)

    def add_call(self, name: str, arguments: str) -> list[dict]:
        """A whole tool call, as the format parsed it (a harmony answer ends with one)."""
        delta = ToolCallDelta(len(self.calls), new_call_id(), name, arguments)
        self._merge(delta)
        return [{"tool_calls": [delta.to_openai()]}]

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def message(self) -> dict:
        content = "".join(self.content)
        message: dict = {"role": "assistant", "content": content or (None if self.calls else "")}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message

    def _deltas(self, reasoning: str, reply: str, final: bool) -> list[dict]:
        if self.done:
            return []
        out = []
        if reasoning:
            self.reasoning.append(reasoning)
            out.append({"reasoning_content": reasoning})
        calls: list[ToolCallDelta] = []
        if self._tools is not None:
            reply, calls = self._tools.feed(reply)
            if final:
                more, extra = self._tools.finish()
                reply, calls = reply + more, calls + extra
            if not self._parallel and self._tools.completed:
                calls = [c for c in calls if c.index == 0]  # a second call in the same piece is not wanted
                self.done = True
        if reply:
            self.content.append(reply)
            out.append({"content": reply})
        for call in calls:
            self._merge(call)
            out.append({"tool_calls": [call.to_openai()]})
        return out

    def _merge(self, delta: ToolCallDelta) -> None:
        call = self.calls.setdefault(delta.index, {"id": delta.id, "type": "function",
                                                   "function": {"name": delta.name, "arguments": ""}})
        call["function"]["arguments"] += delta.arguments
