"""Quantized copies on disk: made once per (repo, revision, scheme), found by the next load.

They live in `$XDG_CACHE_HOME/dflash/quantized` (default `~/.cache/dflash/quantized`), beside dflash's other
per-user files (chat history in `$XDG_DATA_HOME/dflash`), one directory per copy:
`<org>--<name>--<revision>--<scheme>` for a Hub snapshot, `local--<dirname>--<fingerprint>--<scheme>` for a
directory of one's own (the fingerprint covers its path and its files' sizes and times, so an edited
checkpoint is quantized again). A copy is written into a temporary directory beside its place and renamed
into it, so a directory under its final name is always complete; `dflash rm` removes a repo's copies.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..config import QUANT_FAMILIES, read_config
from ..errors import DflashError
from .quantize import SCHEMES, check_source, quantize_checkpoint


def root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dflash" / "quantized"


def _repo_prefix(repo_id: str) -> str:
    return repo_id.replace("/", "--") + "--"


def source_key(target_dir: Path) -> str:
    """The cache key of a checkpoint directory (without the scheme)."""
    target_dir = Path(target_dir).absolute()
    snapshots, repo_folder = target_dir.parent, target_dir.parent.parent
    if snapshots.name == "snapshots" and repo_folder.name.startswith("models--"):  # the Hub cache's layout
        return f"{repo_folder.name.removeprefix('models--')}--{target_dir.name}"
    h = hashlib.sha256(str(target_dir.resolve()).encode())
    for item in sorted(target_dir.iterdir()):
        if item.is_file():
            st = item.stat()
            h.update(f"{item.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"local--{target_dir.name}--{h.hexdigest()[:16]}"


def copy_dir(target_dir: Path, scheme: str) -> Path:
    return root() / f"{source_key(target_dir)}--{scheme}"


def quantized(target_dir: Path, scheme: str, *, device: str = "cpu",
              say: Callable[[str], None] | None = None) -> Path:
    """The directory of `target_dir` quantized with `scheme`: the cached copy, made now if there is none."""
    assert scheme in SCHEMES, scheme
    final = copy_dir(target_dir, scheme)
    if (final / "config.json").is_file():
        return final
    raw = read_config(Path(target_dir))
    model_type = str(raw.get("model_type", ""))
    if model_type not in QUANT_FAMILIES:
        runs = ", ".join(sorted({f.split("_text")[0] for f in QUANT_FAMILIES}))
        raise DflashError(f"--quantize: {model_type or 'this'} targets do not run quantized yet "
                          f"(dflash runs quantized projections for {runs})")
    check_source(raw, scheme)  # an int4 or FP8 checkpoint given --quantize fp8: one line, before anything
    final.parent.mkdir(parents=True, exist_ok=True)
    (say or _stderr)(f"quantizing {target_dir} to {scheme} once; the copy is kept in {final}")
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        quantize_checkpoint(target_dir, work / "copy", scheme, device=device)
        try:
            os.rename(work / "copy", final)
        except OSError:
            if not (final / "config.json").is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def copies_of(repo_id: str) -> list[Path]:
    """Every cached quantized copy of `repo_id` (any revision, any scheme)."""
    directory = root()
    if not directory.is_dir():
        return []
    prefix = _repo_prefix(repo_id)  # a copy, or the temporary directory of one a killed process left
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.removeprefix(".").startswith(prefix))


def remove_copies(repo_id: str) -> int:
    """Delete every cached quantized copy of `repo_id`; the bytes freed."""
    freed = 0
    for path in copies_of(repo_id):
        freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path)
    return freed


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
