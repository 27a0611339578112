"""Harmony (gpt-oss's chat format): the answer split by token id into reasoning, the final answer and a
tool call; its stop tokens; its template rendered with a pinned date and a reasoning effort; `run`
and `chat` showing each part where it belongs. The tokenizer is a tiny byte-level one with harmony's
special tokens (tests/tiny_gpt_oss.py); the engine is replaced by one that writes given ids."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from dflash_cli import loader
from dflash_cli.engine import Request, Step, _cut
from dflash_cli.generate import Stats, stream_text
from dflash_cli.formats import detect
from dflash_cli.formats.harmony import Harmony
from dflash_cli.harmony import HarmonyParser, HarmonyText, HarmonyTokens
from dflash_cli.prompt import ChatPrompt, render_chat

from .tiny_gpt_oss import PINNED_DATE, write_harmony_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("harmony-tokenizer")
    write_harmony_tokenizer(d)
    return loader.load_tokenizer(d)


@pytest.fixture(scope="module")
def ids_of(tok):
    """Harmony markup → ids: special tokens by name, everything else byte by byte."""
    return lambda text: tok.encode(text, add_special_tokens=False)


def _split(tok, ids: list[int], pieces: int = 1) -> tuple[str, str, HarmonyText]:
    """(reasoning, answer) of `ids` pushed in steps of `pieces` tokens."""
    text = HarmonyText(tok, HarmonyTokens.of(tok))
    reasoning, answer = [], []
    for i in range(0, len(ids), pieces):
        r, a = text.push(ids[i:i + pieces])
        reasoning.append(r)
        answer.append(a)
    r, a = text.flush()
    return "".join(reasoning) + r, "".join(answer) + a, text


ANALYSIS_THEN_FINAL = ("<|channel|>analysis<|message|>The user greets; answer briefly. Grüße 🙂<|end|>"
                       "<|start|>assistant<|channel|>final<|message|>Hello! Naïve café 東京.")


@pytest.mark.parametrize("pieces", [1, 3, 8])
def test_analysis_then_final(tok, ids_of, pieces):
    """Any cut into steps, multi-byte characters split across tokens: neither channel leaks into the other."""
    reasoning, answer, text = _split(tok, ids_of(ANALYSIS_THEN_FINAL), pieces)
    assert reasoning == "The user greets; answer briefly. Grüße 🙂"
    assert answer == "Hello! Naïve café 東京."
    assert text.tool_call(finished_by_stop=True) is None


def test_final_only(tok, ids_of):
    reasoning, answer, _ = _split(tok, ids_of("<|channel|>final<|message|>Just the answer."), 2)
    assert (reasoning, answer) == ("", "Just the answer.")


def test_a_tool_call_ends_the_answer(tok, ids_of):
    """A message to a recipient is a tool call: its name without the namespace, its arguments as written
    (the <|constrain|> format is not the channel); the <|call|> that closes it ends everything."""
    out = ids_of("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
                 '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
                 "<|start|>assistant<|channel|>final<|message|>never shown")
    reasoning, answer, text = _split(tok, out, 5)
    assert (reasoning, answer) == ("Need the weather.", "")
    call = text.tool_call(finished_by_stop=False)
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    # the engine cuts the <|call|> stop token before the parser sees it: the stop ends the call the same way
    before_call = out[:out.index(HarmonyTokens.of(tok).call)]
    _, _, cut = _split(tok, before_call, 4)
    assert cut.tool_call(finished_by_stop=True).arguments == '{"city": "Paris"}'
    assert cut.tool_call(finished_by_stop=False) is None  # cut by the token limit: not a complete call


def test_a_truncated_header_shows_nothing(tok, ids_of):
    for markup in ("<|channel|>analy", "<|channel|>analysis<|message|>Thinking.<|end|><|start|>assistant<|chan"):
        reasoning, answer, text = _split(tok, ids_of(markup), 3)
        assert answer == "" and reasoning in ("", "Thinking.") and text.tool_call(finished_by_stop=True) is None


def test_a_stop_token_inside_a_block_ends_the_answer(tok, ids_of):
    """One verify block can hold the stop token and what the drafter wrote after it: nothing after the
    stop is content, whichever channel it claims."""
    out = ids_of("<|channel|>final<|message|>Done.<|return|><|start|>assistant<|channel|>final<|message|>More.")
    reasoning, answer, text = _split(tok, out, len(out))
    assert (reasoning, answer) == ("", "Done.") and text.parser.ended_by == HarmonyTokens.of(tok).return_


def test_markup_spelled_in_plain_text_is_content(tok, ids_of):
    """Tokens are told apart by id: the characters "<|end|>" written by the model as text end nothing."""
    literal = tok.encode("<|end|><|channel|>final", add_special_tokens=False, split_special_tokens=True)
    assert HarmonyTokens.of(tok).end not in literal
    out = ids_of("<|channel|>final<|message|>write ") + literal + ids_of(" as text")
    assert _split(tok, out, 2)[1] == "write <|end|><|channel|>final as text"


def test_the_parser_reads_role_recipient_and_channel_from_the_header(tok, ids_of):
    p = HarmonyParser(HarmonyTokens.of(tok), lambda ids: tok.decode(ids, skip_special_tokens=False))
    p.feed(ids_of("<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>"))
    assert (p.kind, p.recipient) == ("tool", "functions.lookup")
    p.feed(ids_of("{}<|end|><|start|>assistant<|channel|>commentary<|message|>"))
    assert (p.kind, p.recipient) == ("answer", None)  # a preamble for the user


# ---- stream_text over harmony output --------------------------------------------------------------------
@dataclass
class ScriptedEngine:
    """Writes `output` in steps of `block` tokens, cut at stop tokens and the budget as the engine cuts."""
    output: list[int]
    block: int = 4

    def generate(self, request: Request):
        produced, out = 0, self.output
        for n, i in enumerate(range(0, len(out), self.block)):
            step = _cut(Step(out[i:i + self.block], [], 0, 0.0, prefill=n == 0), request.stop_token_ids,
                        request.max_new_tokens - produced)
            produced += len(step.tokens)
            yield step
            if step.finish:
                return
        yield Step([], [], 0, 0.0, finish="length")


def _stream(tok, output, stops=(), max_tokens=200):
    model_stops = loader.stop_token_ids(Path("/nonexistent"), tok)
    stats = Stats()
    chunks = list(stream_text(ScriptedEngine(output), tok, Request([1], max_tokens, model_stops), stats, stops,
                              prompt=ChatPrompt([1], format=Harmony(HarmonyTokens.of(tok)))))
    return chunks, stats


def test_stream_text_splits_harmony_and_stops_on_return(tok, ids_of):
    out = ids_of(ANALYSIS_THEN_FINAL + "<|return|>")
    chunks, stats = _stream(tok, out)
    assert "".join(c.reasoning for c in chunks) == "The user greets; answer briefly. Grüße 🙂"
    assert "".join(c.text for c in chunks) == "Hello! Naïve café 東京."
    assert stats.finish == "stop" and stats.token_ids == out[:-1]  # the stop token is not emitted


def test_stream_text_ends_a_tool_call_with_finish_tool_call(tok, ids_of):
    out = ids_of('<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.f<|channel|>commentary json'
                 '<|message|>{"a": 1}<|call|>')
    chunks, stats = _stream(tok, out)
    assert stats.finish == "tool_call" and chunks[-1].step.finish == "tool_call"
    assert [(c.tool_call.name, c.tool_call.arguments) for c in chunks if c.tool_call] == [("f", '{"a": 1}')]
    assert "".join(c.text for c in chunks) == ""


def test_a_stop_string_cuts_the_answer_and_its_tokens_not_the_reasoning(tok, ids_of):
    """--stop applies to the final answer: "STOP" in the reasoning is no stop; in the answer it ends the
    text and the tokens right before it."""
    out = ids_of("<|channel|>analysis<|message|>say STOP<|end|><|start|>assistant<|channel|>final<|message|>"
                 "one two STOP three<|return|>")
    chunks, stats = _stream(tok, out, stops=("STOP",))
    assert "".join(c.reasoning for c in chunks) == "say STOP"
    assert "".join(c.text for c in chunks) == "one two "
    assert stats.finish == "stop"
    assert tok.decode(stats.token_ids, skip_special_tokens=False).endswith("<|message|>one two ")


def test_a_harmony_tokenizer_stops_on_return_call_and_endoftext_never_end(tok, tmp_path):
    t = HarmonyTokens.of(tok)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [t.return_, t.end]}))
    assert loader.stop_token_ids(tmp_path, tok) == {t.return_, t.call, t.endoftext}
    assert t.end not in loader.stop_token_ids(tmp_path, tok)


@pytest.fixture
def pinned_date(monkeypatch):
    """The gpt-oss template prints today's date through transformers' `strftime_now`, which reads the
    module's `datetime` when called (a render argument cannot replace it: transformers passes only plain
    data to templates): pin that."""
    import datetime as real
    from transformers.utils import chat_template_utils

    class Pinned(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime.fromisoformat(PINNED_DATE)

    monkeypatch.setattr(chat_template_utils, "datetime", Pinned)


def test_the_template_renders_with_a_pinned_date_and_the_reasoning_effort(tok, pinned_date):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    prompt = render_chat(tok, messages, template_kwargs={"reasoning_effort": "high"})
    text = tok.decode(prompt.ids, skip_special_tokens=False)
    assert f"Current date: {PINNED_DATE}\n\nReasoning: high\n\n" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>" in text
    assert "<|start|>assistant<|channel|>final<|message|>Hello.<|end|>" in text  # history: the final text only
    assert text.endswith("<|start|>user<|message|>2+2?<|end|><|start|>assistant")
    assert isinstance(prompt.format, Harmony)
    head = tok.decode(prompt.ids[:prompt.keep_prefix], skip_special_tokens=False)
    assert head.endswith("2+2?<|end|>")  # the next turn shares everything before the generation prompt
    default = tok.decode(render_chat(tok, messages[1:2]).ids, skip_special_tokens=False)
    assert "Reasoning: medium" in default and "developer" not in default


def test_think_flags_map_onto_the_reasoning_effort(tok):
    reasoning_effort = detect(tok).template_effort
    assert [reasoning_effort(None, t) for t in (None, True, False)] == [None, "high", "low"]
    assert reasoning_effort("medium", False) == "medium"  # --reasoning-effort wins


# ---- run and chat ---------------------------------------------------------------------------------------
def _model(tok):
    return loader.Model(tok, None, None, loader.stop_token_ids(Path("/nonexistent"), tok), 1000, Path("gpt-oss"),
                        None, thinking=True, format=detect(tok))


class _Engine(ScriptedEngine):
    block_size, max_context, adaptive, tree_budget, tree_setting = 4, 1000, False, 0, 0

    def reusable_prefix(self, prompt_ids: list[int]) -> int:  # the engine's public seam: nothing is cached here
        return 0


def test_run_writes_the_final_answer_to_stdout_and_the_reasoning_elsewhere(tok, ids_of, pinned_date):
    import io

    from dflash_cli.run import RunOptions, prompt_ids, run_prompt

    model = _model(tok)
    opts = RunOptions(max_tokens=100, reasoning_effort="low")
    prompt = prompt_ids(model, "Hi", opts)
    assert isinstance(prompt.format, Harmony) and "Reasoning: low" in tok.decode(prompt.ids, skip_special_tokens=False)
    engine = _Engine(ids_of(ANALYSIS_THEN_FINAL + "<|return|>"))
    out, err = io.StringIO(), io.StringIO()
    run_prompt(model, engine, prompt, opts, out=out, err=err)
    assert out.getvalue() == "Hello! Naïve café 東京.\n"
    assert err.getvalue().startswith("The user greets; answer briefly. Grüße 🙂\n")
    out = io.StringIO()
    result = run_prompt(model, engine, prompt, RunOptions(json=True), out=out, err=io.StringIO())
    assert json.loads(out.getvalue()) == result
    assert (result["reasoning"], result["text"], result["finish_reason"]) == (
        "The user greets; answer briefly. Grüße 🙂", "Hello! Naïve café 東京.", "stop")


def test_run_and_chat_leave_the_effort_to_the_template_unless_asked(tok, pinned_date):
    """gpt-oss's thinking default (on) is not --think: without a flag the template's own effort (medium)
    is used, as serve does; --think and --no-think are high and low."""
    from dflash_cli.chat import ChatSession
    from dflash_cli.run import RunOptions, prompt_ids

    model = _model(tok)
    for think, level in ((None, "medium"), (True, "high"), (False, "low")):
        prompt = prompt_ids(model, "Hi", RunOptions(think=think))
        assert f"Reasoning: {level}" in tok.decode(prompt.ids, skip_special_tokens=False)
    session = ChatSession(model, _Engine([]))
    assert session.think is None and session.model.thinking  # the pair's default: on, at the template's effort


def test_run_reports_a_tool_call(tok, ids_of):
    import io

    from dflash_cli.run import RunOptions, prompt_ids, run_prompt

    model = _model(tok)
    engine = _Engine(ids_of('<|channel|>analysis<|message|>call it<|end|><|start|>assistant to=functions.get_time'
                            '<|channel|>commentary json<|message|>{"tz": "UTC"}<|call|>'))
    prompt = prompt_ids(model, "Time?", RunOptions())
    out, err = io.StringIO(), io.StringIO()
    result = run_prompt(model, engine, prompt, RunOptions(json=True), out=out, err=err)
    assert result["finish_reason"] == "tool_call" and result["text"] == ""
    assert result["tool_call"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}
    out, err = io.StringIO(), io.StringIO()
    run_prompt(model, engine, prompt, RunOptions(), out=out, err=err)
    assert out.getvalue() == "\n" and "call to tool 'get_time' with {\"tz\": \"UTC\"}" in err.getvalue()
    assert "stopped: tool_call" in err.getvalue()


def test_chat_keeps_the_final_answer_in_the_history_and_think_sets_the_effort(tok, ids_of, pinned_date):
    from dflash_cli.chat import ChatSession

    model = _model(tok)
    session = ChatSession(model, _Engine(ids_of(ANALYSIS_THEN_FINAL + "<|return|>")), think=True)
    chunks = list(session.ask("Hi"))
    assert "".join(c.reasoning for c in chunks) == "The user greets; answer briefly. Grüße 🙂"
    assert session.messages[-1] == {"role": "assistant", "content": "Hello! Naïve café 東京."}
    assert session.command("/think off").text == "reasoning effort low" and session.reasoning_effort == "low"
    from dflash_cli.prompt import render_chat

    text = tok.decode(render_chat(tok, session.conversation(), template_kwargs={"reasoning_effort": "low"}).ids,
                      skip_special_tokens=False)
    assert "Reasoning: low" in text and "<|channel|>final<|message|>Hello! Naïve café 東京.<|end|>" in text


def test_the_reasoning_effort_flag(capsys, tmp_path):
    from dflash_cli.cli import main

    from .tiny import copy_stories
    from .tiny_gpt_oss import gpt_oss_config, write_gpt_oss

    t = write_gpt_oss(tmp_path / "gpt-oss", gpt_oss_config(), seed=1)
    code = main(["run", "--target", str(t), "--device", "cpu", "-p", "hi", "-n", "3", "--json", "-q",
                 "--reasoning-effort", "high"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["generated_tokens"] <= 3, err
    assert main(["run", "--target", str(t), "-p", "hi", "--reasoning-effort", "extreme"]) == 2
    assert capsys.readouterr().err.strip() == "Error: --reasoning-effort must be one of low, medium, high, got 'extreme'"
    code = main(["run", "--target", str(copy_stories(tmp_path / "stories")), "--device", "cpu", "-p", "Once", "-n",
                 "2", "--reasoning-effort", "low"])
    assert code == 0 and "--reasoning-effort has no effect" in capsys.readouterr().err


def test_run_without_think_flags_renders_the_templates_own_effort(capsys, tmp_path, pinned_date):
    """No --think/--no-think: the template's medium, as chat and serve (run used to send high)."""
    from dflash_cli.cli import main

    from .tiny_gpt_oss import gpt_oss_config, write_gpt_oss

    t = write_gpt_oss(tmp_path / "gpt-oss", gpt_oss_config(), seed=1)

    def prompt_tokens(*flags: str) -> int:
        assert main(["run", "--target", str(t), "--device", "cpu", "-p", "hi", "-n", "1", "--json", "-q", *flags]) == 0
        return json.loads(capsys.readouterr().out)["prompt_tokens"]

    assert prompt_tokens() == prompt_tokens("--reasoning-effort", "medium") != prompt_tokens("--think")


# ---- serve ----------------------------------------------------------------------------------------------
def test_serve_streams_harmony_as_reasoning_content_and_a_tool_call(tok, ids_of):
    """The worker splits a harmony answer by token id; the chat answer sends reasoning_content, content,
    and the call as OpenAI tool_calls with finish_reason tool_calls, streamed or whole alike."""
    import asyncio

    from dflash_cli.sampling import SamplingParams
    from dflash_cli.serve.answer import ChatAnswer
    from dflash_cli.serve.prompting import chat_prompt
    from dflash_cli.serve.protocol import parse_chat
    from dflash_cli.serve.worker import EngineWorker, Job, Started, Text

    out = ids_of("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>commentary<|message|>"
                 "Checking.<|end|><|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>"
                 '{"tz": "UTC"}<|call|>')
    worker = EngineWorker(_model(tok), _Engine(out), max_queue=1, log=lambda line: None)
    body = {"model": "m", "messages": [{"role": "user", "content": "Time?"}], "reasoning_effort": "minimal",
            "tools": [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]}
    req = parse_chat(body, "m")
    assert req.template_kwargs["reasoning_effort"] == "low"  # harmony's nearest level
    loop = asyncio.new_event_loop()
    try:
        job = Job(lambda t: chat_prompt(t, req.messages, tools=req.tools, template_kwargs=req.template_kwargs),
                  400, SamplingParams(), loop=loop)
        fin = worker._run(job)
        loop.run_until_complete(asyncio.sleep(0))
        events = []
        while not job.events.empty():
            events.append(job.events.get_nowait())
    finally:
        loop.close()
    assert isinstance(events[0], Started) and fin.finish == "tool_call"
    texts = [e for e in events if isinstance(e, Text)]
    assert "".join(e.reasoning for e in texts) == "Look it up." and "".join(e.text for e in texts) == "Checking."
    for streamed in (True, False):
        answer = ChatAnswer(req, events[0], "m")
        deltas = [d for e in texts for d in answer.feed(e.text, e.reasoning, e.tool_call)]
        if streamed:
            deltas += answer.closing(fin)
            assert deltas[-1]["choices"][0]["finish_reason"] == "tool_calls"
            calls = [c for d in deltas for c in d["choices"][0]["delta"].get("tool_calls", [])]
            assert [c["function"] for c in calls] == [{"name": "get_time", "arguments": '{"tz": "UTC"}'}]
        else:
            whole = answer.whole(fin)["choices"][0]
            message = whole["message"]
            assert whole["finish_reason"] == "tool_calls"
            assert (message["reasoning_content"], message["content"]) == ("Look it up.", "Checking.")
            assert message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}
