"""`dflash serve` as a client meets it: a real server process on a loopback port, driven by the official
`openai` client. Answers equal `dflash run`'s for the same prompt and seed, streamed or not; clients
queue, leave mid-stream, and send garbage, and the server keeps answering."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

import openai
import pytest

from dflash_cli import loader
from dflash_cli.cli import main
from dflash_cli.engine import Engine, Request
from dflash_cli.generate import Stats, stream_text
from dflash_cli.prompt import encode_chat
from dflash_cli.sampling import SamplingParams
from dflash_cli.serve.prompting import Prompt
from dflash_cli.serve.worker import EngineWorker, Finished, Job, QueueFull, Started, Text

from .serving import ServerProcess

BLOCK = 4  # small blocks keep the 151936-token vocabulary cheap on a CPU; still speculative


@pytest.fixture(scope="module")
def server(qwen3_chat_pair):
    t, d = qwen3_chat_pair
    s = ServerProcess("--target", t, "--drafter", d, "-b", BLOCK, "--device", "cpu")
    s.client().chat.completions.create(model=s.model, messages=[{"role": "user", "content": "warm up"}], max_tokens=2)
    yield s
    assert s.stop() == 130  # Ctrl-C: the documented exit
    assert s.proc.stdout.read() == ""  # stdout is for answers; a server writes its log to stderr


def ask(server, text: str, **kw) -> openai.types.chat.ChatCompletion:
    return server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": text}],
                                                   **kw)


def ask_streamed(server, text: str, **kw) -> tuple[str, list]:
    chunks = list(server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": text}], stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def dflash_run(capsys, pair, *args) -> str:
    t, d = pair
    code = main(["run", "--target", str(t), "--drafter", str(d), "-b", str(BLOCK), "-q", *map(str, args)])
    out = capsys.readouterr().out
    assert code == 0
    return out.removesuffix("\n")


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [server.model] == ["qwen3-chat"]
    assert server.client().models.retrieve(server.model).id == server.model
    status, _, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("sampling, flags", [
    ({}, []),
    ({"temperature": 0.8, "seed": 5}, ["-t", 0.8, "--seed", 5]),
    ({"temperature": 1.0, "top_p": 0.9, "seed": 11, "extra_body": {"top_k": 50, "min_p": 0.02}},
     ["-t", 1.0, "--top-p", 0.9, "--top-k", 50, "--min-p", 0.02, "--seed", 11]),
], ids=["greedy", "sampled", "sampled-top-p-top-k-min-p"])
def test_chat_answer_equals_dflash_run_streamed_or_not(server, capsys, qwen3_chat_pair, sampling, flags):
    expected = dflash_run(capsys, qwen3_chat_pair, "-p", "Tell me a story", "-n", 12, *flags)
    whole = ask(server, "Tell me a story", max_tokens=12, **sampling)
    streamed, _ = ask_streamed(server, "Tell me a story", max_tokens=12, **sampling)
    assert whole.choices[0].message.content == streamed == expected != ""
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    if "seed" in sampling:
        assert whole.model_extra["dflash"]["seed"] == sampling["seed"]


def test_sampling_without_a_seed_reports_the_seed_that_reproduces_it(server):
    first = ask(server, "Roll the dice", max_tokens=8, temperature=1.0)
    seed = first.model_extra["dflash"]["seed"]
    again = ask(server, "Roll the dice", max_tokens=8, temperature=1.0, seed=seed)
    assert isinstance(seed, int) and again.choices[0].message.content == first.choices[0].message.content


def test_stop_string_and_completions_equal_dflash_run(server, capsys, qwen3_chat_pair):
    full = ask(server, "Tell me a story", max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = ask(server, "Tell me a story", max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == dflash_run(capsys, qwen3_chat_pair, "-p", "Tell me a story", "-n", 12,
                                                        "--stop", stop)
    client = server.client()
    whole = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=10)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=10, stream=True) if c.choices)
    assert whole.choices[0].text == streamed == dflash_run(capsys, qwen3_chat_pair, "-p", "Once upon a time", "--raw",
                                                           "-n", 10)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 10


def test_stream_shape_usage_and_speculation_stats(server):
    _, chunks = ask_streamed(server, "Count to ten", max_tokens=9, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    final, usage_chunk = chunks[-2], chunks[-1]
    assert final.choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 9
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 9
    assert all(c.usage is None for c in chunks[:-1])
    stats = final.model_extra["dflash"]
    assert stats["block_size"] == BLOCK and sum(stats["acceptance_histogram"].values()) == stats["iterations"] > 0
    assert 1 <= stats["mean_acceptance_length"] <= BLOCK and stats["tokens_per_second"] > 0
    assert stats["prefill_seconds"] > 0
    assert usage_chunk.model_extra["dflash"] == stats  # the README's "on the last streamed chunk" (B17)
    assert stats["tree_budget"] == 0  # no --tree-budget: the drafter's chain
    assert stats["tree_budget_histogram"] == {"0": stats["iterations"]}  # every iteration verified the chain
    assert server.wait_for(lambda l: "200 · " in l and "tok/s · τ" in l and "9 generated" in l, 10)


def test_a_tree_budget_server_reports_its_budget_and_gives_dflash_runs_answer(capsys, qwen3_chat_pair):
    """`serve --tree-budget N`: the `dflash` object reports the budget used (as `run --json` and bench do),
    whole and streamed, and the answer is `dflash run --tree-budget N`'s (and the chain's: lossless)."""
    t, d = qwen3_chat_pair
    s = ServerProcess("--target", t, "--drafter", d, "-b", BLOCK, "--device", "cpu", "--tree-budget", 6)
    try:
        whole = ask(s, "Tell me a story", max_tokens=10)
        _, chunks = ask_streamed(s, "Tell me a story", max_tokens=10, stream_options={"include_usage": True})
    finally:
        assert s.stop() == 130
    stats = whole.model_extra["dflash"]
    assert stats["tree_budget"] == 6 and stats["block_size"] == BLOCK and stats["iterations"] > 0
    assert chunks[-1].model_extra["dflash"]["tree_budget"] == 6
    assert stats["tree_budget_histogram"] == {"6": stats["iterations"]}  # budget per iteration (auto may vary it)
    expected = dflash_run(capsys, qwen3_chat_pair, "-p", "Tell me a story", "-n", 10, "--tree-budget", 6)
    assert whole.choices[0].message.content == expected == dflash_run(capsys, qwen3_chat_pair, "-p",
                                                                      "Tell me a story", "-n", 10) != ""


def test_next_turn_reuses_the_cached_prefix_and_still_gives_a_fresh_engines_answer(server, capsys, qwen3_chat_pair,
                                                                                  tmp_path):
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    first = server.client().chat.completions.create(model=server.model, messages=history, max_tokens=6)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Another one."}]
    second = server.client().chat.completions.create(model=server.model, messages=history, max_tokens=6)
    tokenizer = loader.load_tokenizer(qwen3_chat_pair[0])
    turn1, turn2 = encode_chat(tokenizer, history[:2]), encode_chat(tokenizer, history)
    shared = next(i for i, (a, b) in enumerate(zip(turn1, turn2)) if a != b)  # the template drops turn 1's think block
    assert second.usage.prompt_tokens_details.cached_tokens == shared > len(turn1) // 2
    prompts = tmp_path / "turn2.jsonl"
    prompts.write_text(json.dumps(history) + "\n")
    fresh = json.loads(dflash_run(capsys, qwen3_chat_pair, "--prompt-file", prompts, "-n", 6, "--json"))
    assert second.choices[0].message.content == fresh["text"]


def test_eight_concurrent_clients_each_get_their_own_complete_answer(server):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [ask(server, p, max_tokens=6).choices[0].message.content for p in prompts]
    results: dict[tuple[int, int], str] = {}
    barrier = threading.Barrier(8)

    def client(i: int) -> None:
        barrier.wait()
        for r in range(3):
            if r % 2:
                results[i, r] = ask_streamed(server, prompts[i], max_tokens=6)[0]
            else:
                results[i, r] = ask(server, prompts[i], max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert results == {(i, r): alone[i] for i in range(8) for r in range(3)}


CANCELLED = re.compile(r"generation cancelled \(client disconnected\) after (\d+) tokens, (\d+) of them after")
KILLED_CLIENT = r"""
import http.client, json, sys, time
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
stream = sys.argv[4] == "stream"
c.request("POST", "/v1/chat/completions", body=json.dumps({"model": sys.argv[3], "stream": stream, "max_tokens": 900,
          "messages": [{"role": "user", "content": "Write a very long story."}]}),
          headers={"Content-Type": "application/json"})
if stream:
    for line in c.getresponse():
        if b'"content": "' in line and b'"content": ""' not in line:
            break
print("waiting", flush=True)
time.sleep(600)
"""


def generating(server) -> bool:
    return server.request("GET", "/health")[2]["generating"]


@pytest.mark.parametrize("mode", ["stream", "whole"])
def test_client_killed_mid_answer_frees_the_engine_within_one_iteration(server, mode):
    mark = len(server.lines)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.host, server.port, server.model, mode],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        deadline = time.monotonic() + 30
        while not generating(server) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    line = server.wait_for(lambda l: CANCELLED.search(l) is not None, 30, start=mark)
    assert line is not None, "\n".join(server.lines[mark:])
    generated, late = map(int, CANCELLED.search(line).groups())
    assert generated < 900 and late <= BLOCK  # the engine stopped at the next iteration
    deadline = time.monotonic() + 5  # the log line is written just before the worker lets go of the job
    while generating(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.request("GET", "/health")[2] == {"status": "ok", "generating": False, "queued": 0}
    assert ask(server, "Still there?", max_tokens=3).choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def chat_model(qwen3_chat_pair):
    return loader.load(*qwen3_chat_pair, device="cpu")


def test_cancel_stops_the_generation_at_the_next_iteration(chat_model):
    """The same contract without HTTP: a job cancelled while it streams runs at most one more
    iteration, and the engine serves the next job from a consistent cache."""
    m = chat_model
    engine = Engine(m.target, m.drafter, block_size=BLOCK, max_context=m.max_context)
    worker = EngineWorker(m, engine, max_queue=4, log=lambda line: None)
    assert worker.start() is None  # no CUDA graphs to capture on a CPU
    ids = encode_chat(m.tokenizer, [{"role": "user", "content": "Go on and on."}])

    async def run(max_tokens: int, cancel_after_text: bool):
        job = Job(lambda tokenizer: Prompt(ids), max_tokens, SamplingParams())
        worker.submit(job)
        events = []
        while not events or not isinstance(events[-1], Finished):
            events.append(await asyncio.wait_for(job.events.get(), 60))
            if cancel_after_text and isinstance(events[-1], Text):
                job.cancel("test")
                cancel_after_text = False
        return job, events

    try:
        job, events = asyncio.run(run(800, True))
        fin = events[-1]
        assert fin.finish == "cancelled" and fin.stats.generated - job.generated_at_cancel <= BLOCK
        assert fin.stats.generated < 800
        _, again = asyncio.run(run(10, False))
        fresh = Engine(m.target, m.drafter, block_size=BLOCK, max_context=m.max_context)
        expected = "".join(c.text for c in stream_text(fresh, m.tokenizer, Request(ids, 10, m.stop_token_ids),
                                                       Stats()))
        assert "".join(e.text for e in again if isinstance(e, Text)) == expected != ""
        assert again[-1].finish == "length"
    finally:
        worker.stop()


def test_max_queue_counts_the_requests_waiting_behind_the_running_one(chat_model):
    m = chat_model
    worker = EngineWorker(m, Engine(m.target, m.drafter, block_size=BLOCK, max_context=m.max_context), max_queue=0,
                          log=lambda line: None)
    worker.start()
    ids = encode_chat(m.tokenizer, [{"role": "user", "content": "Go on."}])

    async def run():
        first = Job(lambda tokenizer: Prompt(ids), 300, SamplingParams())
        worker.submit(first)  # an idle server takes one request even with --max-queue 0
        assert isinstance(await asyncio.wait_for(first.events.get(), 60), Started)
        with pytest.raises(QueueFull) as full:
            worker.submit(Job(lambda tokenizer: Prompt(ids), 5, SamplingParams()))
        assert full.value.retry_after >= 1 and worker.waiting == 0 and worker.busy
        first.cancel("test")
        while not isinstance(await asyncio.wait_for(first.events.get(), 60), Finished):
            pass
        second = Job(lambda tokenizer: Prompt(ids), 5, SamplingParams())
        worker.submit(second)  # the place is free as soon as the answer is
        while not isinstance(event := await asyncio.wait_for(second.events.get(), 60), Finished):
            pass
        return event

    try:
        assert asyncio.run(run()).finish == "length"
    finally:
        worker.stop()


def test_bad_requests_get_their_4xx_and_the_server_keeps_answering(server):
    client = server.client()
    user = [{"role": "user", "content": "hi"}]

    def raw(body: bytes, **headers):
        return server.request("POST", "/v1/chat/completions", body, headers)

    cases = [
        ("malformed JSON", lambda: raw(b'{"messages": [')[::2], 400),
        ("not UTF-8", lambda: raw(b'{"messages": "\xff"}')[::2], 400),
        ("a JSON list", lambda: raw(b"[1, 2]")[::2], 400),
        ("unknown model", lambda: client.chat.completions.create(model="gpt-4o", messages=user), 404),
        ("n=2", lambda: client.chat.completions.create(model=server.model, messages=user, n=2), 400),
        ("negative max_tokens", lambda: client.chat.completions.create(model=server.model, messages=user,
                                                                       max_tokens=-1), 400),
        ("huge max_tokens", lambda: client.chat.completions.create(model=server.model, messages=user,
                                                                   max_tokens=10**9), 400),
        ("oversized body", lambda: _oversized(server), 413),
        ("wrong method", lambda: server.request("GET", "/v1/chat/completions")[::2], 405),
        ("unknown route", lambda: server.request("GET", "/v2/nothing")[::2], 404),
    ]
    for name, call, status in cases:
        try:
            got, body = call()
        except openai.APIStatusError as e:
            got, body = e.status_code, e.response.json()
        assert got == status, name
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], name
        assert ask(server, "ok?", max_tokens=1).choices[0].message.content is not None, f"server down after {name}"
    status, _, body = server.request("POST", "/v1/chat/completions", {"messages": user, "max_tokens": 10**9})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def _oversized(server) -> tuple[int, dict]:
    """Headers announce 9 MiB; the server answers before reading a byte of it."""
    import http.client

    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=30)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(9 * 2**20))
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_no_cors_headers_unless_asked(server):
    _, headers, _ = server.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert not any(h.startswith("access-control-") for h in headers)
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions",
                                        headers={"Origin": "http://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert status == 405 and not any(h.startswith("access-control-") for h in headers)


def test_start_up_line_names_the_url_and_the_model(server):
    line = server.wait_for(lambda l: "serving" in l, 1)
    assert f"serving qwen3-chat at http://127.0.0.1:{server.port}/v1" in line
    assert f"block size {BLOCK}" in line and "cpu" in line


def test_a_port_in_use_is_one_line_before_any_loading(server, capsys, qwen3_chat_pair):
    t, d = qwen3_chat_pair
    assert main(["serve", "--target", str(t), "--drafter", str(d), "--port", server.port]) == 1
    err = capsys.readouterr().err
    assert err == f"Error: cannot listen on 127.0.0.1:{server.port}: Address already in use\n"


# ---- hostile input (issue 22: B1, B3, B5, B17) ---------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = {"Content-Type": "application/json"}


def _chat(**extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}).encode()


def _raw_socket(server, data: bytes, *, leave: bool = False) -> int | None:
    """Bytes written straight to the server's socket: the status it answers, or None where the client
    leaves (`leave`) before its body is complete."""
    import socket

    with socket.create_connection((server.host, int(server.port)), timeout=30) as s:
        s.sendall(data)
        if leave:
            time.sleep(0.3)
            return None
        reply = b""
        while b"\r\n" not in reply:
            piece = s.recv(4096)
            if not piece:
                break
            reply += piece
        return int(reply.split()[1])


# (name, method, path, body, headers): each a client error, never a 500.
HOSTILE = [
    ("malformed JSON", "POST", CHAT, b'{"messages": [', JSON),
    ("empty body", "POST", CHAT, b"", JSON),
    ("not UTF-8", "POST", CHAT, b'{"messages": "\xff"}', JSON),
    ("a JSON list", "POST", CHAT, b"[1, 2]", JSON),
    ("a JSON string", "POST", CHAT, b'"hi"', JSON),
    ("JSON null", "POST", CHAT, b"null", JSON),
    ("NaN literal", "POST", CHAT, _chat()[:-1] + b', "temperature": NaN}', JSON),
    ("Infinity literal", "POST", CHAT, b'{"messages": [], "max_tokens": Infinity}', JSON),
    ("temperature 1e39", "POST", CHAT, _chat(temperature=1e39), JSON),
    ("temperature 1e400 (inf)", "POST", CHAT, _chat()[:-1] + b', "temperature": 1e400}', JSON),
    ("temperature a 400-digit integer", "POST", CHAT, _chat(temperature=10**400), JSON),
    ("temperature -1", "POST", CHAT, _chat(temperature=-1), JSON),
    ("temperature a string", "POST", CHAT, _chat(temperature="hot"), JSON),
    ("top_k 2^63", "POST", CHAT, _chat(temperature=1, top_k=2**63), JSON),
    ("top_k 10^19", "POST", CHAT, _chat(temperature=1, top_k=10**19), JSON),
    ("top_k -2", "POST", CHAT, _chat(top_k=-2), JSON),
    ("top_k 1.5", "POST", CHAT, _chat(top_k=1.5), JSON),
    ("top_p 0", "POST", CHAT, _chat(top_p=0), JSON),
    ("top_p 1e-50 (0 in float32)", "POST", CHAT, _chat(temperature=1, top_p=1e-50), JSON),
    ("top_p 2", "POST", CHAT, _chat(top_p=2), JSON),
    ("min_p 1", "POST", CHAT, _chat(min_p=1), JSON),
    ("seed 2^70", "POST", CHAT, _chat(temperature=1, seed=2**70), JSON),
    ("seed a string", "POST", CHAT, _chat(seed="x"), JSON),
    ("max_tokens 0", "POST", CHAT, _chat(max_tokens=0), JSON),
    ("max_tokens -1", "POST", CHAT, _chat(max_tokens=-1), JSON),
    ("max_tokens beyond the context", "POST", CHAT, _chat(max_tokens=10**9), JSON),
    ("max_tokens of 5000 digits", "POST", CHAT, _chat()[:-1] + b', "max_completion_tokens": ' + b"9" * 5000 + b"}",
     JSON),
    ("max_tokens and max_completion_tokens 0", "POST", CHAT, _chat(max_tokens=8, max_completion_tokens=0), JSON),
    ("lone surrogate in content", "POST", CHAT,
     b'{"messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 2}', JSON),
    ("lone surrogate in a key", "POST", CHAT, _chat()[:-1] + b', "\\udfff": 1}', JSON),
    ("lone surrogate in the model", "POST", CHAT, _chat()[:-1] + b', "model": "\\ud83d"}', JSON),
    ("lone surrogate in a stop string", "POST", CHAT, _chat()[:-1] + b', "stop": ["\\udc00"]}', JSON),
    ("nested 10^5 deep", "POST", CHAT, b"[" * 100_000 + b"]" * 100_000, JSON),
    ("nested 50000 deep in messages", "POST", CHAT, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON),
    ("nested 200 deep in user", "POST", CHAT, _chat()[:-1] + b', "user": ' + b"[" * 200 + b"]" * 200 + b"}", JSON),
    ("unknown field", "POST", CHAT, _chat(frobnicate=True), JSON),
    ("unknown field with a 100 KB name", "POST", CHAT, _chat(**{"x" * 100_000: 1}), JSON),
    ("n=2", "POST", CHAT, _chat(n=2), JSON),
    ("logprobs", "POST", CHAT, _chat(logprobs=True), JSON),
    ("messages empty", "POST", CHAT, b'{"messages": []}', JSON),
    ("messages an object", "POST", CHAT, b'{"messages": {"role": "user"}}', JSON),
    ("a wizard's role", "POST", CHAT, b'{"messages": [{"role": "wizard", "content": "x"}]}', JSON),
    ("content a number", "POST", CHAT, b'{"messages": [{"role": "user", "content": 5}]}', JSON),
    ("an image part", "POST", CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', JSON),
    ("stop a list of numbers", "POST", CHAT, _chat(stop=[1, 2]), JSON),
    ("17 stop strings", "POST", CHAT, _chat(stop=[str(i) for i in range(17)]), JSON),
    ("stream a string", "POST", CHAT, _chat(stream="yes"), JSON),
    ("stream_options without stream", "POST", CHAT, _chat(stream_options={"include_usage": True}), JSON),
    ("tools not a list", "POST", CHAT, _chat(tools={"x": 1}), JSON),
    ("tool_choice required", "POST", CHAT, _chat(tool_choice="required"), JSON),
    ("chat_template_kwargs a list", "POST", CHAT, _chat(chat_template_kwargs=[1]), JSON),
    ("another model", "POST", CHAT, _chat(model="gpt-4o"), JSON),
    ("prompt token id beyond the vocabulary", "POST", COMPLETIONS, b'{"prompt": [1, 2, 999999999]}', JSON),
    ("prompt token id 2^70", "POST", COMPLETIONS, json.dumps({"prompt": [2**70]}).encode(), JSON),
    ("prompt token id negative", "POST", COMPLETIONS, b'{"prompt": [-1]}', JSON),
    ("prompt an object", "POST", COMPLETIONS, b'{"prompt": {"a": 1}}', JSON),
    ("Content-Type text/plain", "POST", CHAT, _chat(), {"Content-Type": "text/plain"}),
    ("Content-Type form", "POST", CHAT, _chat(), {"Content-Type": "application/x-www-form-urlencoded"}),
    ("Content-Type multipart", "POST", COMPLETIONS, b'{"prompt": "x"}', {"Content-Type": "multipart/form-data"}),
    ("a Host that is not this server", "POST", CHAT, _chat(), {**JSON, "Host": "attacker.example"}),
    ("a Host with a port that is not this server", "GET", "/v1/models", None, {"Host": "attacker.example:8000"}),
    ("a Host ending in a loopback name", "GET", "/health", None, {"Host": "localhost.attacker.example"}),
    ("an empty Host", "GET", "/v1/models", None, {"Host": ""}),
    ("no Content-Type", "POST", CHAT, _chat(), {"Content-Type": None}),
    ("a body over --max-body-mb", "POST", CHAT, b"", {**JSON, "Content-Length": str(8 * 2**20 + 1)}),
    ("GET on a POST route", "GET", CHAT, None, {}),
    ("DELETE on /v1/models", "DELETE", "/v1/models", None, {}),
    ("an unknown route", "GET", "/v2/nothing", None, {}),
    ("an unknown model's card", "GET", "/v1/models/gpt-4o", None, {}),
    ("a percent-encoded lone surrogate as a model's name", "GET", "/v1/models/%ED%A0%80", None, {}),
]


def test_hostile_input_sweep_gets_4xx_json_errors_and_the_server_keeps_serving(server):
    """Every hostile body or header gets a 4xx error in OpenAI's JSON shape; a good request succeeds
    after each; and the server's log never shows a 500 or a traceback."""
    first_line, wrong = len(server.lines), []
    assert len(HOSTILE) >= 40
    for name, method, path, body, headers in HOSTILE:
        status, _, payload = server.request(method, path, body, headers)
        error = payload.get("error") if isinstance(payload, dict) else None
        if not (400 <= status < 500 and isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
                and 0 < len(error["message"]) <= 501):
            wrong.append((name, status, str(payload)[:120]))
        assert ask(server, "ok?", max_tokens=1).choices[0].message.content is not None, f"server down after {name}"
    assert wrong == [], "\n".join(map(str, wrong))
    # What plain HTTP clients cannot send: no Host at all (HTTP/1.0), and a client that leaves mid-upload.
    assert _raw_socket(server, b"GET /v1/models HTTP/1.0\r\n\r\n") == 403
    assert _raw_socket(server, f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                               "Content-Length: 1000\r\n\r\n{\"messages\": ".encode(), leave=True) is None
    assert server.wait_for(lambda l: "client disconnected" in l, 10, first_line)
    assert ask(server, "still there?", max_tokens=1).choices[0].message.content is not None
    log = server.lines[first_line:]
    assert not any("Traceback" in line or " 500 " in line or "internal error" in line for line in log), log


def test_a_refused_request_names_the_field_and_the_fix(server):
    cases = [
        (_chat(temperature=1e39), 400, "temperature", "[0, 100]"),
        (_chat(temperature=1, top_k=2**63), 400, "top_k", "2147483647"),
        (_chat(max_tokens=8, max_completion_tokens=0), 400, "max_completion_tokens", "at least 1"),
        (b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', 400, "messages", "lone surrogate"),
        (_chat(model="gpt-4o"), 404, "model", "serves 'qwen3-chat'"),
    ]
    for body, status, param, words in cases:
        got, _, payload = server.request("POST", CHAT, body)
        assert (got, payload["error"]["param"]) == (status, param) and words in payload["error"]["message"], payload
    got, _, payload = server.request("POST", CHAT, _chat(), {"Content-Type": "text/plain"})
    assert got == 415 and "Content-Type: application/json" in payload["error"]["message"]
    got, _, payload = server.request("GET", "/v1/models", headers={"Host": "attacker.example:8000"})
    assert got == 403 and payload["error"]["code"] == "host_not_allowed" and "--allow-host" in payload["error"]["message"]


def test_loopback_names_and_the_bound_address_are_this_server(server):
    for host in ("localhost", f"localhost:{server.port}", "LOCALHOST.", "127.0.0.1", f"127.0.0.1:{server.port}",
                 "[::1]", f"[::1]:{server.port}", "127.0.0.2"):
        assert server.request("GET", "/v1/models", headers={"Host": host})[0] == 200, host
    assert server.request("POST", CHAT, _chat(), {"Content-Type": "application/json; charset=utf-8"})[0] == 200


def test_a_tiny_temperature_is_greedy(server):
    greedy = ask(server, "Tell me a story", max_tokens=8)
    for t in (1e-50, 1e-40, 1e-31):
        tiny = ask(server, "Tell me a story", max_tokens=8, temperature=t)
        assert tiny.choices[0].message.content == greedy.choices[0].message.content, t
        assert tiny.model_extra["dflash"]["seed"] is None  # no seed: nothing was drawn


def test_a_completion_prompt_over_the_context_blames_prompt(server):
    limit = int(re.search(r"context (\d+)", server.wait_for(lambda l: "serving" in l, 1)).group(1))
    status, _, payload = server.request("POST", COMPLETIONS, {"prompt": [1] * limit, "max_tokens": 1})
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    assert payload["error"]["param"] == "prompt"
