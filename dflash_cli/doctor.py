"""`dflash doctor`: what this machine has, what a model needs, and how to fix each problem."""
from __future__ import annotations

import platform
import sys
from dataclasses import dataclass

from . import hub


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


def run_checks(model: str | None = None) -> list[Check]:
    checks = [Check("python", "ok" if sys.version_info >= (3, 10) else "fail", platform.python_version(),
                    "" if sys.version_info >= (3, 10) else "install Python 3.10 or newer")]
    import torch

    checks.append(Check("torch", "ok", torch.__version__))
    cuda = torch.cuda.is_available()
    if cuda:
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        checks.append(Check("cuda", "ok", f"CUDA {torch.version.cuda}, {name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"))
    else:
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU visible to the driver"
        checks.append(Check("cuda", "warn", f"no CUDA GPU ({why}): dflash runs on the CPU, slowly",
                            "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
                            if torch.version.cuda is None else "check `nvidia-smi` and the driver"))
    try:
        import triton

        checks.append(Check("triton", "ok", triton.__version__))
    except ImportError:
        checks.append(Check("triton", "warn" if not cuda else "fail", "not installed",
                            "pip install triton (the fused kernels need it on CUDA)"))
    cache = hub.cache_dir()
    free_disk = hub.disk_free(cache)
    checks.append(Check("cache", "ok" if free_disk > 20e9 else "warn", f"{cache} ({free_disk / 1e9:.0f} GB free)",
                        "" if free_disk > 20e9 else "an 8B pair needs ~18 GB: free space or set HF_HOME"))
    auth = hub.auth_status()
    checks.append(Check("hub login", "ok" if auth != "not logged in" else "warn", auth,
                        "" if auth != "not logged in" else "gated models (Llama) need `hf auth login` or HF_TOKEN"))
    if hub.offline():
        checks.append(Check("network", "warn", "HF_HUB_OFFLINE is set: only cached models can be used", "unset HF_HUB_OFFLINE to download"))
    if model is not None:
        checks.append(_model_check(model, cuda))
    return checks


def _model_check(model: str, cuda: bool) -> Check:
    import torch

    from . import registry
    from .errors import DflashError
    from .engine import cache_slack
    from .memory import GiB, needs_for
    from .synthetic import SHAPES, configs

    try:
        pair = registry.resolve(model)
    except DflashError as e:
        return Check(model, "fail", str(e))
    if not pair.supported:
        return Check(pair.alias, "fail", f"not supported by this version yet ({pair.note})")
    ready = all(hub.local_path(r) is not None for r in (pair.target, pair.drafter))
    detail = "downloaded" if ready else f"not downloaded (`dflash pull {pair.alias}`)"
    if pair.alias not in SHAPES:
        return Check(pair.alias, "ok" if ready else "warn", detail)
    family, target, drafter, _ = configs(pair.alias)
    block = drafter.block_size
    need = needs_for(family, target, drafter, torch.bfloat16, block, cache_slack(block)).total(4096)
    if not cuda:
        return Check(pair.alias, "warn", f"{detail}; needs ~{need / GiB:.0f} GiB of GPU memory (4K context), no GPU here")
    free, _ = torch.cuda.mem_get_info(0)
    if free < need:
        return Check(pair.alias, "fail", f"{detail}; needs ~{need / GiB:.1f} GiB of GPU memory, {free / GiB:.1f} GiB free",
                     "close other GPU programs or pick a smaller model (dflash models)")
    return Check(pair.alias, "ok" if ready else "warn", f"{detail}; {need / GiB:.1f} GiB needed, {free / GiB:.1f} GiB free")


def render_checks(checks: list[Check]) -> None:
    from rich.console import Console

    marks = {"ok": "[green]✓[/green]", "warn": "[yellow]![/yellow]", "fail": "[red]✗[/red]"}
    console = Console()
    for c in checks:
        console.print(f"{marks[c.status]} [bold]{c.name}[/bold]: {c.detail}", highlight=False)
        if c.fix:
            console.print(f"    fix: {c.fix}", highlight=False)
