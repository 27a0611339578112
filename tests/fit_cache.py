"""Fitted drafters, built once and kept: a drafter fitted by tests/fit.py or tests/dflash2_fit.py is stored
under tests/.cache/ (git-ignored) by a hash of everything its weights depend on (the target's files, the
drafter's config, the prompts and options, the fitting code and the torch version), so later runs and the
other pytest-xdist workers copy it instead of fitting again. A lock makes concurrent workers wait for the
one that fits. DFLASH_TEST_CACHE=0 fits afresh without reading or writing the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
# The code a fitted drafter's weights come from: the fitting scripts, the trainer, and what produces the
# target's continuations it learns (the engine and its sampler) and runs the drafter.
FITTING_CODE = ("tests/fit.py", "tests/dflash2_fit.py", "dflash_cli/train", "dflash_cli/engine.py",
                "dflash_cli/sampling.py", "dflash_cli/drafter.py", "dflash_cli/dflash2.py")


def _hash_files(h, paths) -> None:
    for path in paths:
        p = ROOT / path
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())


def key(target: Path, parts: dict, inputs: tuple[Path, ...] = ()) -> str:
    """A hash of the target's files, `inputs` (more directories the fit reads), `parts` (JSON-able
    options), the fitting code and torch's version."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    h.update(torch.__version__.encode())
    for directory in (target, *inputs):
        for f in sorted(Path(directory).iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    _hash_files(h, FITTING_CODE)
    return h.hexdigest()[:20]


# The switches of the step's kernel path (dflash_cli/ops.py). A fit runs without them, whatever the test that
# first asks for the drafter has set (test_bf16_exact's `exact_path` sets both): a fit is then the same bits
# whichever test triggers it, and it never reaches a kernel that needs a GPU (fla's chunked prefill).
KERNEL_SWITCHES = ("DFLASH_KERNELS", "DFLASH_LINEAR")


@contextlib.contextmanager
def _default_kernel_path():
    saved = {k: os.environ.pop(k) for k in KERNEL_SWITCHES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def cached(name: str, out_dir: Path, digest: str, fit: Callable[[Path], Path]) -> Path:
    """`out_dir` holding the drafter `fit(directory)` writes, copied from the cache when one of this digest is
    there. The fit runs on the default kernel path (`KERNEL_SWITCHES` unset)."""
    out_dir = Path(out_dir)
    if os.environ.get("DFLASH_TEST_CACHE", "1") == "0":
        with _default_kernel_path():
            return fit(out_dir)
    from filelock import FileLock

    CACHE.mkdir(exist_ok=True)
    entry = CACHE / f"{name}-{digest}"
    with FileLock(str(CACHE / f"{name}-{digest}.lock")):
        if not entry.is_dir():
            scratch = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{name}-"))
            with _default_kernel_path():
                fit(scratch / "d")
            os.replace(scratch / "d", entry)  # complete or absent: a killed fit leaves only scratch behind
            shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(entry, out_dir)
    return out_dir
