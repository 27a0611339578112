"""`dflash serve` from flags to a running server: this engine, or the hand-off to SGLang / vLLM."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import UsageError
from .auth import check_allow_host, check_exposure, clean_api_key


@dataclass
class ServeFlags:
    model: str | None = None
    target: str | None = None
    drafter: str | None = None
    yes: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    no_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    max_queue: int = 16
    timeout: float = 600.0
    max_body_mb: float = 8.0
    think: bool | None = None  # None: the pair's own default
    block_size: int | None = None  # None: auto (chosen per iteration), else pinned
    no_spec: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_context: int | None = None
    engine: str | None = None
    tp: int | None = None
    dry_run: bool = False
    draft_window: int | None = None
    tree_budget: int | str = 0  # --tree-budget: nodes of the verified draft tree (0: the drafter's chain), or "auto"
    reasoning_effort: str | None = None  # when a request does not say, for any template that reads it
    allow_hosts: tuple[str, ...] = ()  # --allow-host: Host names besides loopback and the bound address
    quantize: str | None = None  # --quantize as given (precision.apply decides)


def serve(flags: ServeFlags) -> None:
    """Every flag is checked here, before anything loads: a usage error is one line and exit 2."""
    flags = replace(flags, api_key=clean_api_key(flags.api_key), allow_hosts=check_allow_host(flags.allow_hosts))
    warning = check_exposure(flags.host, flags.api_key, flags.no_auth)
    if flags.engine is not None:
        _hand_off(flags, warning)
        return
    if flags.tp is not None or flags.dry_run:
        raise UsageError("--tp and --dry-run go with --engine sglang|vllm")
    if not math.isfinite(flags.max_body_mb) or flags.max_body_mb * 2**20 < 1024:
        raise UsageError(f"--max-body-mb must be a size in MiB of at least 0.001, got {flags.max_body_mb:g}")
    if not math.isfinite(flags.timeout):
        raise UsageError(f"--timeout must be a finite number of seconds, got {flags.timeout:g}")
    _serve_here(flags, warning)


_DEFAULTS = {f.name: f.default for f in fields(ServeFlags)}


def _hand_off(flags: ServeFlags, warning: str | None) -> None:
    from .. import handoff, registry

    if flags.model is not None and registry.is_demo(flags.model):
        raise UsageError(f"the demo pair runs on dflash's own engine, not on {flags.engine}: `dflash serve demo`")
    ours = [name for name, on in (("--no-spec", flags.no_spec), ("--think/--no-think", flags.think is not None),
                                  ("--device", flags.device != "auto"), ("--dtype", flags.dtype != "auto"),
                                  ("--cors-origin", bool(flags.cors_origins)),
                                  ("--allow-host", bool(flags.allow_hosts)),
                                  ("--draft-window", flags.draft_window is not None),
                                  ("--tree-budget", flags.tree_budget != 0),
                                  ("--reasoning-effort", flags.reasoning_effort is not None),
                                  ("--quantize", flags.quantize is not None),
                                  *((f"--{f.replace('_', '-')}", getattr(flags, f) != _DEFAULTS[f])
                                    for f in ("timeout", "max_queue", "max_body_mb"))) if on]
    if ours:
        raise UsageError(f"{ours[0]} applies to dflash's own engine, not to --engine {flags.engine}")
    pair = handoff.resolve_pair(flags.model, flags.target, flags.drafter, flags.block_size)
    if flags.block_size is not None:  # against the drafter's own size, as dflash's engine checks it
        known = handoff.drafter_block_size(pair.drafter, registry.resolve(flags.model).block_size
                                           if flags.target is None else 0)
        if known and flags.block_size > known:
            raise UsageError(f"--block-size must be between 2 and the drafter's {known}, got {flags.block_size}")
    launch = handoff.launch_command(flags.engine, pair, tp=flags.tp, host=flags.host, port=flags.port,
                                    block_size=flags.block_size, max_context=flags.max_context,
                                    api_key=flags.api_key)
    if warning and not flags.dry_run:
        print(f"dflash: {warning}", file=sys.stderr)
    handoff.hand_off(flags.engine, launch, dry_run=flags.dry_run)


def model_id(model: str | None, target: str | None) -> str:
    """The name clients use: the alias, or the target as given (a directory by its name)."""
    if model is not None:
        from .. import registry

        return registry.DEMO if registry.is_demo(model) else registry.resolve(model).alias
    path = Path(str(target)).expanduser()
    return path.name if path.is_dir() else str(target)


def _serve_here(flags: ServeFlags, warning: str | None) -> None:
    from .. import loader, precision
    from ..api import ModelOptions, open_session, resolve
    from ..formats import Reasoning
    from .app import ServeOptions, bind, run_server, stderr_log
    from .worker import EngineWorker

    device = loader.resolve_device(flags.device)
    opts = ModelOptions(model=flags.model, target=flags.target, drafter=flags.drafter, yes=flags.yes,
                        no_spec=flags.no_spec, device=str(device), dtype=flags.dtype, block_size=flags.block_size,
                        max_context=flags.max_context, draft_window=flags.draft_window,
                        tree_budget=flags.tree_budget)
    opts = precision.apply(opts, flags.quantize, lambda line: stderr_log(f"dflash: {line}"))
    dirs = resolve(opts)  # -b checked against the drafter before any weight is read, as run, chat and bench do
    name = model_id(flags.model, flags.target)
    sock = bind(flags.host, flags.port)  # a port in use is an error now, not after loading the model
    stderr_log(f"dflash: loading {name} …")
    pair = open_session(opts, dirs)
    m, engine = pair.model, pair.engine
    reasoning = Reasoning(flags.think, flags.reasoning_effort)
    think = reasoning.enable_thinking(m.thinking)  # the pair's default: what its drafter was trained with
    effort = reasoning.effort_for(m.format)  # any template that reads reasoning_effort gets it, as in run and chat
    worker = EngineWorker(m, engine, flags.max_queue)
    seconds = worker.start()
    if seconds is not None and engine.graphs.enabled:
        stderr_log(f"dflash: CUDA graphs captured in {seconds:.1f} s")
    if warning:
        stderr_log(f"dflash: {warning}")
    options = ServeOptions(host=flags.host, port=flags.port, api_key=flags.api_key, cors_origins=flags.cors_origins,
                           max_queue=flags.max_queue, timeout=flags.timeout,
                           max_body=int(flags.max_body_mb * 2**20), default_think=think, default_effort=effort,
                           allow_hosts=flags.allow_hosts)
    thinking = f"reasoning effort {effort or 'medium'}" if m.format.think_by_effort else \
        f"thinking {'on' if think else 'off'}"
    describe = (f"{engine.describe()} · {device} · context {engine.max_context} · {thinking} by default · queue {flags.max_queue}"
                + (" · API key required" if flags.api_key else ""))
    run_server(sock, worker, name, options, describe)

