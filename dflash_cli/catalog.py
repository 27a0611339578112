"""`dflash models`: the registry joined with what the Hugging Face cache holds."""
from __future__ import annotations

from . import hub, registry


def model_rows() -> list[dict]:
    from .doctor import gpu_memory_needed

    rows, on_disk = [], hub.cached_sizes()
    for p in registry.all_pairs():
        sizes = [on_disk.get(p.target), on_disk.get(p.drafter)]
        complete = all(hub.local_path(r) is not None for r in (p.target, p.drafter)) if all(s is not None for s in sizes) else False
        rows.append({
            "alias": p.alias, "target": p.target, "drafter": p.drafter, "block_size": p.block_size,
            "supported": p.supported, "note": p.note, "gated": p.gated, "downloaded": complete,
            "size_on_disk": sum(s for s in sizes if s is not None),
            # bf16 weights, a 4K-token cache and the workspace (None: a pair this version cannot run)
            "gpu_memory": gpu_memory_needed(p) if p.supported else None,
        })
    return rows


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
        if not r["supported"]:
            status = f"[dim]not yet ({r['note'].split(':')[0]})[/dim]"
        elif r["downloaded"]:
            status = "[green]ready[/green]"
        else:
            status = "dflash pull" + (" (gated)" if r["gated"] else "")
        size = f"{r['size_on_disk'] / 1e9:.1f} GB" if r["size_on_disk"] else "-"
        gpu = f"{r['gpu_memory'] / 2**30:.0f} GiB" if r["gpu_memory"] else ""
        table.add_row(r["alias"], str(r["block_size"]) if r["supported"] else "", status, gpu, size)
    Console().print(table)
    Console().print("GPU: memory to run the pair in bfloat16 with a 4K-token context. Targets and drafters: "
                    "`dflash models --json`. Any pair: --target ID|DIR --drafter ID|DIR.", highlight=False)
