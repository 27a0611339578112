"""What `dflash chat` shows: the answer as it commits, a live status line (speed, acceptance τ,
a histogram of accepted lengths), Markdown once the answer ends, and a one-line summary.

`--show-drafts` colours text by origin: green for tokens the drafter proposed and the target
accepted, the default colour for tokens the target produced itself. Colour and the live line are
off when stdout is not a terminal, with NO_COLOR, and with --plain.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from .generate import Chunk, Stats

BARS = " ▁▂▃▄▅▆▇█"
DRAFT_STYLE = "green"


def tau_bars(histogram: Counter, block_size: int) -> str:
    """One bar per acceptance length 1…B, scaled to the most frequent."""
    peak = max(histogram.values(), default=0) or 1
    return "".join(BARS[round(8 * histogram.get(t, 0) / peak)] for t in range(1, block_size + 1))


def status_line(stats: Stats, block_size: int, elapsed: float) -> str:
    taus = stats.acceptance_lengths
    last = taus[-1] if taus else 0
    speed = stats.generated / elapsed if elapsed > 0 else 0.0
    return (f"{speed:6.1f} tok/s · τ {stats.mean_acceptance:.2f} (last {last}) · "
            f"{tau_bars(Counter(taus), block_size)} · {stats.generated} tokens")


class ChatView:
    def __init__(self, session, *, plain: bool = False, show_drafts: bool = False):
        self.session = session
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.plain = plain or not self.console.is_terminal
        self.show_drafts = show_drafts and not self.plain and not os.environ.get("NO_COLOR")

    def banner(self) -> None:
        m, e = self.session.model, self.session.engine
        mode = f"DFlash, block size {e.block_size}" if e.speculative else "plain decoding"
        if e.graphs.enabled:
            with self.console.status("capturing CUDA graphs…"):
                e.warm_up(self.session.sampling)
        self.note(f"{m.target_dir.name} · {mode} · {m.target.device} · /help for commands, Ctrl-D to leave")

    def note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"))

    def error(self, text: str) -> None:
        self.err.print(Text(f"Error: {text}", style="red"))

    def answer(self, chunks: Iterator[Chunk]) -> None:
        text = Text()
        stats = None
        try:
            if self.plain:
                stats = self._stream_plain(chunks)
            else:
                stats = self._stream_live(chunks, text)
        except KeyboardInterrupt:
            chunks.close()  # the session keeps what was written
            answers = self.session.answers
            stats = answers[-1] if answers and answers[-1] is self.session.live else None
            if not self.plain:
                self.console.print(text)
            self.console.print(Text("[stopped]", style="yellow"))
        else:
            if not self.plain:
                self.console.print(text if self.show_drafts else Markdown(text.plain))
        if stats is not None:
            self.note(stats.summary())

    def _stream_plain(self, chunks: Iterator[Chunk]) -> Stats:
        out = sys.stdout
        for chunk in chunks:
            out.write(chunk.text)
            out.flush()
        out.write("\n")
        return self.session.answers[-1]

    def _stream_live(self, chunks: Iterator[Chunk], text: Text) -> Stats:
        block = self.session.engine.block_size
        start = time.perf_counter()
        stats_ref: list[Stats] = []

        def render():
            height = max(3, self.console.size.height - 2)
            lines = text.wrap(self.console, self.console.size.width)
            tail = Text("\n").join(lines[-height:]) if len(lines) > height else text
            status = status_line(stats_ref[0], block, time.perf_counter() - start) if stats_ref else "prefill…"
            return Group(tail, Text(status, style="dim cyan"))

        with Live(console=self.console, transient=True, refresh_per_second=12, get_renderable=render):
            for chunk in chunks:
                if not stats_ref:
                    stats_ref.append(self.session.live)
                if self.show_drafts and chunk.draft_chars:
                    text.append(chunk.text[: chunk.draft_chars], style=DRAFT_STYLE)
                    text.append(chunk.text[chunk.draft_chars:])
                else:
                    text.append(chunk.text)
        return self.session.answers[-1]

