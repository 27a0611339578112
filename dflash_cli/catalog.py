"""`dflash models`: the registry joined with what the Hugging Face cache holds.

It imports neither torch nor the model code: the GPU memory each pair needs is `GPU_MEMORY`, what
`doctor.gpu_memory_needed` computes (tests/test_cli_models.py checks that they agree), so that the
list prints in about a second rather than after torch's import."""
from __future__ import annotations

from . import hub, registry

# doctor.gpu_memory_needed(pair): bf16 weights, a 4K-token cache and the workspace, in bytes.
# Regenerate with `python -c "from dflash_cli.catalog import measured; print(measured())"`.
GPU_MEMORY = {
    "qwen3-4b": 10799521280, "qwen3-8b": 20222155264, "llama3.1-8b": 20046498304,
    "qwen3-coder-30b-a3b": 63394695168, "gpt-oss-20b": 16742969344, "gpt-oss-120b": 68427237376,
    "qwen3.5-4b": 10870295040, "qwen3.5-9b": 21502243328, "qwen3.5-27b": 59330216448,
    "qwen3.5-35b-a3b": 71602010624, "qwen3.6-27b": 59330216448, "qwen3.6-35b-a3b": 71602010624,
    "qwen3.8-27b": 59474559488, "gemma-4-12b": 27960569440, "gemma-4-31b": 69611243128,
    "gemma-4-26b-a4b": 54070485052,
}


def measured() -> dict[str, int]:
    """What GPU_MEMORY should hold, computed (this imports torch and every model family)."""
    from .doctor import gpu_memory_needed

    needs = {p.alias: gpu_memory_needed(p) for p in registry.all_pairs() if p.supported}
    return {alias: need for alias, need in needs.items() if need is not None}


def _directory_bytes(paths) -> int:
    return sum(f.stat().st_size for d in paths for f in d.iterdir() if f.is_file())


def model_rows() -> list[dict]:
    rows, on_disk = [], hub.cached_sizes()
    target, drafter = registry.demo_dirs()
    rows.append({  # ships inside the package: nothing to download, runs on a CPU
        "alias": registry.DEMO, "target": "stories260K (in the package)", "drafter": "stories260K-dflash (in the package)",
        "block_size": 8, "supported": True, "note": "runs on the CPU", "gated": False, "downloaded": True,
        "size_on_disk": _directory_bytes((target, drafter)), "gpu_memory": None, "gpus": 0, "engine_only": False,
    })
    for p in registry.all_pairs():
        sizes = [on_disk.get(p.target), on_disk.get(p.drafter)]
        complete = all(hub.local_path(r) is not None for r in (p.target, p.drafter)) if all(s is not None for s in sizes) else False
        rows.append({
            "alias": p.alias, "target": p.target, "drafter": p.drafter, "block_size": p.block_size,
            "supported": p.supported, "note": p.note, "gated": p.gated, "downloaded": complete,
            "size_on_disk": sum(s for s in sizes if s is not None),
            # bf16 weights, a 4K-token cache and the workspace (None: a pair this engine does not run)
            "gpu_memory": GPU_MEMORY.get(p.alias) if p.supported else None,
            # GPUs it needs; above 1 it runs through `dflash serve --engine sglang|vllm`, not this engine
            "gpus": p.gpus, "engine_only": p.engine_only,
        })
    return rows


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


def render_models(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DFlash pairs · cache {hub.cache_dir()}", title_justify="left")
    for col, kw in (("model", {"no_wrap": True, "min_width": 19}),
                    ("B", {"justify": "right", "min_width": 2}),
                    ("status", {"no_wrap": True, "overflow": "ellipsis", "max_width": 26}),
                    ("GPU", {"justify": "right", "no_wrap": True, "min_width": 6}),
                    ("on disk", {"justify": "right", "no_wrap": True, "min_width": 7})):
        table.add_column(col, **kw)
    for r in rows:
        size = f"{r['size_on_disk'] / 1e9:.1f} GB" if r["size_on_disk"] >= 1e8 else \
            f"{r['size_on_disk'] / 1e6:.1f} MB" if r["size_on_disk"] else "-"
        gpu = f"{r['gpu_memory'] / 2**30:.0f} GiB" if r["gpu_memory"] else ""
        shown_b = r["supported"] or r["engine_only"]
        table.add_row(r["alias"], str(r["block_size"]) if shown_b else "", _status(r), gpu, size)
    Console().print(table)
    Console().print("GPU: memory to run the pair in bfloat16 with a 4K-token context. `serve --engine`: the pair "
                    "needs several GPUs and runs in SGLang or vLLM. Targets and drafters: `dflash models --json`. "
                    "Any pair: --target ID|DIR --drafter ID|DIR.", highlight=False)
