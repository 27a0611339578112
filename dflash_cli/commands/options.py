"""Options several commands share: their declarations, and option groups.

A group is declared once and used as one parameter: `model: ModelOptions = MODEL_OPTIONS` in a command
becomes the group's options on the command line, and the command receives them parsed into one
value (`ModelOptions`, keyword-built). `with_groups` does the expansion for typer, which reads a
command's signature."""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

if TYPE_CHECKING:
    from ..api import ModelOptions
    from ..formats import Reasoning
    from ..sampling import SamplingParams

SAMPLING = "Sampling"
MODEL = "Model"
OUTPUT = "Output"
SERVER = "Server"
ENGINE = "Hand-off to SGLang / vLLM"
TRAINING = "Training"

MODEL_ARG = typer.Argument(None, metavar="MODEL",
                           help="Model alias (see `dflash models`) or a local directory; or use --target/--drafter.")
TARGET = typer.Option(None, "--target", metavar="ID|DIR", help="Target: a Hugging Face repo id or a local directory.", rich_help_panel=MODEL)
DRAFTER = typer.Option(None, "--drafter", metavar="ID|DIR", help="DFlash drafter: a repo id or a local directory.", rich_help_panel=MODEL)
YES = typer.Option(False, "--yes", "-y", help="Download missing models without asking.", rich_help_panel=MODEL)
BLOCK = typer.Option("auto", "--block-size", "-b", metavar="auto|B", help="Draft block size: auto picks it per iteration from measured costs and live acceptance (1 when drafting does not pay); B pins it.", rich_help_panel=MODEL)
TREE_BUDGET = typer.Option("0", "--tree-budget", metavar="N|auto|0", help="Verify a best-first tree of N draft nodes per target pass (DDTree) instead of the drafter's chain; auto: the chain or a tree of 4 to 64 nodes per iteration, from measured costs and live acceptance; 0: the chain. Same answer, more tokens per pass when the drafter hesitates.", rich_help_panel=MODEL)
DRAFT_WINDOW = typer.Option(None, "--draft-window", min=1, metavar="TOKENS", help="The drafter attends to at most this many recent tokens (bounds its cost at long context; the answer is the same).", rich_help_panel=MODEL)
NO_SPEC = typer.Option(False, "--no-spec", help="Plain autoregressive decoding (the baseline).", rich_help_panel=MODEL)
DEVICE = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL)
DTYPE = typer.Option("auto", "--dtype", metavar="DTYPE", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16 or float32.", rich_help_panel=MODEL)
QUANTIZE = typer.Option(
    None, "--quantize", metavar="auto|none|int4|int8|fp8", rich_help_panel=MODEL,
    help="The target's weights on the GPU. auto (the default): bfloat16 when the pair fits, else the target's "
         "official FP8 or int4 checkpoint that fits, else the bfloat16 target quantized at load (int8, then int4; "
         "cached for the next load), said on one line. none: bfloat16 as released. int4, int8, fp8: that format "
         "(the official checkpoint where there is one). The drafter stays bfloat16; `dflash models` shows what fits.")
MAX_CONTEXT = typer.Option(None, "--max-context", min=2, metavar="TOKENS", help="Most tokens (prompt + answer) in the KV cache (default: what fits).", rich_help_panel=MODEL)
MAX_TOKENS = typer.Option(512, "--max-tokens", "-n", min=1, metavar="N", help="Most tokens to generate per answer.")
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", metavar="T", help="0 is greedy.", rich_help_panel=SAMPLING)
TOP_P = typer.Option(1.0, "--top-p", metavar="P", help="Nucleus sampling mass (1 disables).", rich_help_panel=SAMPLING)
TOP_K = typer.Option(0, "--top-k", metavar="K", help="Keep the k likeliest tokens (0 disables).", rich_help_panel=SAMPLING)
MIN_P = typer.Option(0.0, "--min-p", metavar="P", help="Drop tokens below min_p × the top probability.", rich_help_panel=SAMPLING)
SEED = typer.Option(None, "--seed", metavar="INT", help="Sampling seed: the same seed gives the same answer, with or without speculation.", rich_help_panel=SAMPLING)
SYSTEM = typer.Option(None, "--system", "-s", metavar="TEXT", help="System prompt.")
THINK = typer.Option(None, "--think/--no-think", help="Thinking mode (default: as the drafter was trained: off for the Qwen3 b16 pairs, on for Qwen3.5/3.6; gpt-oss: --think is high reasoning effort, --no-think low).")
EFFORT = typer.Option(None, "--reasoning-effort", metavar="LEVEL", help="low, medium or high: gpt-oss's reasoning (medium by default), or any chat template that reads reasoning_effort.")


@dataclass(frozen=True)
class Group:
    """Options parsed into one value: (parameter name, type, typer declaration) each, and `build`,
    called with them by name."""

    options: tuple[tuple[str, Any, Any], ...]
    build: Callable[..., Any]


def with_groups(command: Callable) -> Callable:
    """The command with each parameter whose default is a Group replaced, in place, by the group's
    options; it is called with the group's value. What typer reads is the resulting signature."""
    signature = inspect.signature(command)
    hints = command.__globals__
    params, groups = [], {}
    for p in signature.parameters.values():
        if isinstance(p.default, Group):
            groups[p.name] = p.default
            params += [inspect.Parameter(name, p.POSITIONAL_OR_KEYWORD, default=decl, annotation=kind)
                       for name, kind, decl in p.default.options]
        else:  # annotations are strings (`from __future__ import annotations`): typer needs the types
            kind = eval(p.annotation, hints) if isinstance(p.annotation, str) else p.annotation
            params.append(p.replace(annotation=kind))

    @functools.wraps(command)
    def invoke(**kwargs):
        for name, group in groups.items():
            kwargs[name] = group.build(**{n: kwargs.pop(n) for n, _, _ in group.options})
        return command(**kwargs)

    del invoke.__wrapped__  # typer reads the signature below, not the command's own
    invoke.__signature__ = signature.replace(parameters=params)
    invoke.__annotations__ = {p.name: p.annotation for p in params}
    return invoke


def _model_options(model, target, drafter, yes, block_size, draft_window, no_spec, device, dtype,
                   max_context, tree_budget="0") -> "ModelOptions":
    from ..api import ModelOptions, parse_block_size, parse_tree_budget

    model, target = model_or_directory(model, target)
    return ModelOptions(model=model, target=target, drafter=drafter, yes=yes, block_size=parse_block_size(block_size),
                        draft_window=draft_window, no_spec=no_spec, device=device, dtype=dtype,
                        max_context=max_context, tree_budget=parse_tree_budget(tree_budget))


def model_or_directory(model: str | None, target: str | None) -> tuple[str | None, str | None]:
    """`dflash run ./my-model`: a MODEL that is no alias but a local directory is the target, as --target."""
    from pathlib import Path

    from .. import registry

    if model is None or target is not None or model.strip().lower() in registry.aliases():
        return model, target
    if Path(model).expanduser().is_dir():
        return None, model
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an alias or a Hub id
        from ..errors import UsageError

        raise UsageError(f"{model}: no such directory (MODEL is an alias from `dflash models` or a local directory)")
    return model, target


MODEL_OPTIONS = Group((("model", Optional[str], MODEL_ARG), ("target", Optional[str], TARGET),
                       ("drafter", Optional[str], DRAFTER), ("yes", bool, YES), ("block_size", str, BLOCK),
                       ("draft_window", Optional[int], DRAFT_WINDOW), ("no_spec", bool, NO_SPEC),
                       ("device", str, DEVICE), ("dtype", str, DTYPE), ("max_context", Optional[int], MAX_CONTEXT),
                       ("tree_budget", str, TREE_BUDGET)),
                      _model_options)


def _sampling(temperature, top_p, top_k, min_p, seed) -> "SamplingParams":
    from ..sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)


SAMPLING_OPTIONS = Group((("temperature", float, TEMPERATURE), ("top_p", float, TOP_P), ("top_k", int, TOP_K),
                          ("min_p", float, MIN_P), ("seed", Optional[int], SEED)), _sampling)


def reasoning_options(think=THINK, effort=EFFORT) -> Group:
    """--think/--no-think and --reasoning-effort (checked), as `formats.Reasoning`."""
    def build(think, reasoning_effort) -> "Reasoning":
        from ..formats import Reasoning, check_effort

        return Reasoning(think, check_effort(reasoning_effort))

    return Group((("think", Optional[bool], think), ("reasoning_effort", Optional[str], effort)), build)


REASONING_OPTIONS = reasoning_options()


def note(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"dflash: {text}", file=sys.stderr)
