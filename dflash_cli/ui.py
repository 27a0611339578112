"""What `dflash chat` shows: the answer as it commits, a live status line (speed, acceptance τ,
a histogram of accepted lengths), Markdown once the answer ends, and a one-line summary.

`--show-drafts` colours text by origin: green for tokens the drafter proposed and the target
accepted, the default colour for tokens the target produced itself (underlined instead of green
under NO_COLOR). Colour and the live line are off when stdout is not a terminal and with --plain;
NO_COLOR turns colour off. Unless both stdin and stdout are a terminal (`dflash chat < questions.txt`,
`dflash chat > answers.txt`), stdout carries the answers only: the banner, notes and statistics go to
stderr, as `run` keeps them.
"""
from __future__ import annotations

import sys
import threading
from collections import Counter
from typing import Iterator

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from .generate import Chunk, Stats

BARS = " ▁▂▃▄▅▆▇█"
DRAFT_STYLE = "green"
REASONING_STYLE = "dim italic"


def tau_bars(histogram: Counter, block_size: int) -> str:
    """One bar per acceptance length 1…B, scaled to the most frequent."""
    peak = max(histogram.values(), default=0) or 1
    return "".join(BARS[round(8 * histogram.get(t, 0) / peak)] for t in range(1, block_size + 1))


def drafted_tokens(chunk: Chunk) -> int:
    """How many of the chunk's tokens came from accepted drafts (they come first in the step)."""
    step = chunk.step
    return 0 if step.prefill else min(step.accepted, len(step.tokens))


def block_size_mix(sizes: list[int]) -> str:
    """How often each block size ran: 'b 1 ×120 · b 8 ×30' (no iterations: '-')."""
    counts = Counter(sizes)
    return " · ".join(f"b {b} ×{counts[b]}" for b in sorted(counts)) or "-"


def rates_line(rates: list[float | None]) -> str:
    """Per-position acceptance as percentages, '-' where no iteration reached the position."""
    return " ".join("-" if r is None else f"{100 * r:.0f}%" for r in rates)


def status_line(stats: Stats, block_size: int, drafted: int | None = None, draft_style: str = DRAFT_STYLE) -> Text:
    """tok/s (decode, as in the summary), the block size and why ('b 16 · τ 6.1', 'b 1 · drafting
    paused: τ 1.2 < break-even 1.5'), the τ histogram, tokens so far; with `drafted`, how many of
    those tokens the drafter wrote, in the draft colour."""
    taus = stats.acceptance_lengths
    why = stats.decision.describe() if stats.decision else f"τ {stats.mean_acceptance:.2f}"
    line = Text(f"{stats.tokens_per_second:6.1f} tok/s · {why} · {tau_bars(Counter(taus), block_size)} · "
                f"{stats.generated} tokens", style="dim cyan")
    if drafted is not None:
        line.append(" · ")
        line.append(f"{drafted} drafted", style=draft_style)
        line.append(f" + {stats.generated - drafted} target")
    return line


def screen_tail(text: Text, console: Console, height: int) -> list[Text]:
    """The last `height` screen lines of `text`, each at most the console's width. Only the end is
    wrapped: the live view redraws many times a second, and an answer can run to pages."""
    width = console.size.width
    start = max(0, len(text) - 2 * height * width)
    if start:
        newline = text.plain.find("\n", start, start + height * width)
        text = text[newline + 1 if newline >= 0 else start:]
    return list(text.wrap(console, width))[-height:]


def rows_at(line_cells: list[int], width: int) -> int:
    """Screen rows that lines of these widths fill once a terminal reflows them to `width`."""
    return sum(max(1, -(-cells // width)) for cells in line_cells)


class AnswerMarkdown(Markdown):
    """Markdown that keeps the model's single newlines. CommonMark joins them into one line, which
    would change the text on screen: poems, addresses and lists without markers lose their breaks."""

    def __init__(self, markup: str, **kwargs) -> None:
        super().__init__(markup, **kwargs)
        for block in self.parsed:
            for token in block.children or ():
                if token.type == "softbreak":
                    token.type = "hardbreak"


class LiveFrame:
    """The live view's frame (the answer's last lines, then the status line) laid out for the
    terminal's current size, never taller than the screen.

    Every line is wrapped here, so the number of screen rows the frame fills is known. When the
    terminal is resized it reflows what is on screen (a narrower window turns one long line into
    several rows): `rows_on_screen` says how many rows the last frame fills now, which is what the
    next redraw must erase, or stale lines are left behind."""

    def __init__(self, console: Console):
        self.console = console
        self.cells: list[int] = []  # the width of each line drawn last
        self.width: int | None = None

    def rows_on_screen(self) -> int | None:
        """Rows the last frame fills after a resize (None: the size has not changed)."""
        width, height = self.console.size
        if self.width is None or width == self.width:
            return None
        return min(rows_at(self.cells, width), height)

    def layout(self, text: Text, status: Text) -> Text:
        width, height = self.console.size
        status_lines = list(status.wrap(self.console, width))  # it may wrap in a narrow window
        tail = screen_tail(text, self.console, max(1, height - 1 - len(status_lines)))
        lines = ([] if not text.plain else tail) + status_lines
        self.cells, self.width = [line.cell_len for line in lines], width
        return Text("\n").join(lines)


class ChatView:
    def __init__(self, session, *, plain: bool = False, show_drafts: bool = False, console: Console | None = None):
        self.session = session
        self.console = console or Console(highlight=False)
        self.err = console or Console(stderr=True, highlight=False)
        # notes and statistics: beside the answers on a terminal, apart from them in a pipe
        typed = sys.stdin is not None and sys.stdin.isatty()
        self.info = self.console if self.console.is_terminal and typed else self.err
        self.plain = plain or not self.console.is_terminal
        self.show_drafts = show_drafts and not self.plain
        self.draft_style = "underline" if self.console.no_color else DRAFT_STYLE

    def banner(self) -> None:
        m, e = self.session.model, self.session.engine
        mode = e.describe()
        if e.graphs.enabled or e.adaptive:
            with self.info.status("capturing CUDA graphs…" if e.graphs.enabled else "measuring block sizes…"):
                e.warm_up(self.session.sampling)
        self.note(f"{m.target_dir.name} · {mode} · {m.target.device} · /help for commands, Ctrl-D to leave")

    def note(self, text: str) -> None:
        self.info.print(Text(text, style="dim"), soft_wrap=True)

    def error(self, text: str) -> None:
        # soft_wrap: one line even in a pipe (rich would break it at 80 columns); a terminal wraps it
        self.err.print(Text(f"Error: {text}", style="red"), soft_wrap=True)

    def answer(self, chunks: Iterator[Chunk]) -> None:
        """Stream one answer; Ctrl-C stops it (the session keeps what was written) and is not re-raised.
        Reasoning (`<think>`) is shown dimmed before the answer (on stderr in plain mode)."""
        text, drafted = Text(), [0]
        self._reasoning = Text(style=REASONING_STYLE)
        try:
            if self.plain:
                self._stream_plain(chunks, text)
            else:
                self._stream_live(chunks, text, drafted)
        except KeyboardInterrupt:
            chunks.close()
            if self.plain:
                self.console.file.write("\n" if text.plain and not text.plain.endswith("\n") else "")
            else:
                if self._reasoning.plain:
                    self.console.print(self._reasoning)
                self.console.print(text)
            self.info.print(Text("[stopped]", style="yellow"))
        else:
            if not self.plain:
                if self._reasoning.plain:
                    self.console.print(self._reasoning)
                self.console.print(text if self.show_drafts else AnswerMarkdown(text.plain))
        notices = getattr(self.session, "notices", [])  # e.g. that the oldest turns are now left out
        for notice in notices:
            self.note(notice)
        notices.clear()
        answers = self.session.answers
        stats = answers[-1] if answers and answers[-1] is self.session.live else None  # None: stopped in prefill
        if stats is not None:
            self.note(stats.summary() + (f" · {drafted[0]} drafted" if self.show_drafts else ""))
        call = getattr(self.session, "tool_call", None)
        if call is not None:  # harmony: the model called a tool; chat has none to run
            self.note(f"[tool call {call.name}: {call.arguments}] (dflash chat has no tools)")

    def _stream_plain(self, chunks: Iterator[Chunk], text: Text) -> None:
        out = self.console.file
        for chunk in chunks:
            if chunk.reasoning:
                self.err.file.write(chunk.reasoning)
                self.err.file.flush()
            text.append(chunk.text)
            out.write(chunk.text)
            out.flush()
        out.write("\n")

    def _stream_live(self, chunks: Iterator[Chunk], text: Text, drafted: list[int]) -> None:
        block = self.session.engine.block_size
        lock = threading.Lock()  # Live redraws from its own thread; rich's Text is not thread-safe
        started: list[Stats] = []

        frame = LiveFrame(self.console)
        live: Live | None = None

        def render():
            with lock:
                reflowed = frame.rows_on_screen()
                if reflowed is not None and live is not None:
                    # Live erases as many rows as it drew; after a resize the terminal has reflowed
                    # them into `reflowed` rows, and those are what the redraw must erase.
                    live._live_render._shape = (self.console.size.width, reflowed)
                shown = Text.assemble(self._reasoning, "\n\n" if self._reasoning.plain and text.plain else "", text)
                if not started:
                    return frame.layout(shown, Text("prefill…", style="dim cyan"))
                return frame.layout(shown, status_line(started[0], block, drafted[0] if self.show_drafts else None,
                                                      self.draft_style))

        with Live(console=self.console, transient=True, refresh_per_second=12, get_renderable=render) as live:
            for chunk in chunks:
                with lock:
                    if not started:
                        started.append(self.session.live)
                    self._reasoning.append(chunk.reasoning)
                    if self.show_drafts and chunk.draft_chars:
                        text.append(chunk.text[: chunk.draft_chars], style=self.draft_style)
                        text.append(chunk.text[chunk.draft_chars:])
                    else:
                        text.append(chunk.text)
                    drafted[0] += drafted_tokens(chunk)
