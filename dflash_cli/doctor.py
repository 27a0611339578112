"""`dflash doctor`: what this machine has, what a model needs, and how to fix each problem."""
from __future__ import annotations

import itertools
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from . import hub

# The oldest versions the code runs on; pyproject.toml's dependency floors say the same (a test
# compares them). torch 2.8: SDPA with enable_gqa and the CUDA-graph APIs used here; Triton 3.4:
# `tl.topk` in the sampler, without which every generation on CUDA fails at its first token.
FLOORS = {"torch": (2, 8), "triton": (3, 4)}


def version_tuple(version: str) -> tuple[int, ...]:
    """"2.13.0+cpu" → (2, 13, 0); "3.4.0rc1" → (3, 4, 0): the leading numbers of each part."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _floor_check(name: str, version: str, *, required: bool) -> "Check":
    floor = FLOORS[name]
    wanted = ".".join(map(str, floor))
    if version_tuple(version) >= floor:
        return Check(name, "ok", version)
    return Check(name, "fail" if required else "warn", f"{version} is older than {wanted}, the oldest dflash runs on",
                 f"pip install -U '{name}>={wanted}'")


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

    from . import cuda

    checks.append(_floor_check("torch", torch.__version__, required=True))
    gpu = cuda.is_available()
    if gpu:
        device = cuda.device()
        free, total = cuda.mem_get_info(device)
        checks.append(Check("cuda", "ok", f"CUDA {cuda.version()}, {cuda.device_name(device)}, "
                                          f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"))
    else:
        why = "this torch is a CPU build" if cuda.version() is None else "no GPU visible to the driver"
        checks.append(Check("cuda", "warn", f"no CUDA GPU ({why}): dflash runs on the CPU, slowly",
                            "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
                            if cuda.version() is None else "check `nvidia-smi` and the driver"))
    try:
        import triton

        checks.append(_floor_check("triton", triton.__version__, required=gpu))  # only CUDA runs the kernels
    except ImportError:
        wanted = ".".join(map(str, FLOORS["triton"]))
        checks.append(Check("triton", "warn" if not gpu else "fail", "not installed",
                            f"pip install 'triton>={wanted}' (the fused kernels need it on CUDA)"))
    if gpu:  # the CPU runs the hybrids' torch reference; only CUDA needs fla's kernels
        checks.append(fla_check())
    checks.append(quantized_check(gpu, any(c.name == "triton" and c.status == "ok" for c in checks)))
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
        checks.append(_model_check(model, gpu))
    return checks


FLA = "fla-core>=0.6,<0.7"  # as pyproject.toml pins it: the 0.6 API of chunk/fused_recurrent_gated_delta_rule


def fla_check() -> Check:
    """fla-core, whose Triton kernels run the Gated DeltaNet layers of the Qwen3.5/3.6 hybrids on CUDA:
    installed, in the range dflash calls, and importable (0.6 imports `packaging` without declaring it)."""
    from importlib import metadata

    fix = f"pip install '{FLA}' (the Qwen3.5/3.6 hybrids need it on CUDA)"
    try:
        version = metadata.version("fla-core")
    except metadata.PackageNotFoundError:
        return Check("fla-core", "warn", "not installed: the Qwen3.5/3.6 hybrids cannot run on CUDA", fix)
    if not (0, 6) <= version_tuple(version)[:2] < (0, 7):
        return Check("fla-core", "warn", f"{version} is outside 0.6.x, the API dflash calls", fix)
    try:
        import fla  # noqa: F401
    except Exception as e:  # any import failure means the same to the user: the hybrids will not run
        return Check("fla-core", "warn", f"{version} is installed but does not import: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", fix)
    return Check("fla-core", "ok", version)


QUANT_FORMATS = ("int4", "int8", "fp8")  # weight-only formats a target can be held in (--quantize)


def quantized_check(gpu: bool, triton: bool) -> Check:
    """Which quantized-target formats run here, and how: on a GPU a format with a kernel in ops
    (`<format>_linear`: Triton, weights dequantized in registers) runs at speed; one without, and every
    format on the CPU, runs through the torch reference (dequantize, then a bf16/fp32 matmul: exact, slow)."""
    from . import ops

    kernels = [f for f in QUANT_FORMATS if f"{f}_linear" in ops._MODULES]
    if not gpu:
        return Check("quantized", "ok", f"{', '.join(QUANT_FORMATS)} targets run on the CPU through the torch "
                                        "reference (slow: for checking); GPU kernels: "
                                        f"{', '.join(kernels) or 'none in this build'}")
    fast = kernels if triton else []
    slow = [f for f in QUANT_FORMATS if f not in fast]
    detail = f"kernels for {', '.join(fast) or 'none'}"
    if slow:
        detail += f"; {', '.join(slow)} through the torch reference (dequantized per step: slow)"
    fix = "" if not slow else ("install Triton (see the triton check)" if not triton else
                               f"prefer {' or '.join(fast)} (--quantize)" if fast else "")
    return Check("quantized", "ok" if not slow else "warn", detail, fix)


def _directory_check(directory: Path) -> Check:
    """A local checkpoint: whether this version runs it (its config.json read as `dflash run` reads it)."""
    from .config import read_config
    from .errors import DflashError
    from .models import target_config
    from .rope import inv_frequencies

    try:
        _, cfg = target_config(directory)
        inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # an unsupported rope type is refused here
    except DflashError as e:
        return Check(str(directory), "fail", str(e))
    return Check(str(directory), "ok", f"a {read_config(directory).get('model_type')} checkpoint this version runs "
                                       f"({cfg.num_layers} layers, hidden {cfg.hidden_size})")


def _model_check(model: str, gpu: bool) -> Check:
    from . import cuda, registry
    from .errors import DflashError
    from .memory import GiB

    if registry.is_demo(model):
        return Check(registry.DEMO, "ok", "ships with dflash (stories260K and its drafter, under 1 MB): runs on the CPU, nothing to download")
    if model.strip().lower() not in registry.aliases() and Path(model).expanduser().is_dir():
        return _directory_check(Path(model).expanduser())
    try:
        pair = registry.resolve(model)
    except DflashError as e:
        return Check(model, "fail", str(e))
    if not pair.supported:
        return Check(pair.alias, "fail", f"not supported by this version yet ({pair.note})")
    ready = all(hub.local_path(r) is not None for r in (pair.target, pair.drafter))
    detail = "downloaded" if ready else f"not downloaded (`dflash pull {pair.alias}`)"
    need = gpu_memory_needed(pair)
    if need is None:
        return Check(pair.alias, "ok" if ready else "warn", detail)
    if not gpu:
        return Check(pair.alias, "fail", f"{detail}; needs ~{need / GiB:.0f} GiB of GPU memory (4K context), no GPU here",
                     "run it on a machine with a CUDA GPU (`dflash run demo` runs here)")
    free, _ = cuda.mem_get_info(cuda.device())
    if free < need:
        from . import precision

        try:  # what `--quantize auto` would take instead
            choice = precision.choose(pair, None, free)
        except DflashError:
            choice = None
        if choice is not None and choice.format != "bf16":
            how = f"its {choice.format} checkpoint {choice.repo.repo}" if choice.repo else f"quantized to {choice.format} at load"
            if choice.repo is not None:  # what runs is the checkpoint, not the bf16 target
                ready = all(hub.local_path(r) is not None for r in (choice.repo.repo, pair.drafter))
                detail = "downloaded" if ready else f"not downloaded (`dflash run {pair.alias} --yes` fetches it)"
            return Check(pair.alias, "ok" if ready else "warn",
                         f"{detail}; needs ~{need / GiB:.1f} GiB of GPU memory in bfloat16, {free / GiB:.1f} GiB free: "
                         f"runs as {how} (--quantize auto; --quantize none for bfloat16)")
        return Check(pair.alias, "fail", f"{detail}; needs ~{need / GiB:.1f} GiB of GPU memory, {free / GiB:.1f} GiB free",
                     "close other GPU programs or pick a smaller model (dflash models)")
    return Check(pair.alias, "ok" if ready else "warn", f"{detail}; {need / GiB:.1f} GiB needed, {free / GiB:.1f} GiB free")


def gpu_memory_needed(pair, context: int = 4096, quantize: str | None = None) -> int | None:
    """Bytes of GPU memory the pair needs at `context` tokens, its target in bfloat16 or in `quantize`
    ("fp8", "int8", "int4": memory.quantized_bytes) and its drafter in bfloat16 (None: shape unknown)."""
    import torch

    from .engine import cache_slack
    from .memory import needs_for, quantized_bytes
    from .synthetic import SHAPES, configs

    if pair.alias not in SHAPES:
        return None
    family, target, drafter, _ = configs(pair.alias)
    block = drafter.block_size
    weights = None if quantize in (None, "bf16") else quantized_bytes(family.weight_table(target), quantize)
    return needs_for(family, target, drafter, torch.bfloat16, block, cache_slack(block), weights).total(context)


def target_weight_bytes(pair) -> int | None:
    """Bytes of the pair's target weights in bfloat16 (None: shape unknown)."""
    import torch

    from .models.weights import table_bytes
    from .synthetic import SHAPES, configs

    if pair.alias not in SHAPES:
        return None
    family, target, _, _ = configs(pair.alias)
    return table_bytes(family.weight_table(target), torch.bfloat16)


def render_checks(checks: list[Check]) -> None:
    from rich.console import Console

    marks = {"ok": "[green]✓[/green]", "warn": "[yellow]![/yellow]", "fail": "[red]✗[/red]"}
    console = Console()
    for c in checks:
        console.print(f"{marks[c.status]} [bold]{c.name}[/bold]: {c.detail}", highlight=False, soft_wrap=True)
        if c.fix:  # soft_wrap: a fix is a command or a URL to copy, never cut into two lines
            console.print(f"    fix: {c.fix}", highlight=False, soft_wrap=True)
