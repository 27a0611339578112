"""JSON Lines input shared by batch prompts and chat transcripts: one value per line, and
errors that name the file and the line."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import DflashError

ROLES = ("system", "user", "assistant")


def read_jsonl(path: Path, error: type[DflashError] = DflashError, label: str = "") -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line of `path`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {label}{path}: {getattr(e, 'strerror', None) or e}") from None
    values = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                values.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return values


def validate_messages(items: list, where: str, error: type[DflashError] = DflashError) -> list[dict]:
    """Chat messages: each a {role, content} with a known role and string content."""
    for m in items:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise error(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in items]
