"""The demo as a chat: an answer is one story (it ends at stories260K's end-of-story BOS), and a
conversation longer than the 512-token context goes on, its oldest turns left out and said so once.
Piped, stdout holds the answers only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_cli import loader, registry
from dflash_cli.chat import ChatSession
from dflash_cli.cli import main
from dflash_cli.engine import Engine
from dflash_cli.errors import DflashError
from dflash_cli.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
LEFT_OUT = "its oldest turns are left out"


@pytest.fixture
def demo_session():
    m = loader.load(*registry.demo_dirs(), device="cpu")
    m.stop_token_ids = m.stop_token_ids | {registry.DEMO_STORY_END}  # as `dflash chat demo` loads it
    return ChatSession(m, Engine(m.target, m.drafter, max_context=m.max_context, adaptive=True))  # as `chat demo`


def test_a_demo_answer_is_one_story(capsys):
    assert main(["run", "demo", "-p", "Once upon a time", "--json", "-q"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["finish_reason"] == "stop" and registry.DEMO_STORY_END not in answer["token_ids"]
    assert answer["generated_tokens"] < 500  # it used to run on to the end of the context


def test_a_demo_chat_with_default_settings_holds_a_conversation(demo_session):
    s = demo_session
    questions = ["Once upon a time", "The dog ran", "A cat sat on the mat", "Then the sun came out", "Lily smiled"]
    for n, q in enumerate(questions, 1):
        answer = "".join(c.text for c in s.ask(q))
        assert answer and s.answers[-1].finish in ("stop", "length")  # greedy stories can loop to the limit
        assert len(s.messages) == 2 * n  # every turn is kept in the transcript
    assert "stop" in {a.finish for a in s.answers}  # stories end
    assert 0 < s.first_shown <= len(s.messages) - 2  # the oldest turns are no longer shown to the model
    assert s.messages[s.first_shown]["role"] == "user"
    assert s.answers[-1].prompt_tokens + 256 <= s.engine.max_context  # room was left for the answer
    assert sum(LEFT_OUT in n for n in s.notices) == 1  # said once
    assert len(s.conversation()) == 2 * len(questions)  # /save writes the whole conversation
    s.command("/clear")
    assert s.first_shown == 0 and s.messages == []


def test_a_message_longer_than_the_context_is_refused_with_advice_that_applies(demo_session):
    with pytest.raises(DflashError) as e:
        list(demo_session.ask("Once upon a time " * 200))
    assert "the context holds 512" in str(e.value) and "--max-context" not in str(e.value)  # 512 is the model's own
    assert demo_session.messages == []


def test_show_prints_every_setting(demo_session):
    s = demo_session
    s.command("/set temperature 0.7")
    s.command("/set seed 5")
    s.command("/system Be kind.")
    shown = s.command("/show").text.splitlines()
    assert shown[:8] == ["temperature = 0.7", "top_p = 1 (off)", "top_k = 0 (off)", "min_p = 0 (off)",
                         "max_tokens = 2048", "seed = 5", "think = off", 'system = "Be kind."']
    assert shown[8].startswith("stories260K · DFlash, block size auto (1…8) · context 512 tokens · 0 messages")
    assert "/show" in s.command("/help").text


def test_loading_one_message_says_one_message(demo_session, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"role": "user", "content": "Hi"}) + "\n")
    assert demo_session.command(f"/load {path}").text == f"loaded 1 message from {path}"


def chat(stdin: bytes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dflash_cli", "chat", "demo", *args], cwd=ROOT, env=ENV,
                          input=stdin, capture_output=True, timeout=600)


def test_a_piped_demo_chat_goes_on_past_the_context_with_stdout_for_answers_only():
    lines = ["Once upon a time", "The dog ran", "/show", "A cat sat on the mat", "Lily smiled", "/stats"]
    p = chat(("\n".join(lines) + "\n").encode(), "--seed", "1")
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, err
    assert "Error" not in err and "Traceback" not in err
    assert err.count(LEFT_OUT) == 1
    for note in ("/help for commands", "tok/s", "temperature = 0", "answers ·", "bye", LEFT_OUT):
        assert note in err and note not in out
    assert out.strip()


def test_windows_line_ends_in_a_piped_chat_are_not_part_of_the_message():
    lf, crlf = chat(b"Once upon a time\nThe cat\n", "-n", "12"), chat(b"Once upon a time\r\nThe cat\r\n", "-n", "12")
    assert lf.returncode == crlf.returncode == 0
    assert crlf.stdout == lf.stdout and crlf.stdout.strip()


def test_a_served_demo_answer_is_one_story():
    from .serving import ServerProcess

    server = ServerProcess("demo", "--device", "cpu")
    try:
        status, _, body = server.request("POST", "/v1/completions",
                                         {"model": server.model, "prompt": "Once upon a time", "max_tokens": 500})
    finally:
        server.stop()
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"  # at the story's end, not the limit
    assert body["usage"]["completion_tokens"] < 500
