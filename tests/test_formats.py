"""Chat formats (dflash_cli/formats): chosen from the tokenizer, rendering through the checkpoint's
template, and one answer parser per format that splits reasoning, content and tool calls the same
way whatever the steps' cut; the thinking default from the pair alone; serve's --reasoning-effort
reaching a template that is not harmony."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dflash_cli import formats, registry
from dflash_cli.formats import PLAIN, THINK_TAGS, ChatPrompt, Reasoning, detect, thinking_default
from dflash_cli.formats.harmony import Harmony
from dflash_cli.loader import load_tokenizer

from .tiny import QWEN3_TOKENIZER, STORIES
from .tiny_gpt_oss import write_harmony_tokenizer


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer(QWEN3_TOKENIZER)


@pytest.fixture(scope="module")
def harmony_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("harmony-tokenizer")
    write_harmony_tokenizer(d)
    return load_tokenizer(d)


def parse(tok, prompt: ChatPrompt, ids: list[int], cut: int, stop: tuple[str, ...] = ()):
    """(reasoning, content, tool call) of `ids` pushed `cut` tokens at a time."""
    parser = prompt.parser(tok, stop)
    delta = formats.AnswerDelta()
    for i in range(0, len(ids), cut):
        delta += parser.push(ids[i:i + cut])
        if parser.stopped:
            break
    delta += parser.finish("stop")
    return delta.reasoning, delta.content, delta.tool_call


def test_the_format_is_chosen_from_the_tokenizer(qwen3, harmony_tok):
    assert detect(load_tokenizer(STORIES)) is PLAIN  # no chat template
    assert detect(qwen3) is THINK_TAGS
    assert isinstance(detect(harmony_tok), Harmony)


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_think_tags_split_reasoning_from_content_at_any_cut(qwen3, cut):
    messages = [{"role": "user", "content": "2+2?"}]
    answer = qwen3.encode("<think>\nTwo and two.\n</think>\n\nFour. Grüße 🙂", add_special_tokens=False)
    on = THINK_TAGS.render(qwen3, messages, thinking=True)
    assert (on.format, on.thinking, on.opens_think) == (THINK_TAGS, True, False)
    assert parse(qwen3, on, answer, cut) == ("Two and two.", "Four. Grüße 🙂", None)
    off = THINK_TAGS.render(qwen3, messages, thinking=False)  # thinking off: the tags are text
    assert parse(qwen3, off, answer, cut)[:2] == ("", "<think>\nTwo and two.\n</think>\n\nFour. Grüße 🙂")
    opened = ChatPrompt(on.ids, format=THINK_TAGS, opens_think=True)  # Qwen3.5: the template opened <think>
    assert parse(qwen3, opened, answer[2:], cut)[:2] == ("Two and two.", "Four. Grüße 🙂")


def test_a_stop_string_ends_the_answer_and_its_tokens(qwen3):
    prompt = THINK_TAGS.render(qwen3, [{"role": "user", "content": "x"}], thinking=True)
    ids = qwen3.encode("<think>\nhm\n</think>\n\none two\nUser: three", add_special_tokens=False)
    parser = prompt.parser(qwen3, ("\nUser:",))
    delta = parser.push(ids)
    assert parser.stopped and (delta + parser.finish("stop")).content == "one two"
    assert qwen3.decode(ids[:parser.tokens_kept()]).endswith("one two")


def test_plain_text_is_all_content_and_raw_prompts_read_plainly(qwen3):
    ids = qwen3.encode("<think>x</think> y", add_special_tokens=False)
    raw = ChatPrompt([1])  # `--raw` and the completions endpoint: no format
    assert parse(qwen3, raw, ids, 1) == ("", "<think>x</think> y", None)
    rendered = PLAIN.render(qwen3, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert rendered.ids == qwen3.encode("S\nU", add_special_tokens=True)


def test_harmony_splits_channels_and_ends_with_a_tool_call(harmony_tok):
    fmt = detect(harmony_tok)
    prompt = fmt.render(harmony_tok, [{"role": "user", "content": "Time?"}])
    ids = harmony_tok.encode("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=functions.now"
                             '<|channel|>commentary json<|message|>{"tz": "UTC"}', add_special_tokens=False)
    for cut in (1, 4):
        reasoning, content, call = parse(harmony_tok, prompt, ids, cut)
        assert (reasoning, content, call.name, call.arguments) == ("Look it up.", "", "now", '{"tz": "UTC"}')


def test_reasoning_settings_per_format(harmony_tok):
    harmony = detect(harmony_tok)
    assert Reasoning(None, None).template_kwargs(harmony) == {}  # the template's own (medium)
    assert Reasoning(True, None).template_kwargs(harmony) == {"reasoning_effort": "high"}
    assert Reasoning(False, "medium").template_kwargs(harmony) == {"reasoning_effort": "medium"}
    assert Reasoning(True, None).template_kwargs(THINK_TAGS) == {}  # thinking is enable_thinking there
    assert Reasoning(None, "low").template_kwargs(THINK_TAGS) == {"reasoning_effort": "low"}
    assert Reasoning(None, None).enable_thinking(True) and not Reasoning(False, None).enable_thinking(True)


def _hub_dir(root: Path, repo: str) -> Path:
    d = root / ("models--" + repo.replace("/", "--")) / "snapshots" / "0123abc"
    d.mkdir(parents=True)
    return d


def test_the_thinking_default_comes_from_the_pair(tmp_path):
    think_pair = registry.resolve("qwen3.6-27b")
    plain_pair = registry.resolve("qwen3-8b")
    assert think_pair.think and not plain_pair.think
    # released drafters in the Hub cache: their registry row
    assert thinking_default(_hub_dir(tmp_path, think_pair.target), _hub_dir(tmp_path, think_pair.drafter))
    assert not thinking_default(_hub_dir(tmp_path, plain_pair.target), _hub_dir(tmp_path, plain_pair.drafter))
    # no drafter (--no-spec): the released target's row
    assert thinking_default(tmp_path / f"models--{think_pair.target.replace('/', '--')}" / "snapshots" / "0123abc",
                            None)
    # a drafter of our own: what it was trained with, over any registry row
    own = tmp_path / "mine"
    own.mkdir()
    (own / "config.json").write_text(json.dumps({"dflash_config": {"enable_thinking": True}}))
    assert thinking_default(_hub_dir(tmp_path / "t", plain_pair.target), own)
    (own / "config.json").write_text(json.dumps({"dflash_config": {"enable_thinking": False}}))
    assert not thinking_default(None, own)
    # anything else: off (the family no longer decides: a local copy of a Qwen3.5 drafter says nothing)
    (own / "config.json").write_text(json.dumps({"dflash_config": {"block_size": 16}}))
    assert not thinking_default(tmp_path / "Qwen3.5-4B", own)


def test_dflash_train_records_the_thinking_mode_it_trained_in():
    from types import SimpleNamespace

    from dflash_cli.train.model import drafter_config

    target = SimpleNamespace(hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4,
                             rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64, vocab_size=32,
                             num_layers=2, rope_scaling=None)
    for think in (False, True):
        cfg = drafter_config(target, block_size=4, num_layers=1, target_layer_ids=[0], mask_token_id=1,
                             enable_thinking=think)
        assert cfg["dflash_config"]["enable_thinking"] is think


def test_serve_passes_reasoning_effort_to_any_template(monkeypatch, qwen3_chat_pair):
    """`dflash serve --reasoning-effort high` on a Qwen template: the requests' default effort is high
    (it used to reach harmony templates only), and the thinking default is the pair's."""
    from dflash_cli.serve import app, launch

    captured = {}

    def fake_run_server(sock, worker, name, options, describe):
        captured.update(options=options, describe=describe)
        worker.stop()
        sock.close()

    monkeypatch.setattr(app, "run_server", fake_run_server)
    t, d = qwen3_chat_pair
    launch.serve(launch.ServeFlags(target=str(t), drafter=str(d), device="cpu", port=0, reasoning_effort="high"))
    options = captured["options"]
    assert (options.default_effort, options.default_think) == ("high", False)
    assert "thinking off by default" in captured["describe"]
