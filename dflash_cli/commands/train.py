"""`dflash train`: a drafter for a target, trained on the target's own answers (../train/)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from .options import DEVICE, MODEL, OUTPUT, TRAINING, YES


def train(
    target: Optional[str] = typer.Option(None, "--target", metavar="ID|DIR", help="The target to draft for: a repo id, a directory, or `demo`.", rich_help_panel=MODEL),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Directory for the drafter (and its training state, for --resume)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", metavar="FILE", help="Prompts: .jsonl (strings or message lists) or text, one per line (default: a small built-in set)."),
    eval_prompts: Optional[Path] = typer.Option(None, "--eval-prompts", metavar="FILE", help="Held-out prompts for τ (default: the last tenth of --prompts, never trained on)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", "-b", metavar="B", help="Draft block size B (default 16).", rich_help_panel=MODEL),
    draft_layers: Optional[int] = typer.Option(None, "--draft-layers", metavar="N", help="Drafter layers (default 5).", rich_help_panel=MODEL),
    target_layer_ids: Optional[str] = typer.Option(None, "--target-layer-ids", metavar="IDS", help="Comma-separated target layers the drafter reads (default: spread over the depth, as released).", rich_help_panel=MODEL),
    mask_token_id: Optional[int] = typer.Option(None, "--mask-token-id", metavar="ID", help="Token id of the mask (default: the tokenizer's mask, a padded or reserved row, or the unknown token).", rich_help_panel=MODEL),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", help="Train for N optimizer steps…", rich_help_panel=TRAINING),
    time_budget: Optional[str] = typer.Option(None, "--time", metavar="DURATION", help="…or for this long: 90s, 15m, 1h30m (training only, not answer generation).", rich_help_panel=TRAINING),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint.", rich_help_panel=TRAINING),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="LR", help="Peak learning rate (default 6e-4; warm-up 4%, cosine decay).", rich_help_panel=TRAINING),
    anchors: Optional[int] = typer.Option(None, "--anchors", metavar="N", help="Draft blocks per sequence per step (default 512).", rich_help_panel=TRAINING),
    batch: Optional[int] = typer.Option(None, "--batch", metavar="N", help="Sequences per step (default 4).", rich_help_panel=TRAINING),
    max_answer_tokens: Optional[int] = typer.Option(None, "--max-answer-tokens", metavar="N", help="Longest answer the target writes per prompt (default 1024).", rich_help_panel=TRAINING),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", metavar="T", help="Temperature of the target's answers (default 0: greedy).", rich_help_panel=TRAINING),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Qwen3 thinking mode in the answers (default off): train in the mode you will chat in.", rich_help_panel=TRAINING),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="INT", help="Seed of the initialisation, batches and anchors (default 0).", rich_help_panel=TRAINING),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", metavar="N", help="Steps between checkpoints (default: a tenth of the run).", rich_help_panel=TRAINING),
    eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens", min=1, metavar="N", help="Tokens per held-out prompt when measuring τ (default 128).", rich_help_panel=TRAINING),
    grad_checkpoint: Optional[bool] = typer.Option(None, "--grad-checkpoint/--no-grad-checkpoint", help="Recompute layer activations in the backward pass (less memory; default off). --resume keeps this, --checkpoint-every, --eval-tokens and --device unless given again.", rich_help_panel=TRAINING),
    device: str = DEVICE,
    yes: bool = YES,
    json_out: bool = typer.Option(False, "--json", help="Print the final report as one JSON object.", rich_help_panel=OUTPUT),
) -> None:
    """Train a DFlash drafter for a target on its own answers; the result loads with --drafter.

    \b
    Examples:
      dflash train --target Qwen/Qwen3-4B --prompts prompts.jsonl --out qwen3-4b-dflash --time 2h
      dflash train --out qwen3-4b-dflash --resume
      dflash train --target demo --prompts stories.txt --block-size 8 --out demo-dflash --steps 2000
    """
    import json

    from rich.console import Console

    from ..train.command import TrainRequest, render, run_train

    ids = None
    if target_layer_ids is not None:
        try:
            ids = [int(x) for x in target_layer_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--target-layer-ids {target_layer_ids!r}: give comma-separated layer numbers, e.g. 1,9,17") from None
    request = TrainRequest(
        target=target, out=out, prompts=prompts, eval_prompts=eval_prompts, block_size=block_size,
        draft_layers=draft_layers, target_layer_ids=ids, mask_token_id=mask_token_id, think=think,
        temperature=temperature, max_answer_tokens=max_answer_tokens, lr=lr, anchors=anchors, batch=batch,
        steps=steps, time=time_budget, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
        eval_tokens=eval_tokens, grad_checkpoint=grad_checkpoint, device=device, yes=yes,
    )
    report = run_train(request, Console(stderr=True, soft_wrap=True))
    if json_out:
        typer.echo(json.dumps(report))
    else:
        render(report, Console(soft_wrap=True))
