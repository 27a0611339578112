"""`dflash chat` in a real terminal (tmux): streamed text, the live status line, Ctrl-C mid-answer,
/save and /load, Ctrl-D. Assertions are on captured screens, as a person would see them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .tiny import copy_qwen3_tokenizer, drafter_config, target_config, write_drafter, write_target

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
              pytest.mark.slow]  # real terminals, seconds each


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    """A Qwen3 big enough (a ~80 MB lm_head read per step) that an answer takes seconds on CPU,
    so Ctrl-C reliably lands mid-answer; the real Qwen3 tokenizer and chat template."""
    d = tmp_path_factory.mktemp("pty")
    cfg = target_config("qwen3", vocab=151936, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                        intermediate=256, tie=True, max_pos=8192) | {"eos_token_id": 151645}
    t = write_target(d / "t", cfg, seed=11)
    copy_qwen3_tokenizer(t)
    dr = write_drafter(d / "d", drafter_config(cfg, block_size=16, target_layer_ids=(0, 1), heads=4, kv_heads=2,
                                               head_dim=32, intermediate=256, mask_token_id=151669))
    return t, dr


class Tmux:
    def __init__(self, name: str, command: str, width: int = 110, height: int = 30):
        self.name = name
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        # os.environ, not the process's C environment, and without COLUMNS and LINES: readline (imported under
        # pytest) sets them there, and a test run may export them (xdist workers, CI, a user's shell); rich
        # would then keep those sizes whatever the window's, and its live view would leave stale lines.
        # (A tmux server started earlier keeps its own environment for new sessions: unset them in the shell too.)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(width), "-y", str(height),
                        f"unset COLUMNS LINES; {command}"], check=True, env=env)
        subprocess.run(["tmux", "set-option", "-t", name, "remain-on-exit", "on"], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True).stdout

    def everything(self) -> str:
        """The scrollback and the screen: where stale lines of a live view would stay."""
        return subprocess.run(["tmux", "capture-pane", "-p", "-S", "-", "-t", self.name], capture_output=True,
                              text=True).stdout

    def resize(self, width: int, height: int) -> None:
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", str(width), "-y", str(height)], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        self.send("-l", text)
        self.send("Enter")

    def wait_for(self, needle: str, timeout: float = 60.0, count: int = 1, after: str = "") -> str:
        """The screen once `needle` shows `count` times (below the first `after`, if given)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            below = screen.partition(after)[2] if after else screen
            if below.count(needle) >= count:
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} did not appear; the screen was:\n{self.screen()}")

    def dead(self) -> bool:
        out = subprocess.run(["tmux", "display-message", "-p", "-t", self.name, "#{pane_dead}"],
                             capture_output=True, text=True).stdout.strip()
        return out == "1"

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_chat_in_a_terminal(slow_pair, tmp_path):
    t, d = slow_pair
    transcript = tmp_path / "chat.jsonl"
    root = Path(__file__).resolve().parents[1]
    cmd = (f"cd {root} && TERM=xterm-256color {sys.executable} -m dflash_cli.cli chat --target {t} --drafter {d} "
           f"--device cpu -b 16 --history {tmp_path / 'history'} -n 3000 --max-context 4096")
    tmux = Tmux(f"dflash-test-{time.time_ns()}", cmd)
    try:
        tmux.wait_for(">>>", timeout=120)
        assert "DFlash, block size 16" in tmux.screen()
        tmux.type("Write a long story about a lighthouse.")
        live = tmux.wait_for("b 16 · τ")  # the live status line, once an iteration has run
        assert "tok/s" in live and "tokens" in live
        tmux.send("C-c")
        stopped = tmux.wait_for("[stopped]")
        # The summary of the stopped answer follows it (printed just after: wait, do not race it).
        stopped = tmux.wait_for("tok/s", timeout=10, after="[stopped]")
        assert "tok/s" in stopped.partition("[stopped]")[2]
        tmux.wait_for(">>>", count=2)

        tmux.type(f"/save {transcript}")
        tmux.wait_for("saved 2 messages")
        saved = [json.loads(x) for x in transcript.read_text().splitlines()]
        assert saved[0] == {"role": "user", "content": "Write a long story about a lighthouse."}
        assert saved[1]["role"] == "assistant" and saved[1]["content"]

        tmux.type("/clear")
        tmux.wait_for("conversation cleared")
        tmux.type(f"/load {transcript}")
        tmux.wait_for("loaded 2 messages")

        tmux.type("/set max_tokens 5")
        tmux.wait_for("max_tokens = 5")
        tmux.type("And then?")
        after = tmux.wait_for("stopped: length")  # the chat went on after Ctrl-C: a full second answer
        assert [line for line in after.splitlines() if "stopped: length" in line][0].startswith("5 tokens ·")

        tmux.type("/stats")
        tmux.wait_for("2 answers")
        tmux.send("C-d")
        tmux.wait_for("bye")
        deadline = time.time() + 10
        while not tmux.dead() and time.time() < deadline:
            time.sleep(0.1)
        assert tmux.dead()
        assert (tmp_path / "history").read_text().count("+Write a long story") == 1
    finally:
        tmux.close()


def chat_command(pair, tmp_path, *flags: str) -> str:
    t, d = pair
    root = Path(__file__).resolve().parents[1]
    return (f"cd {root} && OMP_NUM_THREADS=1 TERM=xterm-256color {sys.executable} -m dflash_cli.cli chat --target {t} "
            f"--drafter {d} --device cpu -b 8 --history {tmp_path / 'history'} {' '.join(flags)}")


def answer_rows(screen: str) -> list[str]:
    """The answer's lines: from below the question to above the summary."""
    rows = screen.partition(">>> Once upon a time\n")[2].partition("stopped: length")[0].splitlines()
    return [r.rstrip() for r in rows[:-1] if r.strip()]


def test_a_resize_mid_answer_leaves_no_stale_lines(slow_stories_pair, tmp_path):
    """A narrower window reflows the live view's lines into more rows; the redraw must erase them all."""
    tmux = Tmux(f"dflash-test-{time.time_ns()}", chat_command(slow_stories_pair, tmp_path, "-n", "120"), 120, 40)
    try:
        tmux.wait_for(">>>", timeout=120)
        tmux.type("Once upon a time")
        tmux.wait_for("in the park")  # the live view holds a line longer than the narrower window
        tmux.resize(60, 20)
        time.sleep(1.0)  # a dozen redraws at the new size
        tmux.resize(120, 40)
        tmux.wait_for("stopped: length", timeout=120)
        everything = tmux.everything()
        assert everything.count("there was a little girl named Lily") == 1, everything
        rows = answer_rows(everything)
        assert rows[0].startswith(", there was a little girl named Lily. She loved") and len(rows) == len(set(rows))
    finally:
        tmux.close()


def test_a_wrapping_status_line_leaves_no_stale_lines(slow_stories_pair, tmp_path):
    """In a narrow window the status line takes two rows: the answer above it gets one row less."""
    cmd = chat_command(slow_stories_pair, tmp_path, "-n", "200", "--show-drafts")
    tmux = Tmux(f"dflash-test-{time.time_ns()}", cmd, 40, 15)
    try:
        tmux.wait_for(">>>", timeout=120)
        tmux.type("Once upon a time")
        tmux.wait_for("stopped: length", timeout=120)
        rows = answer_rows(tmux.everything())
        assert rows[0] == ", there was a little girl named Lily."
        assert len(rows) == len(set(rows)) > 12, rows  # more rows than the screen, none of them twice
    finally:
        tmux.close()
