"""Exit codes of every command as a shell sees them: a reader of stdout that left before the
command started writing (`dflash models | head -1` under pipefail) is exit 0 everywhere, as for `run`.

Each case is a real process whose stdout is a pipe with no reader at all: the first write fails,
every time, whatever the timing (`| head` only fails when head has left already)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every case is a real process whose stdout is a pipe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "100"}
COMMANDS = ("run", "chat", "serve", "bench", "train", "pull", "models", "rm", "doctor", "completions")


def closed_pipe(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m dflash_cli ARGS` with stdout a pipe whose reading end is closed."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "dflash_cli", *args], cwd=ROOT, env=ENV, stdout=write,
                              stderr=subprocess.PIPE, input=stdin, text=True, timeout=300)
    finally:
        os.close(write)


def test_every_command_is_listed_here():
    from dflash_cli.cli import command

    assert set(command().commands) == set(COMMANDS)


@pytest.mark.parametrize("args", [[], ["--help"], *([c, "--help"] for c in COMMANDS)], ids=" ".join)
def test_help_to_a_closed_pipe_exits_0(args):
    p = closed_pipe(*args)
    assert (p.returncode, p.stderr) == (0, "")


@pytest.mark.parametrize("args", [
    ["models"], ["models", "--json"], ["doctor"], ["doctor", "demo"], ["completions", "bash"], ["--version"],
    ["bench", "--synthetic", "tiny"], ["bench", "--synthetic", "tiny", "--json"],
    ["run", "demo", "-p", "Once upon a time", "-n", "8"],
], ids=" ".join)
def test_a_command_whose_reader_left_exits_0_quietly(args):
    p = closed_pipe(*args)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "Error" not in p.stderr


def test_a_piped_chat_whose_reader_left_exits_0():
    p = closed_pipe("chat", "demo", "-n", "8", stdin="Once upon a time\nThe cat\n")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr


def test_a_model_check_that_cannot_pass_on_this_machine_exits_1():
    """doctor's documented rule: a failed check is exit 1; a GPU model on a machine without a GPU fails."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    p = subprocess.run([sys.executable, "-m", "dflash_cli", "doctor", "qwen3-8b"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout
    assert "no GPU here" in p.stdout


def test_windows_line_ends_on_stdin_give_the_prompt_typed_with_p():
    def prompt_tokens(**kw) -> str:
        p = subprocess.run([sys.executable, "-m", "dflash_cli", "run", "demo", "-n", "4", "--json", "-q",
                            *kw.get("args", [])], cwd=ROOT, env=ENV, capture_output=True, timeout=300,
                           input=kw.get("stdin"))
        assert p.returncode == 0, p.stderr
        return p.stdout

    import json

    typed = json.loads(prompt_tokens(args=["-p", "Once upon a time\nThe cat"]))
    piped = json.loads(prompt_tokens(stdin=b"Once upon a time\r\nThe cat\r\n"))
    assert piped["prompt_tokens"] == typed["prompt_tokens"] and piped["token_ids"] == typed["token_ids"]
