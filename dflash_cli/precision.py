"""Which weights a pair's target runs in: `--quantize int4|int8|fp8|none|auto`, decided before a byte is
downloaded.

`choose` is the decision, a pure function of the pair, the flag and the GPU memory free: the bf16 target
when it fits (or on the CPU), else an official quantized checkpoint of the target that fits (FP8 first:
closer to bf16), else the bf16 target quantized at load (int8, then int4) with the result cached on disk.
What was taken, and the flag that overrides it, is one line for stderr. It imports neither torch nor the
model code (the sizes are catalog.py's).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import catalog, hub
from .errors import DflashError, UsageError
from .registry import ModelPair, QuantRepo

CHOICES = ("auto", "none", "fp8", "int8", "int4")  # what --quantize accepts
GiB = 1 << 30


@dataclass(frozen=True)
class Choice:
    format: str  # "bf16" (as released), "fp8", "int8" or "int4"
    repo: QuantRepo | None = None  # a quantized checkpoint downloaded instead of the target; None: the target
    at_load: bool = False  # the target is quantized to `format` as it loads (and cached)
    note: str | None = None  # the line to say on stderr; None: nothing to say

    @property
    def quantize(self) -> str | None:
        """The `quantize=` to load with: the format when quantizing at load, else None."""
        return self.format if self.at_load else None


def parse(value: str | None) -> str | None:
    """--quantize as given → one of CHOICES (None: not given, the same as auto); a bad value is one line."""
    if value is None:
        return None
    key = value.strip().lower()
    key = {"bf16": "none", "bfloat16": "none", "off": "none", "w4a16": "int4", "w8a16": "int8"}.get(key, key)
    if key not in CHOICES:
        raise UsageError(f"--quantize must be one of {', '.join(CHOICES)}, got '{value}'")
    return key


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _download(n: int | None, repo: str, cached: frozenset[str]) -> str:
    """"Qwen/X (a 29.5 GB download)", or "(downloaded)" when it is in the cache."""
    if repo in cached:
        return f"{repo} (downloaded)"
    return f"{repo} (a {hub.format_size(n)} download)" if n else repo


def choose(pair: ModelPair | None, requested: str | None, free: int | None, *,
           cached: frozenset[str] = frozenset()) -> Choice:
    """The target's weights for `pair` (None: a --target of one's own) at `--quantize requested`
    (None or "auto": decide) with `free` bytes of GPU memory (None: the CPU). `cached`: the repos already
    downloaded (the line says so instead of a size)."""
    requested = parse(requested) or "auto"
    if requested == "none":
        return Choice("bf16")
    if pair is None or catalog.gpu_memory(pair) is None:  # no sizes: as asked, or as stored
        return Choice("bf16") if requested == "auto" else Choice(requested, at_load=True)
    if requested != "auto":
        return _explicit(pair, requested, free, cached)
    bf16 = catalog.gpu_memory(pair)
    if free is None or bf16 <= free:
        return Choice("bf16")
    said = f"{pair.alias} needs {_gib(bf16)} of GPU memory in bfloat16, {_gib(free)} is free"
    for fmt in ("fp8", "int4"):
        repo = pair.official(fmt)
        need = catalog.gpu_memory(pair, fmt, repo) if repo else None
        if need is not None and need <= free:
            size = catalog.download_bytes(pair, fmt, repo)
            return Choice(fmt, repo, note=f"{said}: running its {fmt} checkpoint {_download(size, repo.repo, cached)}, "
                                          f"{_gib(need)}; --quantize none|int8|int4|fp8 overrides")
    for fmt in ("int8", "int4"):
        need = catalog.gpu_memory(pair, fmt)
        if need is not None and need <= free:
            size = catalog.download_bytes(pair)
            return Choice(fmt, at_load=True, note=(
                f"{said}: quantizing {_download(size, pair.target, cached)} to {fmt} at load, {_gib(need)} "
                f"(cached for the next load); --quantize none|int8|int4|fp8 overrides"))
    least = catalog.gpu_memory(pair, "int4")
    smallest = f"even in int4 it needs {_gib(least)}" if least else _unquantized(pair)
    raise DflashError(f"{said}, and {smallest}: close other GPU programs, or pick a smaller model (dflash models)")


def _unquantized(pair: ModelPair, named: bool = False) -> str:
    """Why there is no quantized choice: the target kind (registry.UNQUANTIZED_KINDS: gpt-oss, MXFP4 experts
    already), or this pair's family (not tested quantized yet)."""
    if not pair.tested_quantized:
        return f"dflash does not run {pair.alias} quantized yet (its family is not tested quantized)"
    return f"dflash does not quantize {pair.kind} targets" + (f" ({pair.alias})" if named else "")


def _explicit(pair: ModelPair, fmt: str, free: int | None, cached: frozenset[str]) -> Choice:
    """--quantize fp8|int8|int4 for a registered pair: its official checkpoint in that format when there
    is one, else the target quantized at load; on a GPU, a format that cannot fit is an error naming
    one that does."""
    repo = pair.official(fmt)
    need = catalog.gpu_memory(pair, fmt, repo)
    if need is None:
        raise UsageError(f"--quantize {fmt}: {_unquantized(pair, named=True)}; use --quantize none")
    if free is not None and need > free:
        fits = [f for f in ("fp8", "int8", "int4") if (catalog.gpu_memory(pair, f, pair.official(f)) or free + 1) <= free]
        hint = f": --quantize {fits[0]} fits" if fits else ": close other GPU programs, or pick a smaller model"
        raise DflashError(f"--quantize {fmt}: {pair.alias} needs {_gib(need)} of GPU memory, "
                          f"{_gib(free)} is free{hint}")
    if repo is not None:
        size = catalog.download_bytes(pair, fmt, repo)
        return Choice(fmt, repo, note=f"running {pair.alias}'s {fmt} checkpoint {_download(size, repo.repo, cached)}")
    return Choice(fmt, at_load=True)


GGUF = ("GGUF is not supported yet: dflash reads safetensors checkpoints (bf16, FP8, GPTQ, AWQ, compressed-tensors); "
        "llama.cpp runs DFlash on GGUF (`--spec-type draft-dflash`); or name the safetensors model's Hub repo "
        "(`dflash models`)")


def check_not_gguf(*names: str | None) -> None:
    """A `.gguf` file (or a directory holding only GGUF files) named as a model is one line and exit 2."""
    from pathlib import Path

    for name in names:
        if name is None:
            continue
        path = Path(name).expanduser()
        only_gguf = path.is_dir() and any(path.glob("*.gguf")) and not any(path.glob("*.safetensors"))
        if name.strip().lower().endswith(".gguf") or only_gguf:
            raise UsageError(f"{name}: {GGUF}")


def apply(opts, requested: str | None, say=None):
    """The ModelOptions to load with, after `--quantize requested`: the same (bf16), with `quantize` set
    (the target quantized at load), or with the target swapped for a quantized checkpoint of it. `say`
    gets the line that says what was taken (None: print it on stderr)."""
    from dataclasses import replace

    from . import registry

    check_not_gguf(opts.model, opts.target, opts.drafter)
    requested = parse(requested)
    demo = opts.model is not None and opts.target is None and registry.is_demo(opts.model)
    if opts.model is None and opts.target is None:
        return opts  # no model named: the resolver says so
    if requested in (None, "auto", "none") and (demo or opts.target is not None):
        return opts  # nothing to decide: no sizes for a checkpoint of one's own, the demo runs on the CPU
    pair = registry.resolve(opts.model) if opts.target is None and not demo else None
    choice = choose(pair, requested, _free_memory(opts.device), cached=_cached(pair))
    if choice.note:
        (say or _stderr)(choice.note)
    if choice.repo is not None:  # the pair's own drafter with the quantized target, as a --target/--drafter pair
        return replace(opts, model=None, target=choice.repo.repo, drafter=None if opts.no_spec else
                       (opts.drafter or pair.drafter))
    if choice.at_load:
        return replace(opts, quantize=choice.format)
    return opts


def _free_memory(device: str) -> int | None:
    from . import loader
    from .memory import free_device_memory

    return free_device_memory(loader.resolve_device(device))


def _cached(pair: ModelPair | None) -> frozenset[str]:
    if pair is None:
        return frozenset()
    repos = [pair.target, *(q.repo for q in pair.quantized if q.official)]
    return frozenset(r for r in repos if hub.local_path(r) is not None)


def _stderr(line: str) -> None:
    import sys

    print(f"dflash: {line}", file=sys.stderr)
