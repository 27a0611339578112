"""The Python API (`dflash_cli.load`, `Pair.generate`, `Pair.stream`): the same tokens as `dflash run
--json` for the same request, on the shipped demo pair and on a tiny checkpoint with a real chat
template; stream pieces that add up to the whole answer; a message list; one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dflash_cli
from dflash_cli.cli import main
from dflash_cli.errors import UsageError

from .conftest import STORY_PROMPTS


def run_json(capsys, *args) -> dict:
    code = main(["run", *map(str, args), "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def demo():
    return dflash_cli.load("demo", device="cpu")


@pytest.fixture(scope="module")
def chat_pair(qwen3_chat_pair):
    t, d = qwen3_chat_pair
    return dflash_cli.load(target=t, drafter=d, device="cpu", block_size=4)


def test_import_is_cheap_and_load_is_a_lazy_attribute():
    """`import dflash_cli`, and the CLI with every command module, leave torch unimported (start-up time)."""
    code = ("import sys, dflash_cli, dflash_cli.cli; heavy = [m for m in ('torch', 'transformers', 'dflash_cli.api')"
            " if m in sys.modules]; assert not heavy, heavy; assert callable(dflash_cli.load) and"
            " 'dflash_cli.api' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_demo_tokens_equal_dflash_run(capsys, demo):
    for prompt in STORY_PROMPTS[:2]:
        r = demo.generate(prompt, max_tokens=40, raw=True)
        expected = run_json(capsys, "demo", "--device", "cpu", "-p", prompt, "--raw", "-n", "40")
        assert r.token_ids == expected["token_ids"] and len(r.token_ids) == 40
        assert (r.text, r.reasoning, r.finish_reason) == (expected["text"], expected["reasoning"], "length")
        assert r.prompt_tokens == expected["prompt_tokens"]
        assert len(r.acceptance_lengths) == len(r.block_sizes) and sum(r.acceptance_lengths) >= 39  # + prefill's token
        assert max(r.acceptance_lengths) > 1  # the drafter's tokens were accepted


def test_seeded_sampling_equals_dflash_run(capsys, demo):
    r = demo.generate(STORY_PROMPTS[3], max_tokens=30, temperature=0.8, seed=7, raw=True)
    expected = run_json(capsys, "demo", "--device", "cpu", "-p", STORY_PROMPTS[3], "--raw", "-n", "30", "-t", "0.8",
                        "--seed", "7")
    assert r.token_ids == expected["token_ids"] and r.text == expected["text"]


def test_stream_pieces_add_up_to_generate(demo):
    prompt = STORY_PROMPTS[1]
    whole = demo.generate(prompt, max_tokens=50, raw=True, stop=["."])
    pieces = list(demo.stream(prompt, max_tokens=50, raw=True, stop=["."]))
    assert "".join(p.text for p in pieces) == whole.text and whole.text and "." not in whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert [p.finish_reason for p in pieces][-1] == whole.finish_reason == "stop"
    assert all(p.finish_reason is None for p in pieces[:-1])


def test_chat_template_and_a_message_list_equal_dflash_run(capsys, chat_pair, qwen3_chat_pair, tmp_path):
    t, d = qwen3_chat_pair
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text(json.dumps(messages) + "\n")
    args = ("--target", t, "--drafter", d, "--device", "cpu", "-b", "4", "-n", "12")
    for think in (None, True):
        flag = () if think is None else ("--think",)
        expected = run_json(capsys, *args, "--prompt-file", batch, *flag)
        r = chat_pair.generate(messages, max_tokens=12, think=think)
        assert (r.token_ids, r.text, r.reasoning) == (expected["token_ids"], expected["text"], expected["reasoning"])
        assert (r.prompt_tokens, r.block_sizes) == (expected["prompt_tokens"], expected["block_sizes"])
    plain = run_json(capsys, *args, "-p", "2+2?", "--system", "Be brief.")
    r = chat_pair.generate("2+2?", system="Be brief.", max_tokens=12)
    assert (r.token_ids, r.prompt_tokens) == (plain["token_ids"], plain["prompt_tokens"])


def test_the_pair_knows_its_format_and_thinking_default(chat_pair, demo):
    assert (chat_pair.format.name, chat_pair.thinking) == ("think_tags", False)
    assert (demo.format.name, demo.thinking) == ("plain", False)


def test_bad_requests_are_one_line_usage_errors(demo):
    with pytest.raises(UsageError, match=r"name a model .*or give target="):
        dflash_cli.load()
    with pytest.raises(UsageError, match="block_size must be auto or a whole number, got 'big'"):
        dflash_cli.load("demo", block_size="big")
    with pytest.raises(UsageError, match="the prompt is empty"):
        demo.generate("  ")
    with pytest.raises(UsageError, match="max_tokens must be a whole number of at least 1, got 0"):
        demo.generate("Once", max_tokens=0)
    with pytest.raises(UsageError, match=r"messages: each message needs a role"):
        demo.generate([{"role": "user"}])
    with pytest.raises(UsageError, match="reasoning_effort must be one of low, medium, high, got 'max'"):
        demo.generate("Once", reasoning_effort="max")
