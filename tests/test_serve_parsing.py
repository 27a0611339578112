"""`dflash serve` without a server: answers parsed into reasoning, content and tool calls however
the text is cut into pieces; requests checked field by field; prompts rendered as `dflash run` does."""
from __future__ import annotations

import json

import pytest

from dflash_cli.errors import UsageError
from dflash_cli.loader import load_tokenizer
from dflash_cli.prompt import encode_chat
from dflash_cli.serve.auth import HostPolicy, bearer_ok, check_exposure, clean_api_key
from dflash_cli.serve.prompting import chat_prompt, completion_prompt
from dflash_cli.serve.protocol import ApiError, check_strings, parse_chat, parse_completion
from dflash_cli.reasoning import ThinkSplitter
from dflash_cli.serve.reply import ReplyStream
from dflash_cli.serve.tools import ToolCallParser

from .tiny import QWEN3_TOKENIZER


def pieces(text: str):
    """Every way to cut `text` in two, and one piece per character."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


def split(mode: str, parts: list[str]) -> tuple[str, str]:
    s, reasoning, reply = ThinkSplitter(mode), [], []
    for p in parts + [None]:
        r, c = s.feed(p) if p is not None else s.finish()
        reasoning.append(r)
        reply.append(c)
    return "".join(reasoning), "".join(reply)


# ---- reasoning -----------------------------------------------------------------------------------

def test_think_block_splits_from_the_answer_however_the_text_is_cut():
    text = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello! <b>Hi</b>"
    for parts in pieces(text):
        assert split("auto", parts) == ("The user greets me.\nI greet back.", "Hello! <b>Hi</b>"), parts


def test_prompt_opened_think_block_starts_as_reasoning():
    text = "\nStep one.\n\n</think>\n\nAnswer."
    for parts in pieces(text):
        assert split("open", parts) == ("Step one.", "Answer.")


def test_no_think_block_or_thinking_off_leaves_the_text_alone():
    for text in ("  Plain answer with <think> inside.\n", "", "<thi", "\n\n"):
        for parts in pieces(text):
            assert split("auto", parts) == ("", text)
            assert split("off", parts) == ("", text)
    assert split("off", ["<think>x</think>y"]) == ("", "<think>x</think>y")


def test_reasoning_cut_short_by_the_token_limit_is_all_reasoning():
    assert split("auto", ["<think>\nstill thinking\n"]) == ("still thinking\n", "")
    assert split("open", ["half a tag </thi"]) == ("half a tag </thi", "")


def test_reasoning_streams_before_the_tag_closes():
    s = ThinkSplitter("auto")
    assert s.feed("<think>\nfirst thought") == ("first thought", "")
    assert s.feed(" and more\n") == (" and more", "")  # the newline may belong to the tag: held
    assert s.feed("</think>\n\nok") == ("", "ok")


# ---- tool calls ----------------------------------------------------------------------------------

def parse_tools(parts: list[str], make=ToolCallParser):
    ids = iter(f"call_{i}" for i in range(100))
    p, content, deltas = make(new_id=lambda: next(ids)), [], []
    for piece in parts + [None]:
        c, d = p.feed(piece) if piece is not None else p.finish()
        content.append(c)
        deltas += d
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
        call["arguments"] += d.arguments
    return "".join(content), [calls[i] for i in sorted(calls)], deltas


QWEN_CALL = ('Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
             '</tool_call>')


def test_qwen_tool_call_becomes_name_and_exact_arguments_however_cut():
    for parts in pieces(QWEN_CALL):
        content, calls, _ = parse_tools(parts)
        assert content == "Let me check."
        assert calls == [{"id": "call_0", "name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2]}'}]


def test_tool_call_streams_incrementally():
    p, seen_name_at, arg_deltas = ToolCallParser(), None, 0
    for i, ch in enumerate(QWEN_CALL):
        _, deltas = p.feed(ch)
        for d in deltas:
            if d.name is not None:
                seen_name_at = i
            arg_deltas += bool(d.arguments)
    assert seen_name_at is not None and seen_name_at < QWEN_CALL.index("Paris")
    assert arg_deltas > 10  # the arguments arrive as they are written, not in one piece at </tool_call>


def test_several_calls_nested_json_and_whitespace_between_them():
    text = ('<tool_call>\n{"name": "a", "arguments": {"q": {"deep": [1, {"s": "}"}]}}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    for parts in pieces(text):
        content, calls, _ = parse_tools(parts)
        assert content == ""
        assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("call_0", "a", {"q": {"deep": [1, {"s": "}"}]}}), ("call_1", "b", {})]


def test_other_layouts_and_formats():
    # "arguments" before "name": not streamable, sent whole at </tool_call>
    _, calls, _ = parse_tools(['<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'])
    assert calls == [{"id": "call_0", "name": "f", "arguments": '{"x": 1}'}]
    # arguments given as a JSON string: passed on as that string
    _, calls, _ = parse_tools(['<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'])
    assert calls[0]["arguments"] == '{"x": 1}'
    # not JSON (Qwen3-Coder's XML): the text stays, tags included
    xml = "<tool_call>\n<function=f>\n<parameter=x>1</parameter>\n</function>\n</tool_call>"
    assert parse_tools([xml])[:2] == (xml, [])


def test_text_without_calls_is_untouched_and_a_cut_call_keeps_what_was_written():
    for text in ("Hello  \n", "a <tool_ b", "<tool_call"):
        for parts in pieces(text):
            assert parse_tools(parts)[:2] == (text, [])
    content, calls, _ = parse_tools(['Sure. <tool_call>\n{"name": "f", "arguments": {"x": [1, 2'])
    assert content == "Sure." and calls == [{"id": "call_0", "name": "f", "arguments": '{"x": [1, 2'}]


def test_reply_stream_puts_reasoning_content_and_calls_together():
    text = "<think>\nneed weather\n</think>\n\n" + QWEN_CALL
    r, think = ReplyStream(tools=True), ThinkSplitter("auto")  # the think_tags format splits; the reply shapes
    deltas = [d for ch in text for d in r.feed(*think.feed(ch))] + r.feed(*think.finish()) + r.finish()
    message = r.message()
    assert message["reasoning_content"] == "need weather" and message["content"] == "Let me check."
    assert message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                     "arguments": '{"city": "Paris", "days": [1, 2]}'}
    assert message["tool_calls"][0]["type"] == "function" and message["tool_calls"][0]["id"].startswith("call_")
    kinds = [next(iter(d)) for d in deltas]
    assert kinds.index("reasoning_content") < kinds.index("content") < kinds.index("tool_calls")
    only_call = ReplyStream(tools=True)
    only_call.feed("", '<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    only_call.finish()
    assert only_call.message()["content"] is None  # OpenAI's shape for a reply that is only tool calls


def test_parallel_tool_calls_false_keeps_the_first_call_only():
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}'
            '</tool_call>')
    r = ReplyStream(tools=True, parallel_tool_calls=False)
    r.feed("", text)
    assert r.done and [c["function"]["name"] for c in r.message()["tool_calls"]] == ["a"]
    assert r.feed("", "more") == [] and r.finish() == []


# ---- requests ------------------------------------------------------------------------------------

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, status, param", [
    ({"n": 2}, 400, "n"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"foo": 1, "bar": 2}, 400, "bar"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"temperature": -1}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"min_p": 1}, 400, "min_p"),
    ({"top_k": -2}, 400, "top_k"),
    ({"seed": 1.5}, 400, "seed"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -5}, 400, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"stop": [1]}, 400, "stop"),
    ({"model": "gpt-4o"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, 400, "reasoning_effort"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, 400, "chat_template_kwargs"),
])
def test_unsupported_or_invalid_fields_are_refused_by_name(extra, status, param):
    with pytest.raises(ApiError) as e:
        parse_chat(BASE | extra, "m")
    assert (e.value.status, e.value.param) == (status, param)
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_neutral_values_are_accepted_and_sampling_is_kept_exactly():
    req = parse_chat(BASE | {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
                             "logit_bias": {}, "user": "u1", "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                             "min_p": 0.05, "seed": 7, "stop": "END", "max_completion_tokens": 9}, "m")
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.7, 0.9, 40, 0.05, 7)
    assert req.stop == ("END",) and req.max_tokens == 9 and req.max_tokens is not None
    assert parse_chat(BASE | {"top_k": -1}, "m").sampling.top_k == 0  # -1 is how vLLM clients say "off"
    assert parse_chat(BASE, "m").sampling.seed is None  # greedy needs none
    drawn = parse_chat(BASE | {"temperature": 1.0}, "m").sampling.seed
    assert isinstance(drawn, int)  # drawn here so that the answer can report it


def test_thinking_per_request():
    assert parse_chat(BASE, "m", default_think=True).enable_thinking
    assert not parse_chat(BASE, "m").enable_thinking
    assert parse_chat(BASE | {"chat_template_kwargs": {"enable_thinking": True}}, "m").enable_thinking
    assert not parse_chat(BASE | {"reasoning_effort": "none"}, "m", default_think=True).enable_thinking
    assert parse_chat(BASE | {"reasoning_effort": "low"}, "m").enable_thinking
    kwargs = parse_chat(BASE | {"chat_template_kwargs": {"enable_thinking": True, "x": 1}}, "m").template_kwargs
    assert kwargs == {"x": 1}


def test_messages_are_normalised_for_the_template():
    req = parse_chat({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ], "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]}, "m")
    assert req.messages[0] == {"role": "system", "content": "Be brief."}
    assert req.messages[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": {"city": "Oslo"}}
    assert req.messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert req.tools[0]["function"]["name"] == "w"
    assert parse_chat(BASE | {"tools": req.tools, "tool_choice": "none"}, "m").tools is None


def test_completion_requests():
    req = parse_completion({"model": "m", "prompt": "Once"}, "m")
    assert req.prompt == "Once" and req.max_tokens == 16  # OpenAI's default for completions
    assert parse_completion({"prompt": [[1, 2, 3]]}, "m").prompt == [1, 2, 3]
    for bad_body in ({"prompt": ["a", "b"]}, {"prompt": ""}, {"prompt": "x", "echo": True},
                     {"prompt": "x", "suffix": "y"}, {"prompt": "x", "best_of": 2}, {"prompt": "x", "logprobs": 0}):
        with pytest.raises(ApiError) as e:
            parse_completion(bad_body, "m")
        assert e.value.status == 400


# ---- prompts and access --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(QWEN3_TOKENIZER)


def test_chat_prompt_is_what_dflash_run_renders(tokenizer):
    messages = [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "2+2?"}]
    for think in (False, True):
        prompt = chat_prompt(tokenizer, messages, enable_thinking=think)
        assert prompt.ids == encode_chat(tokenizer, messages, enable_thinking=think)
        assert not prompt.opens_think  # Qwen3's template leaves <think> to the model


def test_tools_go_through_the_template_and_an_opened_think_block_is_noticed(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object"}}}]
    ids = chat_prompt(tokenizer, [{"role": "user", "content": "Oslo?"}], tools=tools).ids
    text = tokenizer.decode(ids)
    assert "<tools>" in text and '"name": "get_weather"' in text and "<tool_call>" in text
    original = tokenizer.chat_template
    try:  # Qwen3.5's generation prompt opens the think block itself
        tokenizer.chat_template = original.replace("{{- '<|im_start|>assistant\\n' }}",
                                                   "{{- '<|im_start|>assistant\\n<think>\\n' }}")
        assert chat_prompt(tokenizer, [{"role": "user", "content": "x"}], enable_thinking=True).opens_think
        tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
        with pytest.raises(ApiError, match="chat template refused these messages: Conversation roles must alternate"):
            chat_prompt(tokenizer, [{"role": "user", "content": "x"}])
    finally:
        tokenizer.chat_template = original


def test_completion_token_ids_are_checked_against_the_vocabulary(tokenizer):
    assert completion_prompt(tokenizer, [1, 2]).ids == [1, 2]
    with pytest.raises(ApiError, match="outside the vocabulary"):
        completion_prompt(tokenizer, [151669])  # the drafter's mask id: never a text token


def test_exposure_rules_and_bearer_keys():
    assert check_exposure("127.0.0.1", None, False) is None and check_exposure("localhost", None, False) is None
    assert check_exposure("::1", None, False) is None
    with pytest.raises(UsageError, match="--api-key"):
        check_exposure("0.0.0.0", None, False)
    assert check_exposure("0.0.0.0", "k", False) is None
    assert "warning" in check_exposure("192.168.1.5", None, True)
    with pytest.raises(UsageError):
        check_exposure("127.0.0.1", "k", True)
    assert bearer_ok("Bearer s3cret", "s3cret") and bearer_ok("bearer s3cret", "s3cret")
    assert not bearer_ok("Bearer s3cre", "s3cret") and not bearer_ok(None, "s3cret")
    assert not bearer_ok("Basic s3cret", "s3cret")



# ---- issue 22: limits at the request boundary, keys, the Host header -----------------------------

@pytest.mark.parametrize("extra, param", [
    ({"temperature": 1e39}, "temperature"),  # beyond float32: the sampler's scalar overflowed (B3)
    ({"temperature": 10**400}, "temperature"),  # an integer beyond float: OverflowError
    ({"temperature": 100.5}, "temperature"),
    ({"top_k": 2**63}, "top_k"),  # beyond int64
    ({"top_k": 2**31}, "top_k"),
    ({"top_p": 1e-50}, "top_p"),  # 0 in float32
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 8, "max_completion_tokens": 0}, "max_completion_tokens"),  # the range, not "disagree" (B17)
])
def test_sampler_values_have_sane_limits(extra, param):
    with pytest.raises(ApiError) as e:
        parse_chat(BASE | extra, "m")
    assert (e.value.status, e.value.param) == (400, param)
    assert "disagree" not in e.value.message


def test_values_at_the_limits_are_accepted_and_a_tiny_temperature_is_greedy():
    s = parse_chat(BASE | {"temperature": 100, "top_k": 2**31 - 1, "top_p": 1e-6, "seed": 2**64 - 1}, "m").sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (100, 2**31 - 1, 1e-6, 2**64 - 1)
    for tiny in (1e-300, 1e-40, 1e-21):  # B5: float32 makes these 0 (or logits / T overflow): greedy
        s = parse_chat(BASE | {"temperature": tiny}, "m").sampling
        assert s.greedy and s.seed is None
    assert parse_chat(BASE | {"temperature": 1e-20, "seed": 1}, "m").sampling.temperature == 1e-20  # sampling.GREEDY_BELOW


def test_lone_surrogates_and_deep_nesting_are_refused_by_field():
    for body, param in ((BASE | {"messages": [{"role": "user", "content": "\ud800 hi"}]}, "messages"),
                        (BASE | {"stop": ["\udfff"]}, "stop"), (BASE | {"\ud800": 1}, None)):
        with pytest.raises(ApiError, match="lone surrogate") as e:
            check_strings(body)
        assert e.value.param == param
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ApiError, match="nests deeper than 64") as e:
        check_strings(BASE | {"user": deep})
    assert e.value.param == "user"
    check_strings(BASE | {"tools": [{"function": {"parameters": {"a": {"b": {"c": [["emoji 😀"]]}}}}}]})


def test_an_error_quotes_at_most_500_characters():
    with pytest.raises(ApiError) as e:
        parse_chat(BASE | {"x" * 100_000: 1}, "m")
    assert len(e.value.message) <= 501 and e.value.message.endswith("…")


def test_api_keys_are_stripped_and_blank_ones_refused():
    assert clean_api_key("topsecret\n") == clean_api_key("  topsecret ") == "topsecret"  # B15
    assert clean_api_key(None) is None
    for blank in ("", "   ", "\n"):
        with pytest.raises(UsageError, match="--api-key is"):
            clean_api_key(blank)
    with pytest.raises(UsageError, match="printable ASCII"):
        clean_api_key("top\nsecret")
    assert bearer_ok("Bearer topsecret", "topsecret\n")
    with pytest.raises(UsageError):
        check_exposure("0.0.0.0", "  ", False)


def test_host_policy_refuses_names_that_are_not_this_server():
    loopback = HostPolicy(("127.0.0.1", "127.0.0.1"))
    for ok in ("localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1:8000", "[::1]:8000", "::1", "127.9.9.9"):
        assert loopback.allows(ok), ok
    for no in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "10.0.0.5", "", None,
               "0.0.0.0"):
        assert not loopback.allows(no), no
    proxied = HostPolicy(("127.0.0.1",), ("api.example.com", "10.1.2.3:443"))
    assert proxied.allows("API.example.com:443") and proxied.allows("10.1.2.3") and not proxied.allows("example.com")
    assert HostPolicy(("127.0.0.1",), ("*",)).allows("anything.example")
    everywhere = HostPolicy(("0.0.0.0", "0.0.0.0"))  # on every address: any IP literal, names by --allow-host
    assert everywhere.allows("192.168.1.5:8000") and everywhere.allows("[fe80::1]") and everywhere.allows("localhost")
    assert not everywhere.allows("myhost.lan")
    named = HostPolicy(("myhost.lan", "192.168.1.5"))
    assert named.allows("myhost.lan:8000") and named.allows("192.168.1.5") and not named.allows("192.168.1.6")
