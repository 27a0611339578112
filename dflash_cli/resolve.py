"""From what the user typed (an alias, a Hub id or a directory) to local checkpoint directories.

A model that is not downloaded yet is pulled after asking (or at once with --yes); in a script
without a terminal the answer is a one-line error that says how to pull it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from . import hub, registry
from .errors import DflashError, UsageError

Confirm = Callable[[str], bool]


def ask(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()


def locate(name: str, *, yes: bool = False, confirm: Confirm | None = None, flag: str = "") -> Path:
    """A directory as given, or a Hub repo id from the cache (pulled if missing and allowed)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UsageError(f"{flag + ' ' if flag else ''}{name} is neither a directory nor a Hub repo id (owner/name)")
    cached = hub.local_path(name)
    if cached is not None:
        return cached
    if not yes:
        confirm = confirm or (ask if interactive() else None)
        if confirm is None:
            raise DflashError(f"{name} is not downloaded: run `dflash pull {name}`, or pass --yes to download it now")
        if not confirm(f"{name} is not downloaded. Download it now?"):
            raise DflashError(f"{name} is not downloaded (run `dflash pull {name}`)")
    return hub.pull(name)


def resolve_model(model: str | None, target: str | None, drafter: str | None, *, yes: bool = False,
                  no_spec: bool = False, confirm: Confirm | None = None) -> tuple[Path, Path | None]:
    """(target dir, drafter dir or None) for `MODEL` or `--target/--drafter` (each an id or a dir)."""
    if target is None:
        if model is None:
            raise UsageError("name a model (see `dflash models`), or give --target and --drafter")
        if model.strip().lower() == registry.DEMO:  # shipped in the package: no download
            target_dir, demo_drafter = registry.demo_dirs()
            if no_spec:
                return target_dir, None
            return target_dir, locate(drafter, yes=yes, confirm=confirm, flag="--drafter") if drafter else demo_drafter
        pair = registry.resolve(model)
        if not pair.supported:
            raise DflashError(f"{pair.alias} is not supported by this version yet ({pair.note})")
        target, drafter = pair.target, (drafter or pair.drafter)
    elif model is not None:
        raise UsageError(f"give either a model name ('{model}') or --target, not both")
    target_dir = locate(str(target), yes=yes, confirm=confirm, flag="--target")
    if no_spec or drafter is None:
        return target_dir, None
    return target_dir, locate(str(drafter), yes=yes, confirm=confirm, flag="--drafter")
