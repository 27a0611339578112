"""The chat session without a terminal: turns, slash commands, transcripts, interruption."""
from __future__ import annotations

import io
import json
import re

import pytest
from prompt_toolkit.history import FileHistory, InMemoryHistory
from rich.console import Console
from rich.text import Text

from dflash_cli import loader
from dflash_cli.chat import ChatSession, load_transcript, open_history, save_transcript
from dflash_cli.engine import Engine
from dflash_cli.errors import DflashError, UsageError
from dflash_cli.ui import AnswerMarkdown, ChatView, LiveFrame, status_line


@pytest.fixture
def session(qwen3_chat_pair):
    m = loader.load(*qwen3_chat_pair, device="cpu", max_context=256)
    return ChatSession(m, Engine(m.target, m.drafter, max_context=m.max_context), max_tokens=12)


def test_turns_join_the_conversation_and_reuse_the_cache(session):
    first = "".join(c.text for c in session.ask("Hello"))
    assert session.messages == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}]
    cached = len(session.engine._cached_ids)
    list(session.ask("And then?"))
    assert len(session.messages) == 4 and cached > 10
    assert session.answers[-1].prompt_tokens > cached  # the second prompt holds the whole first turn


def test_interrupted_answer_keeps_what_was_written(session):
    stream = session.ask("Tell me a story")
    got = [next(stream).text, next(stream).text]
    stream.close()  # what Ctrl-C does
    assert session.messages[-1] == {"role": "assistant", "content": "".join(got)}
    assert session.answers[-1].finish == "interrupted"


def test_a_question_that_fails_is_not_kept(session):
    with pytest.raises(DflashError, match=r"^the message is \d+ tokens; the context holds 256 "
                                          r"\(--max-context raises the limit\)$"):
        list(session.ask("word " * 400))
    assert session.messages == []


def test_slash_commands(session):
    assert "/set NAME VALUE" in session.command("/help").text
    session.command("/system Be brief.")
    assert session.conversation()[0] == {"role": "system", "content": "Be brief."}
    session.command("/set temperature 0.7")
    session.command("/set top_k 20")
    session.command("/set max_tokens 3")
    assert (session.sampling.temperature, session.sampling.top_k, session.max_tokens) == (0.7, 20, 3)
    session.command("/think on")
    assert session.think
    with pytest.raises(UsageError, match="/set top_p: 'lots' is not a number"):
        session.command("/set top_p lots")
    with pytest.raises(UsageError, match="/set top_k: '2.5' is not a whole number"):
        session.command("/set top_k 2.5")
    with pytest.raises(UsageError, match=r"^/set top_p: must be in \[1e-06, 1\], got 2.0$"):
        session.command("/set top_p 2")
    for value in ("nan", "inf", "-1"):
        with pytest.raises(UsageError, match=f"^/set temperature: must be a finite number >= 0, got {value}"):
            session.command(f"/set temperature {value}")
    assert session.sampling.temperature == 0.7
    with pytest.raises(UsageError, match="unknown command /nope"):
        session.command("/nope")
    assert session.command("/stats").text == "no answers yet"
    list(session.ask("Hi"))
    assert session.command("/stats").text.startswith("1 answer · ")
    assert session.command("/clear").text == "conversation cleared (the system prompt stays: /system alone clears it)"
    assert session.messages == [] and session.system == "Be brief."
    assert session.command("/exit").exit


def test_save_and_load_round_trip(session, tmp_path):
    session.command("/system Be brief.")
    list(session.ask("Hi"))
    path = tmp_path / "chat.jsonl"
    session.command(f"/save {path}")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [m["role"] for m in lines] == ["system", "user", "assistant"]
    other = ChatSession(session.model, session.engine)
    assert other.command(f"/load {path}").text == f"loaded 3 messages from {path}"
    assert other.conversation() == session.conversation()


def test_save_is_atomic_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "chat.jsonl"
    save_transcript(path, [{"role": "user", "content": "old"}])

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(DflashError, match="cannot write .*No space left on device"):
        save_transcript(path, [{"role": "user", "content": "new"}])
    assert load_transcript(path) == [{"role": "user", "content": "old"}]
    assert [p.name for p in tmp_path.iterdir()] == ["chat.jsonl"]


def test_bad_transcripts_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"role": "user", "content": "ok"}\n{"role": "robot", "content": "x"}\n')
    with pytest.raises(DflashError, match=r"bad.jsonl:2: each message needs a role"):
        load_transcript(path)
    path.write_text('{"role": "user", "content": "ok"}\n{"role": "system", "content": "late"}\n')
    with pytest.raises(DflashError, match=r"bad.jsonl:2: a system message can only be the first"):
        load_transcript(path)
    path.write_text("not json\n")
    with pytest.raises(DflashError, match=r"bad.jsonl:1: not valid JSON"):
        load_transcript(path)
    with pytest.raises(DflashError, match="cannot read"):
        load_transcript(tmp_path / "missing.jsonl")


def test_show_drafts_separates_drafted_text(stories_model):
    """With split_drafts each chunk says how much of its text came from accepted drafts."""
    m = stories_model
    session = ChatSession(m, Engine(m.target, m.drafter), max_tokens=60)
    chunks = list(session.ask("Once upon a time", split_drafts=True))
    drafted = [c for c in chunks if c.draft_chars]
    assert drafted, "the fitted drafter has accepted drafts on this prompt"
    for c in chunks:
        assert 0 <= c.draft_chars <= len(c.text)
        assert c.draft_chars == 0 or c.step.accepted > 0
    assert "".join(c.text for c in chunks) == session.messages[-1]["content"]


def test_history_falls_back_to_memory_where_it_cannot_be_written(tmp_path):
    warnings = []
    assert isinstance(open_history(tmp_path / "data" / "history", warnings.append), FileHistory)
    (tmp_path / "file").write_text("")
    assert isinstance(open_history(tmp_path / "file" / "history", warnings.append), InMemoryHistory)
    assert len(warnings) == 1 and warnings[0].startswith("input history is not saved: cannot write")


def test_think_says_when_the_template_has_no_thinking_mode(session, stories_model):
    assert session.command("/think on").text == "thinking on"
    m = stories_model
    other = ChatSession(m, Engine(m.target, m.drafter))
    assert other.command("/think on").text == "thinking on (this model's chat template has no thinking mode)"


# ---- what the terminal shows (a rich console writing to a string) ----------------------------
SGR = re.compile(r"\x1b\[([0-9;]*)m")


def colours(output: str) -> set[int]:
    """Foreground/background colour codes among the output's SGR sequences (39/49 reset to the default)."""
    codes = {int(c) for params in SGR.findall(output) for c in params.split(";") if c}
    return {c for c in codes if 30 <= c <= 49 or 90 <= c <= 107} - {39, 49}


def terminal(**kw) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=100, height=30,
                   highlight=False, **kw)


@pytest.fixture
def stories_session(stories_model):
    m = stories_model
    return ChatSession(m, Engine(m.target, m.drafter), max_tokens=60)


def test_show_drafts_colours_drafted_text_green(stories_session):
    view = ChatView(stories_session, show_drafts=True, console=terminal())
    view.answer(stories_session.ask("Once upon a time", split_drafts=True))
    out = view.console.file.getvalue()
    assert "\x1b[32m" in out  # green: tokens the drafter wrote
    summary = out.splitlines()[-1]
    drafted = int(re.search(r"· (\d+) drafted", summary).group(1))
    assert 0 < drafted < 60 and summary.startswith("\x1b[2m60 tokens ·")


def test_no_color_and_plain_output(stories_session, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    view = ChatView(stories_session, show_drafts=True, console=terminal())
    view.answer(stories_session.ask("Once upon a time", split_drafts=True))
    out = view.console.file.getvalue()
    assert not colours(out) and "\x1b[4m" in out  # drafted text is underlined instead

    monkeypatch.delenv("NO_COLOR")
    pipe = Console(file=io.StringIO(), width=100)  # not a terminal: plain text, no live status line
    view = ChatView(stories_session, show_drafts=True, console=pipe)
    view.answer(stories_session.ask("Once upon a time", split_drafts=True))
    out = pipe.file.getvalue()
    assert "\x1b" not in out and "tok/s ·" not in out.splitlines()[0]
    assert out.splitlines()[0] == stories_session.messages[-1]["content"].splitlines()[0]
    assert re.fullmatch(r"60 tokens · [\d.]+ tok/s · τ [\d.]+ · prompt \d+ tokens in [\d.]+ s · stopped: length",
                        out.splitlines()[-1])


def test_ctrl_c_in_the_view_stops_the_answer_and_keeps_it(stories_session):
    def interrupted(stream, after):
        try:
            for i, chunk in enumerate(stream):
                if i == after:
                    raise KeyboardInterrupt
                yield chunk
        finally:
            stream.close()

    view = ChatView(stories_session, console=terminal())
    view.answer(interrupted(stories_session.ask("Once upon a time"), 3))  # does not raise
    out = view.console.file.getvalue()
    assert "[stopped]" in out and "tok/s" in out.splitlines()[-1]
    assert stories_session.answers[-1].finish == "interrupted"
    assert stories_session.messages[-1]["content"] and len(stories_session.messages) == 2


def test_final_markdown_keeps_single_newlines():
    text = "too high.\nLily's mom said\n\n**bold** and\n- a list\n\n```\ncode\n  indented\n```"
    console = Console(file=io.StringIO(), width=60, color_system=None)
    console.print(AnswerMarkdown(text))
    lines = [line.rstrip() for line in console.file.getvalue().splitlines()]
    assert lines[:2] == ["too high.", "Lily's mom said"] and "bold and" in lines
    assert any(line.strip() == "indented" for line in lines) and "too high. Lily's" not in console.file.getvalue()


def test_live_frame_fits_the_screen_with_a_wrapping_status_line(stories_session):
    console = terminal()
    console.size = (40, 15)
    frame = LiveFrame(console)
    list(stories_session.ask("Once upon a time"))
    status = status_line(stories_session.answers[-1], 8, drafted=12)
    assert status.cell_len > 40  # wraps in a 40-column window
    drawn = frame.layout(Text("word " * 400), status)
    rows = drawn.plain.split("\n")
    assert len(rows) == 14 and all(len(r) <= 40 for r in rows)  # a row for the cursor below the frame
    assert rows[-2:] == [line.plain for line in status.wrap(console, 40)]
    assert frame.rows_on_screen() is None  # no resize yet


def test_live_frame_knows_the_rows_a_resize_reflowed(stories_session):
    console = terminal()
    console.size = (120, 40)
    frame = LiveFrame(console)
    frame.layout(Text("x" * 115 + "\n" + "y" * 30), Text("status " * 10))  # lines of 115, 30 and 69 cells
    console.size = (60, 20)
    assert frame.rows_on_screen() == 2 + 1 + 2
    console.size = (30, 4)
    assert frame.rows_on_screen() == 4  # no more rows than the screen has


def test_status_line_and_stats_say_which_block_size_and_why(stories_model):
    """The live line shows the block size and why ('b 8 · τ 6.1', or drafting paused with the figures);
    /stats adds how often each block size ran and the acceptance at each draft position."""
    from dflash_cli.adaptive import Decision
    from dflash_cli.engine import Engine
    from dflash_cli.generate import Stats

    stats = Stats(token_ids=[1] * 9, decode_seconds=1.0, acceptance_lengths=[7, 1], block_sizes=[8, 1])
    stats.decision = Decision(8, 6.14, 1.5)
    assert "b 8 · τ 6.1 · " in status_line(stats, 8).plain
    stats.decision = Decision(1, 1.0, 1.0, 8, 1.23, 1.54)
    assert "b 1 · drafting paused: τ 1.2 < break-even 1.5 · " in status_line(stats, 8).plain
    session = ChatSession(stories_model, Engine(stories_model.target, stories_model.drafter, adaptive=True))
    list(session.ask("Once upon a time"))
    text = session.command("/stats").text
    assert "DFlash, block size auto (1…8)" in text
    assert "block sizes: b " in text and "acceptance by position: " in text
    assert session.live.decision is not None and session.live.block_sizes
