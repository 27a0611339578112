"""`dflash run` as a user meets it: the answer on stdout, statistics on stderr, one-line errors."""
from __future__ import annotations

import io
import os
import json
import subprocess
import sys

import pytest

from dflash_cli.cli import main

from .conftest import STORY_PROMPTS
from .tiny import target_config, write_drafter, drafter_config, write_target


def run(capsys, *args, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["run", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pair_args(stories_pair):
    t, d = stories_pair
    return ["--target", t, "--drafter", d, "--device", "cpu"]


def test_answer_on_stdout_stats_on_stderr(capsys, pair_args):
    code, out, err = run(capsys, *pair_args, "-p", "Once upon a time", "--raw", "-n", "30")
    assert code == 0
    assert out.startswith(", there was a little girl named Lily")
    assert "tok/s" not in out and "τ" in err and "30 tokens" in err


def test_json_has_text_ids_and_acceptance(capsys, pair_args):
    code, out, err = run(capsys, *pair_args, "-p", "Once upon a time", "--raw", "-n", "40", "--json", "--trace")
    result = json.loads(out)
    assert code == 0 and out.count("\n") == 1
    assert result["generated_tokens"] == len(result["token_ids"]) == 40
    assert len(result["trace"]) == len(result["acceptance_lengths"])
    for it, tau in zip(result["trace"], result["acceptance_lengths"]):
        assert len(it["drafted"]) == 7 and it["accepted"] == tau - 1
        shown = min(it["accepted"], len(it["emitted"]))  # the last step is cut at the token budget
        assert it["drafted"][:shown] == it["emitted"][:shown]
    assert max(result["acceptance_lengths"]) > 1
    assert result["text"].startswith(", there was a little girl")


def test_no_spec_gives_the_same_answer(capsys, pair_args):
    _, spec, _ = run(capsys, *pair_args, "-p", STORY_PROMPTS[2], "--raw", "-n", "40", "-q")
    _, plain, err = run(capsys, *pair_args, "-p", STORY_PROMPTS[2], "--raw", "-n", "40", "--no-spec")
    assert spec == plain and "τ 1.00" in err


def test_prompt_from_stdin_and_from_file(capsys, monkeypatch, pair_args, tmp_path):
    _, from_stdin, _ = run(capsys, *pair_args, "--raw", "-n", "12", stdin="The cat", monkeypatch=monkeypatch)
    f = tmp_path / "q.txt"
    f.write_text("The cat\n")
    _, from_file, _ = run(capsys, *pair_args, "--raw", "-n", "12", "--prompt-file", f)
    _, from_flag, _ = run(capsys, *pair_args, "--raw", "-n", "12", "-p", "The cat")
    assert from_stdin == from_file == from_flag != ""


def test_stop_string_ends_the_answer(capsys, pair_args):
    _, out, _ = run(capsys, *pair_args, "-p", "Once upon a time", "--raw", "-n", "60", "--stop", "Lily", "--json")
    result = json.loads(out)
    assert result["text"] == ", there was a little girl named " and result["finish_reason"] == "stop"


def test_chat_template_and_thinking_off(capsys, qwen3_chat_pair):
    t, d = qwen3_chat_pair
    code, out, err = run(capsys, "--target", t, "--drafter", d, "-p", "Hi", "-n", "5", "--json")
    from dflash_cli.loader import load_tokenizer

    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = load_tokenizer(t).encode(expected, add_special_tokens=False)
    assert code == 0 and ids[0] == 151644 and json.loads(out)["prompt_tokens"] == len(ids)
    _, out, _ = run(capsys, "--target", t, "--drafter", d, "-p", "Hi", "-n", "5", "--json", "--think")
    assert json.loads(out)["prompt_tokens"] == len(ids) - 4  # no empty think block


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--dtype", "float16"], "float16 is not supported"),
    (["--block-size", "9"], "block size must be between 1 and the drafter's 8"),
    (["--max-context", "4"], "the prompt is 5 tokens; the context limit is 4"),
    (["--prompt-file", "/nonexistent/q.txt"], "cannot read --prompt-file"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, pair_args, args, message):
    if "--prompt-file" not in args:
        args = ["-p", "Once upon a time", "--raw", *args]
    code, out, err = run(capsys, *pair_args, *args)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_mismatched_drafter_is_one_line(capsys, tmp_path, stories_pair):
    cfg = target_config("qwen3")
    t = write_target(tmp_path / "t", cfg)
    d = write_drafter(tmp_path / "d", drafter_config(cfg | {"hidden_size": 32}))
    code, out, err = run(capsys, "--target", t, "--drafter", d, "-p", "x", "--raw")
    assert code == 1 and err.strip() == f"Error: drafter {d} does not match the target: hidden size 32 vs target 64"


def test_missing_prompt_and_bad_flag_are_usage_errors(capsys, pair_args):
    code, _, err = run(capsys, *pair_args, "-p", "x", "--prompt-file", "y")
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, *pair_args, "--no-such-flag")
    assert code == 2 and "No such option" in err


def test_pipeline_head_ends_quietly(stories_pair):
    t, d = stories_pair
    cmd = f"echo 'Once upon a time' | dflash run --target {t} --drafter {d} --raw -n 200 | head -c 5"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert p.stdout == ", the" and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr


def _break(kind, t, d):
    if kind == "truncated":
        f = t / "model.safetensors"
        f.write_bytes(f.read_bytes()[:5000])
    elif kind == "missing field":
        cfg = json.loads((t / "config.json").read_text())
        del cfg["intermediate_size"]
        (t / "config.json").write_text(json.dumps(cfg))
    elif kind == "vocab":
        cfg = json.loads((d / "config.json").read_text()) | {"vocab_size": 1000}
        (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is truncated"),
    ("missing field", "config.json is missing 'intermediate_size'"),
    ("vocab", "vocab size 1000 vs target 512"),
])
def test_broken_checkpoints_are_one_line(capsys, tmp_path, kind, message):
    cfg = target_config("qwen3")
    t = write_target(tmp_path / "t", cfg)
    d = write_drafter(tmp_path / "d", drafter_config(cfg))
    _break(kind, t, d)
    code, out, err = run(capsys, "--target", t, "--drafter", d, "-p", "x", "--raw", "--device", "cpu")
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err and err.startswith("Error: ")


def test_system_prompt_and_sampling_flags(capsys, qwen3_chat_pair):
    t, d = qwen3_chat_pair
    base = ["--target", t, "--drafter", d, "-p", "Hi", "-n", "6", "--json", "--device", "cpu"]
    _, out, _ = run(capsys, *base)
    _, with_system, _ = run(capsys, *base, "--system", "Be brief.")
    assert json.loads(with_system)["prompt_tokens"] > json.loads(out)["prompt_tokens"]
    sampled = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--min-p", "0.01", "--seed", "7"]
    first = json.loads(run(capsys, *base, *sampled)[1])["token_ids"]
    again = json.loads(run(capsys, *base, *sampled)[1])["token_ids"]
    plain = json.loads(run(capsys, *base, *sampled, "--no-spec")[1])["token_ids"]
    assert first == again == plain  # a seed fixes the answer, with or without speculation


def test_chat_reads_piped_input_in_plain_mode(stories_pair, tmp_path):
    t, d = stories_pair
    script = "Once upon a time\n/set max_tokens 4\nThe cat\n/save {}\n".format(tmp_path / "c.jsonl")
    p = subprocess.run([sys.executable, "-m", "dflash_cli.cli", "chat", "--target", str(t), "--drafter", str(d),
                        "--device", "cpu", "-n", "12", "--plain", "--show-drafts"],
                       input=script, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert p.returncode == 0 and "\x1b[" not in p.stdout
    assert ", there was a little girl" in p.stdout and "4 tokens ·" in p.stdout and "bye" in p.stdout
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 4
