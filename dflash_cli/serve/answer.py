"""One answer in OpenAI's shapes, built from the worker's events: streamed chunks, or the whole
response. A chat answer goes through ReplyStream (reasoning, content, tool calls); a text completion
is the text as written. Both end with `usage` and the `dflash` speculation stats."""
from __future__ import annotations

from collections import Counter
from functools import partial

from .protocol import ChatRequest, CompletionRequest, chat_chunk, chat_completion, new_id, now, text_completion, usage
from .reply import ReplyStream
from .worker import Finished, Started


def extension(fin: Finished, seed: int | None, cached: int) -> dict:
    """The `dflash` object of an answer: what speculation did for it."""
    s = fin.stats
    return {
        "mean_acceptance_length": round(s.mean_acceptance, 4), "tokens_per_second": round(s.tokens_per_second, 2),
        "end_to_end_tokens_per_second": round(s.end_to_end_tokens_per_second, 2), "block_size": fin.block_size,
        "tree_budget": fin.tree_budget, "iterations": len(s.acceptance_lengths),
        "acceptance_histogram": {str(k): v for k, v in sorted(Counter(s.acceptance_lengths).items())},
        "block_size_histogram": {str(k): v for k, v in sorted(Counter(s.block_sizes).items())},
        "tree_budget_histogram": {str(k): v for k, v in sorted(Counter(s.tree_budgets).items())},
        "position_acceptance": [None if r is None else round(r, 4) for r in s.position_acceptance()],
        "prefill_seconds": round(s.prefill_seconds, 4), "decode_seconds": round(s.decode_seconds, 4),
        "cached_prompt_tokens": cached, "seed": seed,
    }


class Answer:
    """What both endpoints share: ids, usage, the finish reason and the stats object."""

    def __init__(self, req: ChatRequest | CompletionRequest, first: Started, model: str, prefix: str):
        self.req, self.first, self.model = req, first, model
        self.id, self.created = new_id(prefix), now()

    @property
    def done(self) -> bool:
        """Nothing more is wanted even though the model may go on (the caller cancels the job)."""
        return False

    def finish_reason(self, fin: Finished) -> str:
        return "length" if fin.finish == "length" else "stop"

    def _usage(self, fin: Finished) -> dict:
        return usage(self.first.prompt_tokens, fin.stats.generated, self.first.cached_tokens)

    def _extension(self, fin: Finished) -> dict:
        return extension(fin, self.req.sampling.seed, self.first.cached_tokens)


class ChatAnswer(Answer):
    def __init__(self, req: ChatRequest, first: Started, model: str):
        super().__init__(req, first, model, "chatcmpl")
        self.reply = ReplyStream(tools=bool(req.tools), parallel_tool_calls=req.parallel_tool_calls)
        self._chunk = partial(chat_chunk, self.id, self.created, model)

    @property
    def done(self) -> bool:
        return self.reply.done

    def finish_reason(self, fin: Finished) -> str:
        if self.reply.has_tool_calls and (fin.finish in ("stop", "tool_call") or self.reply.done):
            return "tool_calls"
        return super().finish_reason(fin)

    def opening(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, text: str, reasoning: str = "", tool_call=None) -> list[dict]:
        """Reasoning and content as the chat format split them, and the tool call the answer ended with."""
        deltas = self.reply.feed(reasoning, text)
        if tool_call is not None:
            deltas += self.reply.add_call(tool_call.name, tool_call.arguments)
        return [self._chunk(delta) for delta in deltas]

    def closing(self, fin: Finished) -> list[dict]:
        chunks = [self._chunk(delta) for delta in self.reply.finish()]
        chunks.append(self._chunk({}, self.finish_reason(fin), dflash=self._extension(fin)))
        if self.req.include_usage:
            chunks.append(self._chunk(None, usage=self._usage(fin), dflash=self._extension(fin)))
        return chunks

    def whole(self, fin: Finished) -> dict:
        self.reply.finish()
        return chat_completion(self.id, self.created, self.model, self.reply.message(), self.finish_reason(fin),
                               self._usage(fin), self._extension(fin))


class CompletionAnswer(Answer):
    def __init__(self, req: CompletionRequest, first: Started, model: str):
        super().__init__(req, first, model, "cmpl")
        self.text: list[str] = []
        self._chunk = partial(text_completion, self.id, self.created, model)

    def opening(self) -> list[dict]:
        return []

    def feed(self, text: str, reasoning: str = "", tool_call=None) -> list[dict]:
        self.text.append(text)
        return [self._chunk(text, None)]

    def closing(self, fin: Finished) -> list[dict]:
        chunks = [self._chunk("", self.finish_reason(fin), dflash=self._extension(fin))]
        if self.req.include_usage:
            chunks.append(self._chunk(None, None, usage=self._usage(fin), dflash=self._extension(fin)))
        return chunks

    def whole(self, fin: Finished) -> dict:
        return text_completion(self.id, self.created, self.model, "".join(self.text), self.finish_reason(fin),
                               usage=self._usage(fin), dflash=self._extension(fin))
