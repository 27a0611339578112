"""`dflash chat`: the terminal chat (the session and its loop are ../chat.py)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .options import MODEL_OPTIONS, OUTPUT, QUANTIZE, REASONING_OPTIONS, SAMPLING_OPTIONS, SYSTEM, with_groups

if TYPE_CHECKING:
    from ..api import ModelOptions
    from ..formats import Reasoning
    from ..sampling import SamplingParams


@with_groups
def chat(
    model: ModelOptions = MODEL_OPTIONS,
    quantize: Optional[str] = QUANTIZE,
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", min=1, metavar="N", help="Most tokens per answer."),
    sampling: SamplingParams = SAMPLING_OPTIONS,
    system: Optional[str] = SYSTEM,
    reasoning: Reasoning = REASONING_OPTIONS,
    plain: bool = typer.Option(False, "--plain", help="Plain text: no Markdown rendering, no live status line.", rich_help_panel=OUTPUT),
    show_drafts: bool = typer.Option(False, "--show-drafts", help="Colour tokens by origin: accepted draft or the target's own.", rich_help_panel=OUTPUT),
    history: Optional[Path] = typer.Option(None, "--history", metavar="FILE", help="Input history file (default: ~/.local/share/dflash/history).", rich_help_panel=OUTPUT),
) -> None:
    """Chat in the terminal, with live speed and acceptance.

    \b
    Enter sends; Alt-Enter (or Esc then Enter) starts a new line. Ctrl-C stops an answer,
    Ctrl-D leaves. Type /help for commands (/system, /set, /think, /clear, /save, /load, /stats).
    --quantize int4 runs a 27B pair on a 24 GB card (`dflash models` shows what fits).
    """
    from .. import precision
    from ..api import open_session
    from ..chat import ChatSession, run_chat

    pair = open_session(precision.apply(model, quantize))
    session = ChatSession(pair.model, pair.engine, sampling=sampling, max_tokens=max_tokens, system=system,
                          think=reasoning.think, reasoning_effort=reasoning.effort)
    run_chat(session, plain=plain, show_drafts=show_drafts, history=history)
