"""Chat formats: how a conversation becomes prompt ids, and how the answer's tokens become
reasoning, content and tool calls. One module per format; the format is chosen once, at load, from
the tokenizer (`detect`), and every front end (run, chat, serve, the Python API, train) renders and
parses through it.

- `plain`: no chat template (or `--raw`): the answer is all content.
- `think_tags`: a chat template; `<think>…</think>` is reasoning (Qwen3, Qwen3.5, and any other).
- `harmony`: gpt-oss; messages split by token id, analysis is reasoning, a recipient is a tool call.
- `gemma4`: Gemma 4; split by token id, the thought channel is reasoning, `<|tool_call>` a tool call.

The thinking default has one source, the pair (`thinking_default`): a drafter's own
`dflash_config.enable_thinking` (written by `dflash train`), else the registry row of a released
pair, else off.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .base import AnswerDelta, AnswerParser, ChatFormat, ChatPrompt, apply_template, encode_raw
from .plain import PLAIN, Plain
from .think_tags import THINK_TAGS, ThinkTags

__all__ = ["AnswerDelta", "AnswerParser", "ChatFormat", "ChatPrompt", "EFFORTS", "PLAIN", "Plain", "Reasoning",
           "THINK_TAGS", "ThinkTags", "apply_template", "check_effort", "detect", "encode_raw", "thinking_default"]

EFFORTS = ("low", "medium", "high")  # --reasoning-effort (the API's reasoning_effort has more names: serve/protocol)


def detect(tokenizer) -> ChatFormat:
    """The format of a checkpoint's answers, from its tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN
    from ..harmony import HarmonyTokens

    tokens = HarmonyTokens.of(tokenizer)
    if tokens is not None:
        from .harmony import Harmony

        return Harmony(tokens)
    from .gemma4 import Gemma4, Gemma4Tokens

    gemma = Gemma4Tokens.of(tokenizer)
    if gemma is not None:
        return Gemma4(gemma)
    return THINK_TAGS


def check_effort(effort: str | None, flag: str = "--reasoning-effort") -> str | None:
    if effort is not None and effort not in EFFORTS:
        raise UsageError(f"{flag} must be one of {', '.join(EFFORTS)}, got '{effort}'")
    return effort


@dataclass(frozen=True)
class Reasoning:
    """What the user asked for: `--think/--no-think` (None: the pair's default) and `--reasoning-effort`
    (None: the template's default). `resolve` turns it into what the template is given."""

    think: bool | None = None
    effort: str | None = None

    def enable_thinking(self, default: bool) -> bool:
        return default if self.think is None else self.think

    def effort_for(self, fmt: ChatFormat) -> str | None:
        return fmt.template_effort(self.effort, self.think)

    def template_kwargs(self, fmt: ChatFormat) -> dict:
        """The chat-template argument that sets the reasoning effort (gpt-oss's, and any template that
        reads `reasoning_effort`; the others ignore it)."""
        effort = self.effort_for(fmt)
        return {} if effort is None else {"reasoning_effort": effort}


def thinking_default(target_dir: Path | None, drafter_dir: Path | None) -> bool:
    """The thinking mode the pair's drafter was trained with: the chat default.

    The drafter's own `dflash_config.enable_thinking` (what `dflash train` writes), else the registry
    row of the released pair whose drafter (or, without a drafter, whose target) it is, else off."""
    if drafter_dir is not None:
        own = _own_thinking(Path(drafter_dir))
        if own is not None:
            return own
    from .. import registry

    by_drafter = {p.drafter.lower(): p.think for p in registry.all_pairs()}
    repo = _hub_repo(drafter_dir) if drafter_dir is not None else None
    if repo is not None and repo in by_drafter:
        return by_drafter[repo]
    if drafter_dir is None and target_dir is not None:
        repo = _hub_repo(target_dir)
        thinks = {p.think for p in registry.all_pairs() if p.target.lower() == repo}
        if len(thinks) == 1:  # the target's released drafters agree
            return thinks.pop()
    return False


def _own_thinking(drafter_dir: Path) -> bool | None:
    try:
        raw = json.loads((drafter_dir / "config.json").read_text())
    except (OSError, ValueError):  # the loader reads the config and says what is wrong with it
        return None
    value = (raw.get("dflash_config") or {}).get("enable_thinking") if isinstance(raw, dict) else None
    return value if isinstance(value, bool) else None


def _hub_repo(directory: Path) -> str | None:
    """`owner/name` of a directory in the Hugging Face cache (…/models--owner--name/snapshots/REV)."""
    for part in reversed(Path(directory).parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1).lower()
    return None
