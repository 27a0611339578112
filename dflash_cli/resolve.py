"""From what the user typed (an alias, a Hub id or a directory) to local checkpoint directories.

A model that is not downloaded yet is pulled after asking (or at once with --yes); in a script
without a terminal the answer is a one-line error that says how to pull it. A released pair is
asked about once, with its download size, and with a warning first where there is no GPU.
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
    line = sys.stdin.readline()
    if not line:  # Ctrl-D: end the question's line, so that what follows starts on its own
        print(file=sys.stderr)
    return line.strip().lower() in ("y", "yes")


def interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()


def _confirmer(confirm: Confirm | None) -> Confirm | None:
    return confirm or (ask if interactive() else None)


def locate(name: str, *, yes: bool = False, confirm: Confirm | None = None, flag: str = "") -> Path:
    """A directory as given, or a Hub repo id from the cache (pulled if missing and allowed)."""
    label = f"{flag} {name}" if flag else name
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UsageError(f"{label} is neither a directory nor a Hub repo id (owner/name)")
    cached = hub.local_path(name)
    if cached is not None:
        return cached
    if path.parent.is_dir():  # `demo/storiez` next to a `demo/` folder: a typo, not a Hub id
        raise UsageError(f"{label}: no such directory in {path.parent}/ "
                         f"(for the Hub repo of that name, run `dflash pull {name}` first)")
    hub.check_repo_id(name)
    if not yes:
        confirm = _confirmer(confirm)
        if confirm is None:
            raise DflashError(f"{name} is not downloaded: run `dflash pull {name}`, or pass --yes to download it now")
        if not confirm(f"{name} is not downloaded. Download it now?"):
            raise DflashError(f"{name} is not downloaded (run `dflash pull {name}`)")
    return hub.pull(name)


def locate_pair(pair: registry.ModelPair, *, yes: bool = False, confirm: Confirm | None = None) -> tuple[Path, Path]:
    """The pair's (target dir, drafter dir) from the cache, or pulled together after one question
    that gives the size of what is missing."""
    found = {repo: hub.local_path(repo) for repo in (pair.target, pair.drafter)}
    missing = [repo for repo, path in found.items() if path is None]
    if not missing:
        return found[pair.target], found[pair.drafter]
    if not yes:
        confirm = _confirmer(confirm)
        if confirm is None:
            raise DflashError(f"{pair.alias} is not downloaded: run `dflash pull {pair.alias}`, "
                              "or pass --yes to download it now")
        if hub.offline():  # no question that cannot be acted on
            return hub.pull_pair(pair)  # the offline error, naming what is not cached
        size = sum(hub.bytes_missing(repo) for repo in missing)
        warning = no_gpu_warning(pair)
        if warning:
            print(f"Warning: {warning}", file=sys.stderr)
        if not confirm(f"{pair.alias} is not downloaded ({' and '.join(missing)}: {hub.format_size(size)}). "
                       "Download it now?"):
            raise DflashError(f"{pair.alias} is not downloaded (run `dflash pull {pair.alias}`)")
    return hub.pull_pair(pair)


def no_gpu_warning(pair: registry.ModelPair) -> str | None:
    """Said before a download is offered on a machine where the model could only run on the CPU."""
    from . import cuda

    if cuda.is_available():
        return None
    from .doctor import gpu_memory_needed

    need = gpu_memory_needed(pair)
    needs = f"it needs ~{need / 2**30:.0f} GiB of GPU memory" if need else "it is meant for a GPU"
    return f"there is no CUDA GPU here: {pair.alias} would run on the CPU, very slowly ({needs})"


def resolve_model(model: str | None, target: str | None, drafter: str | None, *, yes: bool = False,
                  no_spec: bool = False, confirm: Confirm | None = None) -> tuple[Path, Path | None]:
    """(target dir, drafter dir or None) for `MODEL` or `--target/--drafter` (each an id or a dir)."""
    if target is None:
        if model is None:
            raise UsageError("name a model (see `dflash models`), or give --target and --drafter")
        if registry.is_demo(model):  # shipped in the package: no download
            target_dir, demo_drafter = registry.demo_dirs()
            if no_spec:
                return target_dir, None
            return target_dir, locate(drafter, yes=yes, confirm=confirm, flag="--drafter") if drafter else demo_drafter
        pair = registry.resolve(model)
        if pair.engine_only:
            raise DflashError(f"{pair.alias} needs {pair.gpus} GPUs, more than this engine runs on: serve it with "
                              f"`dflash serve --engine sglang {pair.alias}` (or --engine vllm)")
        if not pair.supported:
            raise DflashError(f"{pair.alias} is not supported by this version yet ({pair.note})")
        if drafter is None and not no_spec:
            return locate_pair(pair, yes=yes, confirm=confirm)
        target, drafter = pair.target, (drafter or pair.drafter)
    elif model is not None:
        raise UsageError(f"give either a model name ('{model}') or --target, not both")
    target_dir = locate(str(target), yes=yes, confirm=confirm, flag="--target")
    if no_spec or drafter is None:
        return target_dir, None
    return target_dir, locate(str(drafter), yes=yes, confirm=confirm, flag="--drafter")
