"""The OpenAI wire format: requests checked field by field, responses and errors in OpenAI's shapes.

Every field a request may carry is either honoured exactly or refused with a 400 that names it:
a local server that silently ignores `temperature` or `n` gives wrong answers that look right.
Fields at their neutral value (`n: 1`, `presence_penalty: 0`, `logprobs: false`, …) are accepted,
since many clients send them on every request.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import sampling
from ..sampling import SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        if len(message) > 500:  # a message may quote what the client sent: never echo megabytes back
            message = message[:500] + "…"
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


MAX_DEPTH = 64  # nesting of objects and lists in a request body (a tool's JSON schema fits easily)


def check_strings(body: Any) -> None:
    """A parsed body's strings are text (a lone surrogate such as "\\ud800" is valid JSON but no
    tokenizer's input, nor encodable as UTF-8), and it nests at most MAX_DEPTH deep; walked without
    recursion."""
    stack: list[tuple[Any, int, str]] = [(body, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            _text(value, where)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise bad(f"the request body nests deeper than {MAX_DEPTH} levels", where.partition("[")[0] or None)
            if isinstance(value, dict):
                for k, v in value.items():
                    _text(k, where)
                    stack.append((v, depth + 1, where or k))
            else:
                stack.extend((v, depth + 1, where) for v in value)


def _text(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("the request holds a lone surrogate escape (such as \\ud800): it is not text",
                  where or None) from None


# ---- requests ------------------------------------------------------------------------------------

@dataclass
class Generation:
    """What both endpoints share: the model, the token budget, sampling and streaming."""

    max_tokens: int | None  # None: what is left of the context
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest(Generation):
    messages: list[dict] = field(default_factory=list)  # normalised for the chat template
    tools: list[dict] | None = None  # None: no tools rendered, none parsed
    parallel_tool_calls: bool = True
    enable_thinking: bool = False
    template_kwargs: dict = field(default_factory=dict)


@dataclass
class CompletionRequest(Generation):
    prompt: str | list[int] = ""


# Accepted at these values only (the value that changes nothing); anything else is a 400 naming it.
_NEUTRAL = {
    "n": 1, "best_of": 1, "logprobs": False, "top_logprobs": 0, "frequency_penalty": 0, "presence_penalty": 0,
    "repetition_penalty": 1, "logit_bias": {}, "echo": False, "suffix": "", "store": False,
}
_WHY = {
    "n": "one answer per request (batch size 1)", "best_of": "one answer per request (batch size 1)",
    "logprobs": "log-probabilities are not returned", "top_logprobs": "log-probabilities are not returned",
    "frequency_penalty": "penalties would change the target distribution the lossless sampler draws from",
    "presence_penalty": "penalties would change the target distribution the lossless sampler draws from",
    "repetition_penalty": "penalties would change the target distribution the lossless sampler draws from",
    "logit_bias": "logit bias is not applied", "echo": "the prompt is not echoed",
    "suffix": "fill-in-the-middle is not supported", "store": "nothing is stored",
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
           "stream_options", "user", *_NEUTRAL}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls",
                   "response_format", "chat_template_kwargs", "reasoning_effort"}
_COMPLETION = _COMMON | {"prompt"}
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
ROLES = ("system", "developer", "user", "assistant", "tool")
# Message keys clients echo back from a previous response; accepted while they carry nothing.
_ECHOED = ("refusal", "annotations", "audio", "function_call")


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad(f"unsupported parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}", unknown[0],
                  "unsupported_parameter")
    for name, neutral in _NEUTRAL.items():
        if name in body and not _is_neutral(body[name], neutral):
            raise bad(f"{name}={body[name]!r} is not supported: {_WHY[name]}", name, "unsupported_parameter")


def _is_neutral(value: Any, neutral: Any) -> bool:
    """None, or the neutral value itself: `logprobs: 0` is not `false` (it asks for log-probabilities)."""
    if value is None:
        return True
    if isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    return type(value) in (int, float, str, dict) and value == neutral


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(_float(value)):
        raise bad(f"{name} must be a number, got {value!r}", name)
    if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
        lo_s, hi_s = ("(" if lo_open else "[") + f"{lo:g}", f"{hi:g}" + (")" if hi_open else "]")
        raise bad(f"{name} must be in {lo_s}, {hi_s}, got {value}", name)
    return float(value)


def _float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float's range: not a finite number here
        return math.inf


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r}", name)
    return value


# Sane limits at the request boundary: the sampler holds its values as float32 and int64 device
# scalars, so anything beyond these is either meaningless or an overflow there.
MAX_TEMPERATURE = 100.0  # logits divided by 100 are all but uniform already
SEEDS = 2**64  # seeds are taken modulo 2^32 by the sampler; int64 and uint64 seeds are accepted


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 0.0, 0.0, MAX_TEMPERATURE)
    if temperature < sampling.GREEDY_BELOW:
        temperature = 0.0  # sampling at such a temperature is greedy anyway (up to exact ties)
    top_p = _number(body, "top_p", 1.0, sampling.TOP_P_MIN, 1.0)
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0, hi_open=True)
    top_k = _integer(body, "top_k")
    if top_k is not None and not -1 <= top_k <= sampling.TOP_K_MAX:
        raise bad(f"top_k must be -1 or 0 (off) or a count up to {sampling.TOP_K_MAX}, got {top_k}", "top_k")
    seed = _integer(body, "seed")
    if seed is not None and not -SEEDS // 2 <= seed < SEEDS:
        raise bad(f"seed must fit in 64 bits, got {seed}", "seed")
    if seed is None and temperature > 0:
        # Drawn here rather than in the engine, so that the answer can say which seed reproduces it.
        seed = int.from_bytes(os.urandom(4), "little")
    return SamplingParams(temperature, max(top_k or 0, 0), top_p, min_p, seed)


def _max_tokens(body: dict, *names: str) -> int | None:
    given = {n: _integer(body, n) for n in names if body.get(n) is not None}
    for name, value in given.items():
        if value < 1:
            raise bad(f"{name} must be at least 1, got {value}", name)
    if len(set(given.values())) > 1:
        raise bad(f"{' and '.join(given)} disagree; give one", names[0])
    return next(iter(given.values()), None)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stop) > 16:
        raise bad(f"stop takes at most 16 strings, got {len(stop)}", "stop")
    return tuple(s for s in stop if s)


def _generation(body: dict, model_id: str, default_max: int | None, *token_fields: str) -> dict:
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model '{model}' does not exist: this server serves '{model_id}'", param="model",
                       code="model_not_found")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options takes only include_usage (true or false)", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user must be a string", "user")
    max_tokens = _max_tokens(body, *token_fields)
    return dict(max_tokens=max_tokens if max_tokens is not None else default_max, sampling=_sampling(body),
                stop=_stop(body), stream=bool(stream), include_usage=bool((options or {}).get("include_usage")))


def _text_content(content: Any, where: str) -> str | None:
    """A message's content as text: a string, or a list of text parts (joined)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}: only text content is supported, got a '{kind}' part", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where}: content must be a string or a list of text parts", "messages")


def _tool_call(call: Any, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"{where}: each tool call needs a function with a name", "messages")
    arguments = fn.get("arguments", "{}")
    if isinstance(arguments, str):
        # Chat templates (Qwen3.5's among them) iterate the arguments: hand them an object when it is one.
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            parsed = None
        arguments = parsed if isinstance(parsed, dict) else arguments
    out = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _messages(items: Any) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{where}: role must be one of {', '.join(ROLES)}", "messages")
        extra = sorted(k for k in m if k not in ("role", "content", "name", "tool_calls", "tool_call_id",
                                                 "reasoning_content", *_ECHOED) and m[k] is not None)
        extra += sorted(k for k in _ECHOED if m.get(k))
        if extra:
            raise bad(f"{where}: unsupported field {extra[0]}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        message: dict[str, Any] = {"role": role, "content": _text_content(m.get("content"), where)}
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise bad(f"{where}: tool_calls belong to assistant messages, as a list", "messages")
            message["tool_calls"] = [_tool_call(c, where) for c in calls]
        if message["content"] is None and not message.get("tool_calls"):
            raise bad(f"{where}: content is missing", "messages")
        message["content"] = message["content"] or ""
        for key in ("name", "tool_call_id", "reasoning_content"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise bad(f"{where}: {key} must be a string", "messages")
                message[key] = m[key]
        out.append(message)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise bad(f"tool_choice {choice!r} is not supported: it needs constrained decoding; use 'auto' or 'none'",
                  "tool_choice")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools must be a list", "tools")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad(f"tools[{i}]: only function tools are supported", "tools")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}]: a function tool needs a name", "tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}]: parameters must be a JSON schema object", "tools")
    return None if choice == "none" or not tools else tools


# reasoning_effort → harmony's three levels (gpt-oss's template reads it; the others ignore it).
HARMONY_EFFORT = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}


def _thinking(body: dict, default: bool, default_effort: str | None = None) -> tuple[bool, dict]:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "tokenize", "conversation",
                                      "continue_final_message", "return_dict", "chat_template"})
    if reserved:
        raise bad(f"chat_template_kwargs cannot set {reserved[0]}", "chat_template_kwargs")
    think = kwargs.pop("enable_thinking", None)
    if think is not None and not isinstance(think, bool):
        raise bad("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise bad(f"reasoning_effort must be one of {', '.join(EFFORTS)}", "reasoning_effort")
        # The supported templates switch thinking on or off; they have no budget between the two.
        by_effort = effort != "none"
        if think is not None and think != by_effort:
            raise bad(f"reasoning_effort {effort!r} contradicts chat_template_kwargs.enable_thinking={think}",
                      "reasoning_effort")
        think = by_effort
        kwargs.setdefault("reasoning_effort", HARMONY_EFFORT[effort])
    elif default_effort is not None:
        kwargs.setdefault("reasoning_effort", default_effort)
    return (default if think is None else think), kwargs


def parse_chat(body: Any, model_id: str, *, default_think: bool = False, default_effort: str | None = None
               ) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_fields(body, _CHAT)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format other than {'type': 'text'} is not supported (it needs constrained decoding)",
                  "response_format")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("parallel_tool_calls must be true or false", "parallel_tool_calls")
    think, kwargs = _thinking(body, default_think, default_effort)
    common = _generation(body, model_id, None, "max_completion_tokens", "max_tokens")
    return ChatRequest(**common, messages=_messages(body.get("messages")), tools=_tools(body),
                       parallel_tool_calls=parallel is not False, enable_thinking=think, template_kwargs=kwargs)


def parse_completion(body: Any, model_id: str) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_fields(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ok_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        raise bad("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
    # OpenAI's completions endpoint answers 16 tokens when max_tokens is not given; so does this one.
    return CompletionRequest(**_generation(body, model_id, 16, "max_tokens"), prompt=prompt)


# ---- responses -----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_completion(rid: str, created: int, model: str, message: dict, finish: str, usage_: dict,
                    extension: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage_, "dflash": extension}


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None, **extra) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}


def text_completion(rid: str, created: int, model: str, text: str | None, finish: str | None, **extra) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, **extra}
