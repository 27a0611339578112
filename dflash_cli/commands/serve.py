"""`dflash serve`: an OpenAI-compatible server on this engine, or the hand-off to SGLang / vLLM
(../serve/launch.py from the flags on)."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import typer

from .options import ENGINE, MODEL_OPTIONS, QUANTIZE, SERVER, reasoning_options, with_groups

if TYPE_CHECKING:
    from ..api import ModelOptions
    from ..formats import Reasoning

REASONING = reasoning_options(
    typer.Option(None, "--think/--no-think", help="Thinking when a request does not say (default: what the drafter was trained with)."),
    typer.Option(None, "--reasoning-effort", metavar="LEVEL", help="low, medium or high when a request does not say (gpt-oss, or any chat template that reads reasoning_effort)."),
)


@with_groups
def serve(
    model: ModelOptions = MODEL_OPTIONS,
    quantize: Optional[str] = QUANTIZE,
    host: str = typer.Option("127.0.0.1", "--host", metavar="HOST", help="Address to listen on; anything but loopback needs --api-key or --no-auth.", rich_help_panel=SERVER),
    port: int = typer.Option(8000, "--port", metavar="PORT", min=0, max=65535, help="Port (0 picks a free one; the URL printed says which).", rich_help_panel=SERVER),
    api_key: Optional[str] = typer.Option(None, "--api-key", metavar="KEY", envvar="DFLASH_API_KEY", show_envvar=True, help="Require Authorization: Bearer KEY.", rich_help_panel=SERVER),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve a non-loopback --host without a key (prints a warning).", rich_help_panel=SERVER),
    cors_origin: List[str] = typer.Option([], "--cors-origin", metavar="ORIGIN", help="Allow browser pages from this origin (repeatable; none by default).", rich_help_panel=SERVER),
    allow_host: List[str] = typer.Option([], "--allow-host", metavar="NAME", help="Also answer requests whose Host header is NAME, e.g. behind a proxy (repeatable; * for any). Loopback names and the --host address always are.", rich_help_panel=SERVER),
    max_queue: int = typer.Option(16, "--max-queue", metavar="N", min=0, help="Requests that may wait behind the running one; more get 503.", rich_help_panel=SERVER),
    timeout: float = typer.Option(600.0, "--timeout", metavar="SECONDS", min=1, help="Seconds a request may take, queueing included.", rich_help_panel=SERVER),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", metavar="MIB", help="Largest request body, in MiB.", rich_help_panel=SERVER),
    reasoning: Reasoning = REASONING,
    engine: Optional[str] = typer.Option(None, "--engine", metavar="ENGINE", help="Hand the pair to sglang or vllm (several GPUs) instead of serving it here.", rich_help_panel=ENGINE),
    tp: Optional[int] = typer.Option(None, "--tp", metavar="GPUS", min=1, help="With --engine: GPUs for tensor parallelism (default: the pair's suggestion).", rich_help_panel=ENGINE),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --engine: print the command instead of running it.", rich_help_panel=ENGINE),
) -> None:
    """Serve a model over an OpenAI-compatible API (chat, completions, streaming, tools, reasoning).

    \b
    Examples:
      dflash serve qwen3-8b                            # http://127.0.0.1:8000/v1
      dflash serve qwen3-8b --host 0.0.0.0 --api-key "$KEY"
      dflash serve qwen3.6-27b --quantize int4             # on a 24 GB card
      dflash serve --engine vllm qwen3.5-122b-a10b --tp 4 --dry-run
    """
    from ..serve.launch import ServeFlags
    from ..serve.launch import serve as serve_flags

    serve_flags(ServeFlags(
        model=model.model, target=model.target, drafter=model.drafter, yes=model.yes, host=host, port=port,
        api_key=api_key, no_auth=no_auth, cors_origins=tuple(cors_origin), max_queue=max_queue, timeout=timeout,
        max_body_mb=max_body_mb, think=reasoning.think, block_size=model.block_size, no_spec=model.no_spec,
        device=model.device, dtype=model.dtype, max_context=model.max_context, engine=engine, tp=tp,
        dry_run=dry_run, draft_window=model.draft_window, tree_budget=model.tree_budget,
        reasoning_effort=reasoning.effort, allow_hosts=tuple(allow_host), quantize=quantize))
