"""`dflash pull`, `models` and `rm`: the released pairs and the Hugging Face cache."""
from __future__ import annotations

import sys

import typer

from ..errors import UsageError
from .options import note


def pull(model: str = typer.Argument(..., help="Model alias, or a Hugging Face repo id.", metavar="MODEL")) -> None:
    """Download a model pair (or one repo) into the Hugging Face cache; resumes where it stopped.

    Only safetensors, JSON configs and tokenizer files are fetched. Gated repos (Llama) need
    `hf auth login` or HF_TOKEN. Models already in the cache (from transformers, vLLM…) are reused.
    """
    from .. import hub, registry

    if "/" in model:
        hub.check_repo_id(model)
        print(f"pulling {model}", file=sys.stderr)
        print(f"{model}: {hub.pull(model)}", file=sys.stderr)
        return
    pair = registry.resolve(model)
    if not pair.supported:
        note(f"this version cannot run {pair.alias} yet ({pair.note}); downloading it anyway")
    print(f"pulling {pair.target} and {pair.drafter}", file=sys.stderr)
    for repo, path in zip((pair.target, pair.drafter), hub.pull_pair(pair)):  # one disk check for both
        print(f"{repo}: {path}", file=sys.stderr)


def models(json_out: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """List the released DFlash pairs: aliases, whether this version runs them, what is downloaded.

    GPU GiB: the memory each needs with its target in bfloat16, FP8 and int4; green where it fits the GPU seen here."""
    import json

    from ..catalog import gpu_seen, model_rows, render_models

    gpu = gpu_seen()
    rows = model_rows(gpu)
    if json_out:
        typer.echo(json.dumps(rows))
    else:
        render_models(rows, gpu)


def rm(
    model: str = typer.Argument(..., help="Model alias, or a Hugging Face repo id.", metavar="MODEL"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    drafter_only: bool = typer.Option(False, "--drafter-only", help="Keep the target (it may be shared with other tools)."),
) -> None:
    """Delete a model pair (or one repo) from the Hugging Face cache."""
    from .. import hub, registry
    from ..quant import cache as quant_cache
    from ..resolve import ask, interactive

    if "/" in model:
        hub.check_repo_id(model)
        repos = [model]
    else:
        pair = registry.resolve(model)
        repos = [pair.drafter] if drafter_only else [pair.target, pair.drafter]
    present = [(r, hub.cached_size(r)) for r in repos]
    present = [(r, s) for r, s in present if s is not None]
    copies = [p for r in repos for p in quant_cache.copies_of(r)]  # what --quantize made of them
    if not present and not copies:
        print(f"{model} is not in the cache ({hub.cache_dir()})", file=sys.stderr)
        return
    listing = ", ".join([f"{r} ({hub.format_size(s)})" for r, s in present] +
                        [f"its quantized copy {p.name}" for p in copies])
    if not yes:
        if not interactive():
            raise UsageError(f"this would delete {listing}: pass --yes to confirm")
        if not ask(f"Delete {listing} from {hub.cache_dir()}?"):
            raise typer.Exit(1)
    for repo, _ in present:
        freed = hub.remove(repo)
        print(f"removed {repo} ({hub.format_size(freed)})", file=sys.stderr)
    for repo in repos:
        if quant_cache.copies_of(repo):
            freed = quant_cache.remove_copies(repo)
            print(f"removed the quantized copies of {repo} ({hub.format_size(freed)})", file=sys.stderr)
