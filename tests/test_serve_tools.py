"""`dflash serve` end to end where the model's answer is known in advance: a tiny Qwen3 scripted to
write a tool call (thinking off), a think block then a reply (thinking on), or one token forever.
The server runs with an API key (given with the newline a key read from a file keeps), a CORS origin, an
allowed proxy Host and a one-request queue; another with a 1 s timeout."""
from __future__ import annotations

import json
import threading

import openai
import pytest

from dflash_cli.cli import main

from .serving import ServerProcess, write_scripted_pair

KEY = "s3cret-key"
ORIGIN = "http://app.example"
PROXY = "api.example.com"
# Token ids in the real Qwen3 tokenizer. The think-off prompt ends in "\n\n" (271), the think-on
# prompt in "\n" (198); " loop" (6337) repeats itself.
TOOL_CHAIN = [271, 151657, 4913, 606, 3252, 455, 69364, 2198, 16370, 22317, 13778, 788, 18, 3417, 151658, 151645]
TOOL_TEXT = '<tool_call>{"name":"get_weather","arguments":{"days":3}}</tool_call>'
# <think>Sunny today.</think>Hello there!
THINK_CHAIN = [198, 151667, 50, 27297, 3351, 13, 151668, 9707, 1052, 0, 151645]
LOOP = [6337, 6337]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast for some days",
                                           "parameters": {"type": "object",
                                                          "properties": {"days": {"type": "integer"}}}}}]
USER = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return write_scripted_pair(tmp_path_factory.mktemp("scripted"), [TOOL_CHAIN, THINK_CHAIN, LOOP])


@pytest.fixture(scope="module")
def server(scripted):
    t, d = scripted
    s = ServerProcess("--target", t, "--drafter", d, "--device", "cpu", "--cors-origin", ORIGIN, "--allow-host", PROXY,
                      "--max-queue", 1, "--max-body-mb", 0.01, env={"DFLASH_API_KEY": KEY + "\n"})
    s.client(api_key=KEY).chat.completions.create(model=s.model, messages=USER, max_tokens=2)  # warm up
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client(api_key=KEY)


def test_tool_call_comes_back_as_tool_calls(server, client):
    r = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"days": 3}


def test_tool_call_streams_name_first_then_arguments_piece_by_piece(server, client):
    chunks = list(client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather" and calls[0].index == 0
    pieces = [tc.function.arguments for tc in calls if tc.function.arguments]
    assert len(pieces) > 1 and "".join(pieces) == '{"days":3}'
    assert all(tc.id is None and tc.function.name is None for tc in calls[1:])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_without_tools_the_same_text_is_plain_content(server, client):
    r = client.chat.completions.create(model=server.model, messages=USER)
    assert r.choices[0].message.content == TOOL_TEXT and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    r = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == TOOL_TEXT


def test_tool_results_are_rendered_back_through_the_template(server, client):
    first = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS).choices[0].message
    history = USER + [first.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"forecast": "sun"}'}]
    r = client.chat.completions.create(model=server.model, messages=history, tools=TOOLS)
    assert r.usage.prompt_tokens > 0 and r.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("how", [{"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
                                 {"reasoning_effort": "high"}], ids=["enable_thinking", "reasoning_effort"])
def test_reasoning_is_split_from_the_reply(server, client, how):
    r = client.chat.completions.create(model=server.model, messages=USER, **how)
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == "Sunny today." and message.content == "Hello there!"
    chunks = list(client.chat.completions.create(model=server.model, messages=USER, stream=True, **how))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("Sunny today.", "Hello there!")
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not (d.model_extra or {}).get("reasoning_content") for d in deltas[first_content:])


def test_thinking_off_by_request_and_by_default(server, client):
    for kw in ({}, {"reasoning_effort": "none"}):
        message = client.chat.completions.create(model=server.model, messages=USER, **kw).choices[0].message
        assert message.content == TOOL_TEXT and "reasoning_content" not in (message.model_extra or {})


def test_api_key_is_required_on_v1_only(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key=KEY[:-1]).models.list()
    assert e.value.body["code"] == "invalid_api_key"
    status, headers, _ = server.request("GET", "/v1/models")  # no key at all
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert server.request("GET", "/health")[0] == 200
    assert server.client(api_key=KEY).models.list().data[0].id == server.model


def test_cors_only_for_the_given_origin(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    _, headers, _ = server.request("GET", "/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert headers["access-control-allow-origin"] == ORIGIN
    _, headers, _ = server.request("GET", "/v1/models", headers={"Origin": "http://other.example",
                                                                "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in headers


def test_cors_preflight_of_the_official_js_sdk_is_allowed(server):
    """openai-node in a browser sends x-stainless-* (and openai-beta) on every request (B2)."""
    asked = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-retry-count,openai-beta"
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert set(headers["access-control-allow-headers"].lower().split(",")) >= set(asked.split(","))
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://other.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked})
    assert status == 400 and "access-control-allow-origin" not in headers


def test_allow_host_adds_a_proxy_name_and_nothing_else(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in (PROXY, f"{PROXY}:443", "API.Example.COM", "localhost", f"127.0.0.1:{server.port}"):
        assert server.request("GET", "/v1/models", headers={**auth, "Host": host})[0] == 200, host
    for host in ("attacker.example", f"{PROXY}.attacker.example", f"x.{PROXY}"):
        status, _, body = server.request("GET", "/v1/models", headers={**auth, "Host": host})
        assert (status, body["error"]["code"]) == (403, "host_not_allowed"), host


def test_a_full_queue_answers_503_with_retry_after_and_nothing_hangs(server, client):
    results: list = [None] * 8
    started = threading.Event()

    def long_one() -> None:
        stream = client.completions.create(model=server.model, prompt=" loop", max_tokens=120, stream=True)
        for i, _ in enumerate(stream):
            if i == 1:
                started.set()  # the engine is busy with this one now
        results[0] = "long"

    def short_one(i: int) -> None:
        try:
            r = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS)
            results[i] = r.choices[0].finish_reason
        except openai.APIStatusError as e:
            results[i] = (e.status_code, e.response.headers.get("retry-after"), e.body["code"])

    threads = [threading.Thread(target=long_one)]
    threads[0].start()
    assert started.wait(60)
    threads += [threading.Thread(target=short_one, args=(i,)) for i in range(1, 8)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    refused = [r for r in results if isinstance(r, tuple)]
    assert results[0] == "long" and results.count("tool_calls") >= 1 and len(refused) >= 5
    assert all(code == 503 and int(after) >= 1 and kind == "queue_full" for code, after, kind in refused)
    assert results.count("tool_calls") + len(refused) == 7
    assert client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS).choices[0].finish_reason


@pytest.mark.slow
def test_timeout_ends_a_request_with_an_error_and_cancels_it(scripted):
    t, d = scripted
    server = ServerProcess("--target", t, "--drafter", d, "--device", "cpu", "--timeout", 1)
    try:
        client = server.client()
        with pytest.raises(openai.APIStatusError) as e:  # 1000 tokens take longer than 1 s
            client.completions.create(model=server.model, prompt=" loop", max_tokens=1000)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        assert server.wait_for(lambda l: "generation cancelled (timeout)" in l, 10)
        text = []  # the engine is warm now: the stream starts, then ends with an error event
        with pytest.raises(openai.APIError, match="--timeout 1 s"):
            for chunk in client.completions.create(model=server.model, prompt=" loop", max_tokens=1000, stream=True):
                text.append(chunk.choices[0].text if chunk.choices else "")
        assert "".join(text).startswith(" loop loop")
        assert client.chat.completions.create(model=server.model, messages=USER, max_tokens=3).choices
    finally:
        server.stop()


def test_a_body_over_the_limit_is_refused_even_without_content_length(server):
    def chunks():
        for _ in range(20):
            yield b" " * 1024  # 20 KiB of whitespace, chunked: over --max-body-mb 0.01
    import http.client

    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=chunks(), encode_chunked=True,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()


def test_exposed_host_needs_a_key_and_engine_only_pairs_point_to_the_hand_off(capsys, scripted):
    t, d = scripted
    assert main(["serve", "--target", str(t), "--drafter", str(d), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "--no-auth" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "kimi-k2.5"]) == 1
    assert "`dflash serve --engine sglang kimi-k2.5`" in capsys.readouterr().err
    assert main(["serve", "--target", str(t), "--drafter", str(d), "--tp", "2"]) == 2
    assert "--engine" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--max-body-mb", "nan"], "--max-body-mb must be"),  # B7
    (["--max-body-mb", "inf"], "--max-body-mb must be"),
    (["--max-body-mb", "-1"], "--max-body-mb must be"),
    (["--max-body-mb", "1e-9"], "--max-body-mb must be"),
    (["--timeout", "inf"], "--timeout must be a finite number"),
    (["-b", "9"], "--block-size must be between 1 and the drafter's 4, got 9"),  # B9
    (["--api-key", "   "], "--api-key is only whitespace"),  # B15
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "k\x01y"], "--api-key must be printable ASCII"),
    (["--allow-host", "http://x.example/"], "--allow-host takes a host name"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flags_are_one_line_and_exit_2_before_loading(capsys, scripted, flags, words):
    t, d = scripted
    assert main(["serve", "--target", str(t), "--drafter", str(d), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "loading" not in err, err


@pytest.mark.parametrize("flags, words", [
    (["qwen3-8b", "--block-size", "17"], "--block-size must be between 2 and the drafter's 16, got 17"),  # B16
    (["qwen3-8b", "--timeout", "5"], "--timeout applies to dflash's own engine"),
    (["qwen3-8b", "--max-body-mb", "2"], "--max-body-mb applies to dflash's own engine"),
    (["qwen3-8b", "--max-queue", "3"], "--max-queue applies to dflash's own engine"),
    (["qwen3-8b", "--reasoning-effort", "low"], "--reasoning-effort applies to dflash's own engine"),
    (["qwen3-8b", "--allow-host", "a.example"], "--allow-host applies to dflash's own engine"),
    (["qwen3-8b", "--tree-budget", "8"], "--tree-budget applies to dflash's own engine"),
    (["demo"], "the demo pair runs on dflash's own engine"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_engine_hand_off_refuses_what_it_would_ignore(capsys, flags, words):
    assert main(["serve", "--engine", "vllm", *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_a_padded_api_key_is_stripped_for_the_hand_off_too(capsys):
    assert main(["serve", "--engine", "vllm", "qwen3-8b", "--dry-run", "--api-key", " k1\n"]) == 0
    assert capsys.readouterr().out.rstrip().endswith('--api-key "$DFLASH_API_KEY"')


def test_ctrl_c_exits_130_even_where_sigint_was_inherited_ignored(scripted):
    """A server started in the background by a script inherits SIGINT ignored; `kill -INT` still stops it
    (uvicorn catches the signal itself), and the exit is the documented 130, not 0 (B17)."""
    import signal

    t, d = scripted
    s = ServerProcess("--target", t, "--drafter", d, "--device", "cpu")
    assert s.request("GET", "/health")[0] == 200  # uvicorn answers: its signal handlers are in place
    s.proc.send_signal(signal.SIGINT)  # the default disposition (the fixture's preexec_fn)
    assert s.proc.wait(20) == 130
    ignored = ServerProcess("--target", t, "--drafter", d, "--device", "cpu",
                            preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert ignored.request("GET", "/health")[0] == 200
    ignored.proc.send_signal(signal.SIGINT)
    assert ignored.proc.wait(20) == 130


def test_dflash_run_splits_the_think_block_off_the_answer(scripted, capsys):
    """The same scripted think block through `dflash run`: the answer alone on stdout, the reasoning on
    stderr (dimmed in a terminal), and both apart in --json."""
    t, d = scripted
    args = ["run", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-p", USER[0]["content"], "--think"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "Hello there!" and "Sunny today." in err and "<think>" not in out + err
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["reasoning"], result["text"]) == ("Sunny today.", "Hello there!")
    assert main(args + ["-q"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "Hello there!" and err == ""
