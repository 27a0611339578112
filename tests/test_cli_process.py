"""The CLI as a process: exit codes seen by a shell, real signals, pipes closed early, a full disk.

Every command here runs this checkout's CLI (`sys.executable -m dflash_cli.cli`, from the
repository root), never whatever `dflash` is on PATH.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dflash_cli.loader import load_tokenizer

from .conftest import ctrl_c_reaches_it

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
CLI = [sys.executable, "-m", "dflash_cli.cli"]


def cli(*args) -> list[str]:
    return [*CLI, *map(str, args)]


def shell(line: str) -> subprocess.CompletedProcess:
    """`line` in bash with pipefail, `dflash` standing for this checkout's CLI."""
    dflash = " ".join(map(shlex.quote, CLI))
    return subprocess.run(["bash", "-c", "set -o pipefail; " + line.replace("dflash ", dflash + " ")], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=180)


class Reader:
    """Collects a process's stream on a thread, so a test can wait for text without blocking."""

    def __init__(self, stream):
        self.data = b""
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        while chunk := stream.read1(4096):
            self.data += chunk

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 120.0, count: int = 1) -> None:
        deadline = time.time() + timeout
        while self.text.count(needle) < count:
            if time.time() > deadline:
                raise AssertionError(f"{needle!r} did not appear; got:\n{self.text}")
            time.sleep(0.02)

    def close(self, timeout: float = 60.0) -> str:
        self._thread.join(timeout)
        return self.text


def start(*args, stdin=None) -> tuple[subprocess.Popen, Reader, Reader]:
    p = subprocess.Popen(cli(*args), cwd=ROOT, env=ENV, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=ctrl_c_reaches_it)
    return p, Reader(p.stdout), Reader(p.stderr)


# ---- Ctrl-C ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_mid_answer_exits_130_after_the_partial_answer_and_a_newline(slow_stories_pair):
    t, d = slow_stories_pair
    p, out, err = start("run", "--target", t, "--drafter", d, "--device", "cpu", "-p", "Once upon a time", "--raw",
                        "-n", "400", "-b", "8")  # pinned: auto would stop drafting and finish too soon
    out.wait_for("Lily")  # the answer is streaming
    p.send_signal(signal.SIGINT)
    assert p.wait(60) == 130
    text, errors = out.close(), err.close()
    assert text.startswith(", there was a little girl named Lily") and text.endswith("\n")
    assert "Traceback" not in errors and "stopped: interrupted" in errors
    generated = int(errors.split(" tokens")[0])
    assert 0 < generated < 400


@pytest.mark.slow
def test_ctrl_c_in_a_json_batch_prints_what_was_generated_marked_interrupted(slow_stories_pair, tmp_path):
    t, d = slow_stories_pair
    tokenizer = load_tokenizer(t)
    long = "Once upon a time there was a dog. " * 40  # near the context limit: its answer is a few tokens
    limit = len(tokenizer.encode(long)) + 6
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps(long) + "\n" + json.dumps("The cat") + "\n")
    p, out, err = start("run", "--target", t, "--drafter", d, "--device", "cpu", "--raw", "--prompt-file", batch,
                        "--max-context", limit, "--json", "-n", "400", "-b", "8")
    out.wait_for("\n")  # the first result is out; the second answer is being generated
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    assert p.wait(60) == 130
    lines = out.close().splitlines()
    assert "Traceback" not in err.close() and len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["finish_reason"] == "length" and second["finish_reason"] == "interrupted"
    assert second["generated_tokens"] == len(second["token_ids"]) < limit
    assert second["text"] == tokenizer.decode(tokenizer.encode("The cat") + second["token_ids"],
                                              skip_special_tokens=True)[len("The cat"):]


@pytest.mark.slow
def test_ctrl_c_stops_a_piped_chat_answer_but_not_the_chat_and_ends_it_at_the_prompt(slow_stories_pair):
    t, d = slow_stories_pair
    p, out, err = start("chat", "--target", t, "--drafter", d, "--device", "cpu", "-n", "400", "-b", "8",
                        stdin=subprocess.PIPE)
    err.wait_for("Ctrl-D to leave")  # piped: notes and statistics on stderr, stdout for the answers
    p.stdin.write(b"Once upon a time\n")
    p.stdin.flush()
    out.wait_for("Lily")
    p.send_signal(signal.SIGINT)  # stops the answer
    err.wait_for("[stopped]")
    p.stdin.write(b"/stats\n")
    p.stdin.flush()
    err.wait_for("1 answer ·")  # the chat went on, and kept the stopped answer
    p.send_signal(signal.SIGINT)  # at the prompt, with questions from a pipe: ends the chat
    assert p.wait(60) == 130
    notes, answers = err.close(), out.close()
    assert "Traceback" not in notes and "stopped: interrupted" in notes
    assert "[stopped]" not in answers and "tok/s" not in answers


# ---- pipes and files -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    "dflash run {pair} --raw -p 'Once upon a time' -n 400 | head -c 5",
    "dflash run {pair} --raw -p 'Once upon a time' -n 400 | head -n 1",
    "dflash run {pair} --raw --prompt-file {batch} -n 100 | head -n 1",
    "printf 'Once upon a time\\nThe cat\\nOne day\\n' | dflash chat {pair} -n 100 | head -c 5",
])
@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_the_command_quietly_with_0(stories_pair, tmp_path, command):
    t, d = stories_pair
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps(p) for p in ["Once upon a time", "The cat", "One day"] * 5) + "\n")
    p = shell(command.format(pair=f"--target {t} --drafter {d} --device cpu", batch=batch))
    assert p.returncode == 0, p.stderr  # pipefail: dflash's own status
    assert p.stdout and "Traceback" not in p.stderr and "Error" not in p.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_full_disk_on_stdout_is_one_line(stories_pair):
    t, d = stories_pair
    p = shell(f"dflash run --target {t} --drafter {d} --device cpu --raw -p 'Once upon a time' -n 50 -q > /dev/full")
    assert p.returncode == 1 and p.stderr == "Error: cannot write the output: No space left on device\n"


# ---- exit codes ------------------------------------------------------------------------------------

def test_exit_codes_reach_the_shell(tmp_path):
    assert shell("dflash doctor nosuch").returncode == 1  # a failed check
    assert shell("dflash run --frobnicate").returncode == 2
    p = shell("dflash pull a/b/c")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is not a Hub repo id" in p.stderr
    p = subprocess.run([sys.executable, "-m", "dflash_cli", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("dflash-cli ")
