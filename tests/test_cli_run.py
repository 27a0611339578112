"""`dflash run` as a user meets it: the answer on stdout, statistics on stderr, one-line errors."""
from __future__ import annotations

import io
import os
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_cli.cli import main

from dflash_cli.loader import load_tokenizer

from .conftest import STORY_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
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
    assert [it["block_size"] for it in result["trace"]] == result["block_sizes"]
    for it, tau in zip(result["trace"], result["acceptance_lengths"]):
        assert len(it["drafted"]) == it["block_size"] - 1 and it["accepted"] == tau - 1
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


def test_stop_string_ends_the_answer_and_its_tokens(capsys, pair_args, stories_pair):
    _, out, _ = run(capsys, *pair_args, "-p", "Once upon a time", "--raw", "-n", "60", "--stop", "Lily", "--json")
    result = json.loads(out)
    assert result["text"] == ", there was a little girl named " and result["finish_reason"] == "stop"
    # The tokens are those of the text before the stop string: "▁Lily", which holds its space, is not one.
    tokenizer = load_tokenizer(stories_pair[0])
    ids = result["token_ids"]
    assert tokenizer.decode(ids) == ", there was a little girl named" and result["generated_tokens"] == len(ids)
    _, out, _ = run(capsys, *pair_args, "-p", "Once upon a time", "--raw", "-n", "60", "--json")
    whole = json.loads(out)["token_ids"]
    assert whole[:len(ids)] == ids and tokenizer.decode(whole[:len(ids) + 1]).endswith(" Lily")  # the next is "▁Lily"


def test_chat_template_and_thinking_off(capsys, qwen3_chat_pair):
    t, d = qwen3_chat_pair
    code, out, err = run(capsys, "--target", t, "--drafter", d, "-p", "Hi", "-n", "5", "--json")
    from dflash_cli.loader import load_tokenizer

    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = load_tokenizer(t).encode(expected, add_special_tokens=False)
    assert code == 0 and ids[0] == 151644 and json.loads(out)["prompt_tokens"] == len(ids)
    _, out, err = run(capsys, "--target", t, "--drafter", d, "-p", "Hi", "-n", "5", "--json", "--think")
    assert json.loads(out)["prompt_tokens"] == len(ids) - 4  # no empty think block
    assert "reasoning-effort" not in err  # --think is not an effort here (it was taken for one: a bogus note)


@pytest.mark.parametrize("args, code, message", [
    (["--temperature", "-1"], 2, "--temperature must be a finite number >= 0, got -1.0"),
    (["--temperature", "nan"], 2, "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], 2, "--temperature must be a finite number >= 0, got inf"),
    (["--temperature", "1e39"], 2, "--temperature must be at most 3.403e+38 (float32's largest number), got 1e+39"),
    (["--top-k", "9223372036854775808"], 2, "--top-k must be a whole number from 0 (off) to 2147483647, got 9223372036854775808"),
    (["--top-k", "99999999999999999999"], 2, "--top-k must be a whole number from 0 (off) to 2147483647"),
    (["--top-k", "-1"], 2, "--top-k must be a whole number from 0 (off) to 2147483647, got -1"),
    (["--top-p", "0"], 2, "--top-p must be in [1e-06, 1], got 0.0"),
    (["--min-p", "nan"], 2, "--min-p must be in [0, 1)"),
    (["--dtype", "float16"], 2, "float16 is not supported"),
    (["--device", "mps"], 2, "--device mps is not supported: dflash runs on cpu or cuda (cuda:N)"),
    (["--device", "meta"], 2, "--device meta is not supported"),
    (["--block-size", "9"], 2, "--block-size must be between 1 and the drafter's 8, got 9"),
    (["--max-context", "4"], 1, "the prompt is 5 tokens; the context limit is 4"),
    (["--trace"], 2, "--trace goes with --json"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, pair_args, args, code, message):
    got, out, err = run(capsys, *pair_args, "-p", "Once upon a time", "--raw", *args)
    assert (got, out) == (code, "")
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_block_size_is_checked_before_any_weight_is_read(capsys, pair_args, stories_pair, tmp_path):
    t, d = stories_pair
    broken = tmp_path / "t"
    broken.mkdir()
    for f in t.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:5000] if f.suffix == ".safetensors" else f.read_bytes())
    code, _, err = run(capsys, "--target", broken, "--drafter", d, "-p", "x", "--raw", "-b", "9")
    assert code == 2 and "--block-size must be between 1 and the drafter's 8" in err  # not "is truncated"


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe bad \xc3\x28 utf8\n", "is not UTF-8 text (byte 0xff at offset 0)"),
    (b"\n", "the prompt is empty"),
    (b"", "the prompt is empty"),
])
def test_prompt_files_and_stdin_that_are_not_a_prompt(capsys, monkeypatch, pair_args, tmp_path, content, message):
    f = tmp_path / "q.txt"
    f.write_bytes(content)
    code, out, err = run(capsys, *pair_args, "--prompt-file", f)
    assert (code, out) == (2, "") and err.startswith("Error: ") and message in err and err.count("\n") == 1
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(content)))  # piped bytes, as a shell gives them
    code, out, err = run(capsys, *pair_args)
    assert (code, out) == (2, "") and message in err and "stdin" in err and err.count("\n") == 1
    code, _, err = run(capsys, *pair_args, "--prompt-file", tmp_path / "missing.txt")
    assert code == 2 and "cannot read --prompt-file" in err and "No such file" in err


def test_empty_p_is_refused(capsys, pair_args):
    code, out, err = run(capsys, *pair_args, "-p", " ")
    assert (code, out) == (2, "") and err == "Error: the prompt is empty (-p gave no text)\n"


def test_first_word_keeps_its_space_with_a_sentencepiece_tokenizer(capsys, pair_args, stories_pair):
    """Llama-2-style tokenizers drop the leading space of the first piece decoded alone ("▁and")."""
    code, out, _ = run(capsys, *pair_args, "-p", "The cat", "--raw", "-n", "10", "--json")
    result = json.loads(out)
    tokenizer = load_tokenizer(stories_pair[0])
    full = tokenizer.decode(tokenizer.encode("The cat") + result["token_ids"], skip_special_tokens=True)
    assert result["text"].startswith(" and") and "The cat" + result["text"] == full


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
    elif kind == "config list":  # valid JSON, but not an object
        (d / "config.json").write_text("[1, 2]")
    elif kind == "header list":
        header = b"[1, 2]    "
        (t / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is truncated"),
    ("missing field", "config.json is missing 'intermediate_size'"),
    ("vocab", "vocab size 1000 vs target 512"),
    ("config list", "config.json is not a JSON object (it holds a list)"),
    ("header list", "model.safetensors has a corrupt header"),
])
def test_broken_checkpoints_are_one_line(capsys, tmp_path, kind, message):
    cfg = target_config("qwen3")
    t = write_target(tmp_path / "t", cfg)
    d = write_drafter(tmp_path / "d", drafter_config(cfg))
    _break(kind, t, d)
    code, out, err = run(capsys, "--target", t, "--drafter", d, "-p", "x", "--raw", "--device", "cpu")
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err and err.startswith("Error: ")


@pytest.mark.slow
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


@pytest.mark.slow
def test_chat_reads_piped_input_in_plain_mode(stories_pair, tmp_path):
    t, d = stories_pair
    script = "Once upon a time\n/set max_tokens 4\nThe cat\n//The dog\n/save {}\n".format(tmp_path / "c.jsonl")
    p = subprocess.run([sys.executable, "-m", "dflash_cli.cli", "chat", "--target", str(t), "--drafter", str(d),
                        "--device", "cpu", "-n", "12", "--plain", "--show-drafts"], cwd=ROOT,
                       input=script, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert p.returncode == 0 and "\x1b[" not in p.stdout and "Error" not in p.stderr
    # stdout holds the answers only; the banner, statistics and notes go to stderr (they were on stdout)
    assert ", there was a little girl" in p.stdout and "4 tokens ·" in p.stderr and "bye" in p.stderr
    assert "tokens ·" not in p.stdout and "bye" not in p.stdout and "/help for commands" not in p.stdout
    saved = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(saved) == 6 and saved[4] == {"role": "user", "content": "/The dog"}  # "//" sends a leading "/"


@pytest.mark.slow
def test_piped_chat_errors_are_one_line_however_long(stories_pair):
    t, d = stories_pair
    question = "Tell me a story about a cat and a dog who live in a big red house by the sea " * 3
    p = subprocess.run([sys.executable, "-m", "dflash_cli.cli", "chat", "--target", str(t), "--drafter", str(d),
                        "--device", "cpu", "--max-context", "20", "--plain"], cwd=ROOT,
                       input=question + "\n/" + "bogus" * 20 + "\n", capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if "Error" in line]  # the notes are on stderr too now
    assert p.returncode == 0 and len(lines) == 2 and all(len(line) > 80 for line in lines)
    assert lines[0].startswith("Error: the message is ") and lines[1].startswith("Error: unknown command /bogus")


def jsonl(path, *items) -> str:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return str(path)


@pytest.mark.parametrize("line, message", [
    ([], ":2: the message list is empty"),
    ("  ", ":2: the prompt is empty"),
    (42, ":2: expected a string or a list of messages, got int"),
])
def test_a_bad_batch_line_is_named_before_loading(capsys, tmp_path, line, message):
    f = jsonl(tmp_path / "b.jsonl", "fine", line)
    code, out, err = run(capsys, "--target", tmp_path / "nowhere", "--prompt-file", f)  # no model is needed to see it
    assert (code, out) == (2, "") and err == f"Error: {f}{message}\n"


def test_a_batch_prompt_too_long_is_named_before_the_first_answer(capsys, pair_args, tmp_path):
    f = jsonl(tmp_path / "b.JSONL", "Once upon a time", "word " * 600, "The cat")  # any case of .jsonl
    code, out, err = run(capsys, *pair_args, "--raw", "--prompt-file", f, "-n", "5")
    assert (code, out) == (1, "")
    assert err.startswith(f"Error: {f}:2: the prompt is ") and "context limit is" in err and err.count("\n") == 1


def test_notes_say_what_the_flags_will_not_do(capsys, pair_args, stories_pair):
    t, _ = stories_pair
    _, _, err = run(capsys, "--target", t, "--device", "cpu", "-p", "Once upon a time", "-n", "3", "--think",
                    "--system", "Be brief.")
    assert "dflash: no --drafter: plain decoding, without speculation" in err
    assert "this model has no chat template: --system is put before the prompt as plain text" in err
    assert "--think has no effect: this model has no chat template" in err
    _, _, err = run(capsys, *pair_args, "-p", "Once upon a time", "-n", "3", "--raw", "--system", "x")
    assert "--system has no effect with --raw" in err and "no --drafter" not in err
    _, _, err = run(capsys, *pair_args, "-p", "Once upon a time", "-n", "3", "--think", "-q")
    assert err == ""


@pytest.mark.parametrize("temperature", ["1e-40", "1e-38", "5e-38", "1e-25"])
def test_a_temperature_too_small_to_sample_at_is_greedy(capsys, temperature):
    """Below 1e-20 the answer is greedy's (it was garbage: the logits / T overflowed float32)."""
    args = ["demo", "-p", "Once upon a time", "-n", "20", "--json", "-q", "--seed", "1"]
    code, out, _ = run(capsys, *args, "-t", "0")
    greedy = json.loads(out)["token_ids"]
    for spec in ([], ["--no-spec"]):
        code, out, err = run(capsys, *args, *spec, "-t", temperature)
        assert code == 0, err
        assert json.loads(out)["token_ids"] == greedy


def test_run_demo_starts_without_torch_dynamo():
    """torch.nn.attention.bias imports torch._dynamo (1-2 s); only a GPU prefill needs it."""
    code = ("import sys; from dflash_cli.cli import main; main(['run', 'demo', '-p', 'Once', '-n', '4', '-q']); "
            "print('torch._dynamo' in sys.modules, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stderr.strip().splitlines()[-1] == "False", p.stderr
