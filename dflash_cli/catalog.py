"""`dflash models`: the registry joined with what the Hugging Face cache holds.

It imports neither torch nor the model code: the GPU memory each pair needs, with its target in bf16,
fp8, int8 or int4, is `GPU_MEMORY`, what `doctor.gpu_memory_needed` computes (tests/test_cli_models.py
checks that they agree), so that the list prints in about a second rather than after torch's import;
the GPU it is sized against comes from cuda.py when torch is loaded already, else from nvidia-smi.
precision.py decides `--quantize` from the same numbers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from . import hub, registry

# doctor.gpu_memory_needed(pair, quantize=fmt) for fmt in memory.FORMATS (the target's projections in that
# format, the drafter in bf16, a 4K-token cache and the workspace), then the target's bf16 weights; in bytes.
# Regenerate with `python -c "from dflash_cli.catalog import measured; print(measured())"`.
FORMATS = ("bf16", "fp8", "int8", "int4")  # memory.FORMATS, without importing torch
_MEASURED = {
    "qwen3-4b": (10799521280, 7168417280, 7168417280, 5406318080, 8044936192),
    "qwen3-8b": (20222155264, 13279189504, 13279189504, 9912031744, 16381470720),
    "llama3.1-8b": (20046498304, 13069928960, 13069928960, 9686567424, 16060522496),
    "qwen3-coder-30b-a3b": (63394695168, 33542424576, 33542424576, 19016337408, 61064245248),
    "gpt-oss-20b": (16742969344, 16106343424, 16106343424, 15797530624, 13761550080),
    "gpt-oss-120b": (68427237376, 67472298496, 67472298496, 67009079296, 65249240832),
    "qwen3.5-4b": (10870295040, 7307397632, 7307397632, 5578263040, 8411852800),
    "qwen3.5-9b": (21502243328, 14592881152, 14592881152, 11241927168, 17908156416),
    "qwen3.5-27b": (59330216448, 35011052032, 35011052032, 23219880448, 53793355776),
    "qwen3.5-35b-a3b": (71602010624, 38048909824, 38048909824, 21701261824, 69321574912),
    "qwen3.6-27b": (59330216448, 35011052032, 35011052032, 23219880448, 53793355776),
    "qwen3.6-35b-a3b": (71602010624, 38048909824, 38048909824, 21701261824, 69321574912),
    "qwen3.8-27b": (59474559488, 35155395072, 35155395072, 23364223488, 53793355776),
    "muse-glimmer-30b": (62813785600, 37656501760, 37656501760, 25461378560, 55712344064),
    "gemma-4-12b": (27960569440, 17065102944, 17065102944, 11780959840, 23816240224),
    "gemma-4-31b": (69611243128, 40332973688, 40332973688, 26138756728, 61397353592),
    "gemma-4-26b-a4b": (54070485052, 29620588092, 29620588092, 17738790972, 50467507772),
}
GPU_MEMORY = {alias: dict(zip(FORMATS, row)) for alias, row in _MEASURED.items()}  # alias → format → bytes
TARGET_WEIGHTS = {alias: row[-1] for alias, row in _MEASURED.items()}  # the target's bf16 weights (its download)


def measured() -> dict[str, tuple[int, ...]]:
    """What _MEASURED should hold, computed (this imports torch and every model family)."""
    from .doctor import gpu_memory_needed, target_weight_bytes

    rows = {}
    for p in registry.all_pairs():
        if not p.supported or gpu_memory_needed(p) is None:
            continue
        rows[p.alias] = (*(gpu_memory_needed(p, quantize=f) for f in FORMATS), target_weight_bytes(p))
    return rows


def gpu_memory(pair: registry.ModelPair, fmt: str = "bf16", repo: registry.QuantRepo | None = None) -> int | None:
    """GPU memory the pair needs with its target in `fmt` (None: unknown): quantized at load, or the
    checkpoint `repo`, whose published size replaces the estimate where the registry gives one."""
    needs = GPU_MEMORY.get(pair.alias)
    if needs is None or not pair.supported or (fmt != "bf16" and not pair.quantizable):
        return None
    if repo is not None and repo.gb is not None:
        return needs["bf16"] - TARGET_WEIGHTS[pair.alias] + int(repo.gb * 1e9)
    return needs[fmt]


def download_bytes(pair: registry.ModelPair, fmt: str = "bf16", repo: registry.QuantRepo | None = None) -> int | None:
    """About how many bytes the target's checkpoint is: the bf16 target, or `repo` in `fmt` (its
    published size, else the estimate of its weights: the bf16 weights less what `fmt` saves)."""
    if pair.alias not in TARGET_WEIGHTS:
        return None
    if repo is None:
        return TARGET_WEIGHTS[pair.alias]
    if repo.gb is not None:
        return int(repo.gb * 1e9)
    return TARGET_WEIGHTS[pair.alias] - GPU_MEMORY[pair.alias]["bf16"] + GPU_MEMORY[pair.alias][fmt]


# What the driver, a desktop and the CUDA context hold on a card before dflash loads anything: a pair
# "fits" a card of `total` bytes when it needs at most total - RESERVED.
RESERVED = 1 << 30


def fits(need: int | None, total: int) -> bool:
    return need is not None and need <= total - RESERVED


def gpu_seen() -> tuple[str, int] | None:
    """The GPU `dflash models` sizes the pairs against: (name, total bytes) of the first visible one,
    or None. Asked of cuda.py when torch is imported already (a command that loads, or a test's stand-in),
    else of nvidia-smi, so that the list still prints without importing torch."""
    if "torch" in sys.modules:
        from . import cuda

        if not cuda.is_available():
            return None
        device = cuda.device()
        return cuda.device_name(device), cuda.mem_get_info(device)[1]
    return _nvidia_smi()


def _nvidia_smi() -> tuple[str, int] | None:
    """(name, total bytes) of the first GPU CUDA_VISIBLE_DEVICES names (nvidia-smi counts in PCI order, which
    CUDA also uses with CUDA_DEVICE_ORDER=PCI_BUS_ID), or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = 0
    if visible is not None:
        first = visible.split(",")[0].strip()
        if not first.isdigit():  # "" or "-1": no GPU; a UUID: not worth resolving for a table
            return None
        index = int(first)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--id={index}", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        name, mib = out.stdout.strip().splitlines()[0].rsplit(",", 1)
        return name.strip(), int(float(mib)) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _directory_bytes(paths) -> int:
    return sum(f.stat().st_size for d in paths for f in d.iterdir() if f.is_file())


def model_rows(gpu: tuple[str, int] | None = None) -> list[dict]:
    """One row per pair; `gpu` (gpu_seen()): which formats of each pair fit it."""
    rows, on_disk = [], hub.cached_sizes()
    target, drafter = registry.demo_dirs()
    rows.append({  # ships inside the package: nothing to download, runs on a CPU
        "alias": registry.DEMO, "target": "stories260K (in the package)", "drafter": "stories260K-dflash (in the package)",
        "block_size": 8, "supported": True, "note": "runs on the CPU", "gated": False, "downloaded": True,
        "size_on_disk": _directory_bytes((target, drafter)), "gpu_memory": None, "gpus": 0, "engine_only": False,
        "gpu_memory_formats": None, "fits": None, "quantized": [],
    })
    for p in registry.all_pairs():
        sizes = [on_disk.get(p.target), on_disk.get(p.drafter)]
        complete = all(hub.local_path(r) is not None for r in (p.target, p.drafter)) if all(s is not None for s in sizes) else False
        rows.append({
            "alias": p.alias, "target": p.target, "drafter": p.drafter, "block_size": p.block_size,
            "supported": p.supported, "note": p.note, "gated": p.gated, "downloaded": complete,
            "size_on_disk": sum(s for s in sizes if s is not None),
            # bf16 weights, a 4K-token cache and the workspace (None: a pair this engine does not run)
            "gpu_memory": gpu_memory(p),
            # the same with the target in each format (fp8/int4: the official checkpoint where there is one)
            "gpu_memory_formats": _by_format(p),
            # the formats that fit the GPU seen (None: no GPU seen)
            "fits": None if gpu is None else [f for f, n in (_by_format(p) or {}).items() if fits(n, gpu[1])],
            "quantized": [{"repo": q.repo, "format": q.format, "layout": q.layout, "official": q.official,
                           "verified": q.verified} for q in p.quantized],
            # GPUs it needs; above 1 it runs through `dflash serve --engine sglang|vllm`, not this engine
            "gpus": p.gpus, "engine_only": p.engine_only,
        })
    return rows


def _by_format(p: registry.ModelPair) -> dict[str, int] | None:
    """GPU memory per format: quantized at load, or the official checkpoint in that format where it is smaller."""
    if gpu_memory(p) is None:
        return None
    options = {f: [n for n in (gpu_memory(p, f), p.official(f) and gpu_memory(p, f, p.official(f))) if n]
               for f in FORMATS}
    return {f: min(ns) if ns else None for f, ns in options.items()}


def _status(r: dict) -> str:
    if r["engine_only"]:
        return f"serve --engine ({r['gpus']} GPUs)"
    if not r["supported"]:
        return f"[dim]not yet ({r['note'].split(':')[0]})[/dim]"
    if r["alias"] == registry.DEMO:
        return "[green]ready[/green] (CPU)"
    if r["downloaded"]:
        return "[green]ready[/green]"
    return "dflash pull" + (" (gated)" if r["gated"] else "")


def render_models(rows: list[dict], gpu: tuple[str, int] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DFlash pairs · cache {hub.cache_dir()}", title_justify="left")
    for col, kw in (("model", {"no_wrap": True, "min_width": 19}),
                    ("B", {"justify": "right", "min_width": 2}),
                    ("status", {"no_wrap": True, "overflow": "ellipsis", "max_width": 26}),
                    ("GPU GiB", {"justify": "right", "no_wrap": True, "min_width": 8}),
                    ("on disk", {"justify": "right", "no_wrap": True, "min_width": 7})):
        table.add_column(col, **kw)
    for r in rows:
        size = f"{r['size_on_disk'] / 1e9:.1f} GB" if r["size_on_disk"] >= 1e8 else \
            f"{r['size_on_disk'] / 1e6:.1f} MB" if r["size_on_disk"] else "-"
        shown_b = r["supported"] or r["engine_only"]
        table.add_row(r["alias"], str(r["block_size"]) if shown_b else "", _status(r),
                      _memory_cell(r), size)
    Console().print(table)
    seen = f"green: fits this {gpu[0]} ({gpu[1] / 2**30:.0f} GiB)" if gpu is not None else "no GPU seen here"
    Console().print(f"GPU GiB: memory to run the pair with a 4K-token context, its target in bfloat16/FP8/int4 "
                    f"(FP8 and int4 quantized at load, or the official checkpoint where that is smaller: --quantize) "
                    f"and its drafter in bfloat16; {seen}. `serve --engine`: the pair needs several GPUs and runs in SGLang or "
                    "vLLM. Targets, drafters and quantized checkpoints: `dflash models --json`. "
                    "Any pair: --target ID|DIR --drafter ID|DIR.", highlight=False)


SHOWN = ("bf16", "fp8", "int4")  # the formats the table shows (--json: int8 too)


def _memory_cell(r: dict) -> str:
    """"55/33/22": GiB in bf16, fp8 and int4, those that fit the GPU seen in green."""
    needs = r["gpu_memory_formats"]
    if not needs:
        return ""
    cells = [f"{needs[f] / 2**30:.0f}" if needs[f] else "-" for f in SHOWN]
    return "/".join(f"[green]{c}[/green]" if r["fits"] and f in r["fits"] else c for f, c in zip(SHOWN, cells))
