"""`dflash chat`: the conversation, its slash commands and transcripts, and the terminal loop.

`ChatSession` holds everything that is not the terminal (messages, settings, statistics) so tests
reach it directly; `run_chat` is the prompt-toolkit loop around it. Ctrl-C stops an answer and keeps
what was written of it in the conversation; Ctrl-C at the prompt clears the line; Ctrl-D leaves.

A conversation that outgrows the context goes on, as in other chat tools: the oldest turns are left
out of what the model sees (the transcript keeps them), and the chat says so once.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .engine import Engine, Request
from .errors import DflashError, UsageError
from .generate import Chunk, Stats, stream_text
from .formats import Reasoning
from .harmony import ToolCall
from .loader import Model
from .prompt import render_chat
from .jsonl import read_jsonl, validate_messages
from .sampling import KINDS, SamplingParams, setting_problem

if TYPE_CHECKING:
    from prompt_toolkit.history import History

HELP = """\
Commands:
  /help                      this text
  /system TEXT               set the system prompt (/system alone clears it)
  /set NAME VALUE            temperature, top_p, top_k, min_p, max_tokens or seed
  /show                      the current settings
  /think on|off              thinking mode (Qwen3: off by default; gpt-oss: high or low reasoning effort)
  /clear                     start a new conversation
  /save FILE, /load FILE     the conversation as JSONL, one message per line
  /stats                     speed and acceptance for this session
  /exit                      leave (or Ctrl-D)
Enter sends; Alt-Enter (Esc, Enter) starts a new line. Ctrl-C stops an answer.
A message that starts with "/" is sent by doubling it: "//etc/hosts is…" sends "/etc/hosts is…"."""

KIND_WORDS = {float: "a number", int: "a whole number"}


@dataclass
class Reply:
    """What a slash command answers: text to show, and whether to leave."""

    text: str = ""
    exit: bool = False


@dataclass
class ChatSession:
    model: Model
    engine: Engine
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 2048
    system: str | None = None
    think: bool | None = None  # None: the pair's default (loader.Model.thinking)
    reasoning_effort: str | None = None  # for a template that reads it (gpt-oss); None: the template's default
    messages: list[dict] = field(default_factory=list)  # user and assistant turns (system kept apart)
    first_shown: int = 0  # messages before this one no longer fit the context: the model does not see them
    notices: list[str] = field(default_factory=list)  # for the view to show once (and clear)
    told_left_out: bool = False  # the chat said that it leaves out the oldest turns
    answers: list[Stats] = field(default_factory=list)
    live: Stats | None = None  # the answer being generated (updated in place while it streams)
    tool_call: ToolCall | None = None  # the call the last answer ended with (harmony), if any

    # ---- conversation ---------------------------------------------------------------------
    def conversation(self, first: int = 0) -> list[dict]:
        """The system prompt and the turns from `first` on: all of them as /save writes it, or those the
        model still sees."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages[first:]

    def _render(self):
        """The prompt the model sees: the system prompt and the turns that still fit."""
        reasoning, fmt = Reasoning(self.think, self.reasoning_effort), self.model.format
        return render_chat(self.model.tokenizer, self.conversation(self.first_shown), format=fmt,
                           enable_thinking=self.thinking, template_kwargs=reasoning.template_kwargs(fmt))

    @property
    def thinking(self) -> bool:
        """Whether thinking is on: /think or --think, else the pair's default."""
        return Reasoning(self.think, self.reasoning_effort).enable_thinking(self.model.thinking)

    def _leave_out_oldest_turn(self) -> bool:
        """Move past the oldest user turn still shown and its answer; never past the question just asked."""
        last = len(self.messages) - 1
        if self.first_shown >= last:
            return False
        self.first_shown += 1
        while self.first_shown < last and self.messages[self.first_shown]["role"] != "user":
            self.first_shown += 1
        return True

    def _fit(self):
        """The prompt for the question just asked, leaving out the oldest turns until the answer has
        room: `max_tokens`, or half the context if that is less."""
        limit = self.engine.max_context
        room = max(1, min(self.max_tokens, limit // 2))
        prompt, shown = self._render(), self.first_shown
        while len(prompt.ids) + room > limit and self._leave_out_oldest_turn():
            prompt = self._render()
        if len(prompt.ids) >= limit:
            positions = getattr(getattr(self.model.target, "cfg", None), "max_position_embeddings", None)
            system = " with the system prompt" if self.system else ""
            raise DflashError(f"the message is {len(prompt.ids)} tokens{system}; the context holds {limit}"
                              + (" (--max-context raises the limit)" if positions and limit < positions else ""))
        if self.first_shown > shown and not self.told_left_out:
            self.told_left_out = True
            self.notices.append(f"the conversation outgrew the {limit}-token context: its oldest turns are left out "
                                "of what the model sees from now on (/save keeps them all; /clear starts afresh)")
        return prompt

    def ask(self, text: str, split_drafts: bool = False) -> Iterator[Chunk]:
        """Stream the answer to `text`. Whatever was generated joins the conversation, also when
        the caller stops early (Ctrl-C)."""
        self.messages.append({"role": "user", "content": text})
        shown = self.first_shown
        try:
            prompt = self._fit()
        except BaseException:
            self.messages.pop()
            self.first_shown = shown
            raise
        ids = prompt.ids
        stats, pieces = Stats(), []
        self.live, self.tool_call = stats, None
        request = Request(ids, self.max_tokens, self.model.stop_token_ids, self.sampling,
                          keep_prefix=prompt.keep_prefix)
        steps = stream_text(self.engine, self.model.tokenizer, request, stats, split_drafts=split_drafts,
                            prompt=prompt)
        try:
            first = next(steps)
        except BaseException:
            self.messages.pop()  # nothing was answered (a prompt too long, Ctrl-C in prefill): forget the question
            raise
        try:
            for chunk in itertools.chain([first], steps):
                pieces.append(chunk.text)
                self.tool_call = chunk.tool_call or self.tool_call
                yield chunk
        finally:
            steps.close()
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            if stats.finish is None:
                stats.finish = "interrupted"
            self.answers.append(stats)

    # ---- slash commands -------------------------------------------------------------------
    def command(self, line: str) -> Reply:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = {
            "/help": lambda: Reply(HELP), "/exit": lambda: Reply(exit=True), "/quit": lambda: Reply(exit=True),
            "/system": lambda: self._system(arg), "/set": lambda: self._set(arg), "/think": lambda: self._think(arg),
            "/clear": self._clear, "/save": lambda: self._save(arg), "/load": lambda: self._load(arg),
            "/stats": lambda: Reply(self.stats_text()), "/show": lambda: Reply(self.settings_text()),
        }.get(name)
        if handler is None:
            raise UsageError(f"unknown command {name} (/help lists them)")
        return handler()

    def _system(self, text: str) -> Reply:
        self.system = text or None
        return Reply(f"system prompt set ({len(text)} characters)" if text else "system prompt cleared")

    def _set(self, arg: str) -> Reply:
        """One setting, checked against the limits `run` checks its flags against: a bad value is
        one line, and the setting (and the conversation) stay as they were."""
        key, _, value = arg.partition(" ")
        if key not in KINDS or not value.strip():
            raise UsageError(f"usage: /set {'|'.join(KINDS)} VALUE")
        kind = KINDS[key]
        try:
            parsed = kind(value.strip())
        except ValueError:
            raise UsageError(f"/set {key}: '{value.strip()}' is not {KIND_WORDS[kind]}") from None
        problem = setting_problem(key, parsed)
        if problem is not None:
            raise UsageError(f"/set {key}: {problem}")
        if key == "max_tokens":
            self.max_tokens = parsed
        else:
            self.sampling = replace(self.sampling, **{key: parsed})
        return Reply(f"{key} = {parsed}")

    def _think(self, arg: str) -> Reply:
        if arg not in ("on", "off"):
            raise UsageError("usage: /think on|off")
        self.think = arg == "on"
        if self.model.format.think_by_effort:  # gpt-oss always reasons: on and off are its high and low effort
            self.reasoning_effort = self.model.format.template_effort(None, self.think)
            return Reply(f"reasoning effort {self.reasoning_effort}")
        template = getattr(self.model.tokenizer, "chat_template", None) or ""
        caveat = "" if "enable_thinking" in template else " (this model's chat template has no thinking mode)"
        return Reply(f"thinking {arg}{caveat}")

    def settings_text(self) -> str:
        """/show: every setting /set changes, as /set names it, then what decodes and where."""
        p = self.sampling
        values = {
            "temperature": f"{p.temperature:g}" + (" (greedy)" if p.greedy else ""),
            "top_p": f"{p.top_p:g}" + (" (off)" if p.top_p == 1 else ""),
            "top_k": f"{p.top_k}" + (" (off)" if p.top_k == 0 else ""),
            "min_p": f"{p.min_p:g}" + (" (off)" if p.min_p == 0 else ""),
            "max_tokens": str(self.max_tokens),
            "seed": "random" if p.seed is None else str(p.seed),
        }
        effort = f" (reasoning effort {self.reasoning_effort})" if self.reasoning_effort else ""
        system = "none" if not self.system else json.dumps(self.system, ensure_ascii=False)
        seen = f" ({len(self.messages) - self.first_shown} seen by the model)" if self.first_shown else ""
        lines = [f"{name} = {value}" for name, value in values.items()]
        lines += [f"think = {'on' if self.thinking else 'off'}{effort}", f"system = {system}",
                  f"{self.model.target_dir.name} · {self.engine.describe()} · context {self.engine.max_context} tokens"
                  f" · {len(self.messages)} messages{seen}"]
        return "\n".join(lines)

    def _clear(self) -> Reply:
        self.messages, self.first_shown = [], 0
        return Reply("conversation cleared" + (" (the system prompt stays: /system alone clears it)" if self.system else ""))

    def _save(self, path: str) -> Reply:
        if not path:
            raise UsageError("usage: /save FILE")
        save_transcript(Path(path).expanduser(), self.conversation())
        return Reply(f"saved {len(self.conversation())} messages to {path}")

    def _load(self, path: str) -> Reply:
        if not path:
            raise UsageError("usage: /load FILE")
        messages = load_transcript(Path(path).expanduser())
        self.system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        self.messages, self.first_shown = [m for m in messages if m["role"] != "system"], 0
        return Reply(f"loaded {len(messages)} message{'' if len(messages) == 1 else 's'} from {path}")

    # ---- statistics -----------------------------------------------------------------------
    def histogram(self) -> Counter:
        return Counter(t for s in self.answers for t in s.acceptance_lengths)

    def stats_text(self) -> str:
        from .adaptive import position_rates
        from .ui import block_size_mix, rates_line, tau_bars

        if not self.answers:
            return "no answers yet"
        tokens = sum(s.generated for s in self.answers)
        decode = sum(s.decode_seconds for s in self.answers)
        taus = [t for s in self.answers for t in s.acceptance_lengths]
        sizes = [b for s in self.answers for b in s.block_sizes]
        tps = sum(max(s.generated - 1, 0) for s in self.answers) / decode if decode else 0.0
        mean = sum(taus) / len(taus) if taus else 0.0
        count = f"{len(self.answers)} answer{'' if len(self.answers) == 1 else 's'}"
        largest = self.engine.block_size
        lines = [f"{count} · {tokens} tokens · {tps:.1f} tok/s · mean τ {mean:.2f} · {self.engine.describe()}",
                 f"τ 1…{largest}: {tau_bars(self.histogram(), largest)}",
                 f"block sizes: {block_size_mix(sizes)}"]
        if largest > 1:
            lines.append(f"acceptance by position: {rates_line(position_rates(sizes, taus, largest - 1))}")
        return "\n".join(lines)


def save_transcript(path: Path, messages: list[dict]) -> None:
    """JSONL, written atomically: a crash or a full disk never leaves half a transcript behind."""
    path = path.resolve()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DflashError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for m in messages:
                f.write(json.dumps({"role": m["role"], "content": m["content"]}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DflashError(f"cannot write {path}: {e.strerror}") from None


def load_transcript(path: Path) -> list[dict]:
    """A transcript written by /save: one {role, content} per line, a system message only first."""
    messages = []
    for n, item in read_jsonl(path):
        message = validate_messages([item], f"{path}:{n}")[0]
        if message["role"] == "system" and messages:
            raise DflashError(f"{path}:{n}: a system message can only be the first message")
        messages.append(message)
    return messages


# ---- the terminal loop -----------------------------------------------------------------------
def default_history() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "dflash" / "history"


def open_history(path: Path, warn: Callable[[str], None]) -> History:
    """The input history in `path`, kept across sessions; in memory only (with a warning) where
    the file cannot be written, e.g. a read-only home directory."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        warn(f"input history is not saved: cannot write {path} ({e.strerror})")
        return InMemoryHistory()
    return FileHistory(str(path))


def _line_reader(history: Path | None, warn: Callable[[str], None]):
    """prompt-toolkit input on a terminal (history, editing keys, Alt-Enter for a new line);
    plain lines from stdin otherwise, so `dflash chat < questions.txt` works too."""
    if not sys.stdin.isatty():
        def read() -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.removesuffix("\n").removesuffix("\r")  # a Windows line end too
        return read
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    session = PromptSession(history=open_history(history or default_history(), warn), key_bindings=keys,
                            multiline=False)
    return lambda: session.prompt(">>> ", prompt_continuation="... ")


def run_chat(session: ChatSession, *, plain: bool = False, show_drafts: bool = False,
             history: Path | None = None) -> None:
    from .ui import ChatView

    view = ChatView(session, plain=plain, show_drafts=show_drafts)
    view.banner()
    read = _line_reader(history, view.note)
    terminal = sys.stdin.isatty()
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            if not terminal:  # questions from a pipe: Ctrl-C ends the chat (exit 130), as it ends `cat`
                raise
            continue  # Ctrl-C at the prompt clears the line, as in a shell
        except EOFError:
            view.note("bye")
            return
        if not line.strip():
            continue
        if line.startswith("//"):  # the escape for a message that starts with "/"
            line = line[1:]
        elif line.startswith("/"):
            try:
                reply = session.command(line)
            except DflashError as e:
                view.error(str(e))
                continue
            if reply.text:
                view.note(reply.text)
            if reply.exit:
                return
            continue
        try:
            view.answer(session.ask(line, split_drafts=show_drafts))
        except DflashError as e:
            view.error(str(e))
