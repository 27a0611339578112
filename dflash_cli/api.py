"""The Python API, and the one factory every command builds its session with.

    import dflash_cli
    pair = dflash_cli.load("qwen3-8b")
    r = pair.generate("Why is the sky blue?", max_tokens=256)
    r.text, r.token_ids, r.reasoning, r.acceptance_lengths, r.block_sizes, r.finish_reason
    for piece in pair.stream("Tell me a story", max_tokens=64):
        print(piece.text, end="")

`open_session(ModelOptions)` resolves the model (an alias, a Hub id or a directory), checks the
block size against the drafter before a weight is read, loads the pair and sizes its engine: `run`,
`chat`, `serve`, `bench` and `train` call it, and so does `load`. `Pair.stream` is the same
`generate.stream_text` the commands stream with, so the API's tokens are `dflash run`'s.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Iterator

from .engine import Engine, Request
from .errors import DflashError, UsageError
from .formats import ChatPrompt, Reasoning, check_effort
from .generate import Stats, stream_text
from .harmony import ToolCall
from .loader import Model
from .prompt import Prompt, render_prompt
from .sampling import SamplingParams


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Which pair to load and how to run it: the Model options every command shares."""

    model: str | None = None  # an alias (`dflash models`), or None with `target`
    target: str | None = None  # a Hub repo id or a directory
    drafter: str | None = None  # a Hub repo id or a directory; None: the alias's, or plain decoding
    no_spec: bool = False  # plain decoding, without the drafter
    yes: bool = False  # download what is missing without asking
    device: str = "auto"
    dtype: str = "auto"
    block_size: int | None = None  # None: auto (chosen per iteration); a number pins it
    max_context: int | None = None  # None: what fits
    draft_window: int | None = None
    tree_budget: int | str = 0  # nodes of a verified draft tree (tree.py); 0: the drafter's chain; "auto"
    quantize: str | None = None  # "int4" | "int8" | "fp8": the target quantized at load (cached on disk)


def parse_tree_budget(value: str | int | None, flag: str = "--tree-budget") -> int | str:
    """0 (the chain), a node budget >= 2, or "auto" (the engine picks the chain or a tree per iteration)."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be 0 or a node budget such as 16, got '{value}'") from None
    if number < 0 or number == 1:
        raise UsageError(f"{flag} must be 0 (the chain) or at least 2 nodes, got {value}")
    return number


QUANTIZE = ("int4", "int8", "fp8")


def check_quantize(value: str | None, flag: str = "--quantize") -> str | None:
    """None (the target as stored) or one of the schemes `quant.quantize` writes."""
    if value is None:
        return None
    scheme = str(value).strip().lower()
    if scheme not in QUANTIZE:
        raise UsageError(f"{flag} must be one of {', '.join(QUANTIZE)}, got '{value}'")
    return scheme


def quantized_target(target_dir: Path, scheme: str | None, device: str = "auto") -> Path:
    """`target_dir`, or its copy quantized with `scheme` (made once, then read from the cache)."""
    if scheme is None:
        return target_dir
    from .loader import resolve_device
    from .quant.cache import quantized

    dev = resolve_device(device)
    return quantized(target_dir, check_quantize(scheme), device=str(dev))


def parse_block_size(value: str | int | None, flag: str = "--block-size") -> int | None:
    """`auto` (None: chosen per iteration) or a pinned B >= 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be auto or a whole number, got '{value}'") from None
    if number < 1 or isinstance(value, float) and value != number:
        raise UsageError(f"{flag} must be auto or at least 1, got {value}")
    return number


def check_block_size(drafter_dir: Path | None, block_size: int | None, least: int = 1) -> None:
    """-b against the drafter's config.json, before any weight is read (None: auto, always fits)."""
    if block_size is None or drafter_dir is None:
        return
    from .config import DrafterConfig

    with warnings.catch_warnings():  # the loader reads the config again and says what it has to say
        warnings.simplefilter("ignore")
        limit = DrafterConfig.from_dir(drafter_dir).block_size
    if block_size > limit:
        raise UsageError(f"--block-size must be between {least} and the drafter's {limit}, got {block_size}")


def resolve(opts: ModelOptions, least_block: int = 1) -> tuple[Path, Path | None]:
    """(target dir, drafter dir or None), pulled if allowed, with -b checked against the drafter."""
    if is_demo(opts):  # shipped: no Hub client to import (half a second)
        from .registry import demo_dirs

        target_dir, drafter_dir = demo_dirs()
        drafter_dir = None if opts.no_spec else drafter_dir
    else:
        from .resolve import resolve_model

        target_dir, drafter_dir = resolve_model(opts.model, opts.target, opts.drafter, yes=opts.yes,
                                                no_spec=opts.no_spec)
    check_block_size(drafter_dir, opts.block_size, least_block)
    return target_dir, drafter_dir


def is_demo(opts: ModelOptions) -> bool:
    """The shipped demo pair, named by its alias (a --drafter of one's own goes through resolve)."""
    from .registry import is_demo as demo_alias

    return opts.model is not None and opts.target is None and opts.drafter is None and demo_alias(opts.model)


def open_session(opts: ModelOptions, dirs: tuple[Path, Path | None] | None = None) -> "Pair":
    """Load the pair `opts` names (or the directories `dirs` it was already resolved to). The demo's
    answers end at the end of a story."""
    from . import loader, registry

    target_dir, drafter_dir = dirs if dirs is not None else resolve(opts)
    target_dir = quantized_target(target_dir, opts.quantize, opts.device)
    model = loader.load(target_dir, drafter_dir, device=opts.device, dtype=opts.dtype, max_context=opts.max_context,
                        tree_budget=opts.tree_budget)  # the plan counts the tree verify's buffers
    if opts.model is not None and opts.target is None and registry.is_demo(opts.model):
        model = replace(model, stop_token_ids=model.stop_token_ids | {registry.DEMO_STORY_END})  # a story's end
    return Pair(model, block_size=opts.block_size, draft_window=opts.draft_window, tree_budget=opts.tree_budget)


def load(model: str | None = None, *, target: str | Path | None = None, drafter: str | Path | None = None,
         device: str = "auto", dtype: str = "auto", block_size: str | int = "auto", max_context: int | None = None,
         draft_window: int | None = None, yes: bool = False, quantize: str | None = None) -> "Pair":
    """Load a pair: an alias (`dflash models`), or `target=` with `drafter=` (each a Hub repo id or a
    directory; `drafter=None` with `target=` decodes plainly). A model that is not downloaded is pulled
    with `yes=True`, after a question on a terminal, or not at all (an error says how). `quantize=` "int4",
    "int8" or "fp8" loads the target quantized (written once into a cache, then loaded from there; the
    drafter stays as it is)."""
    if model is None and target is None:
        raise UsageError("name a model (see `dflash models`), or give target= (and drafter=)")
    opts = ModelOptions(model=model, target=None if target is None else str(target),
                        drafter=None if drafter is None else str(drafter), yes=yes, device=device, dtype=dtype,
                        block_size=parse_block_size(block_size, "block_size"), max_context=max_context,
                        draft_window=draft_window, quantize=check_quantize(quantize, "quantize"))
    return open_session(opts)


@dataclass
class Piece:
    """What one iteration made final: text and reasoning (each may be empty), the tokens it committed."""

    text: str
    reasoning: str
    token_ids: list[int]
    finish_reason: str | None = None  # on the last piece: stop, length, tool_call
    tool_call: ToolCall | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    reasoning: str
    finish_reason: str | None
    acceptance_lengths: list[int]  # τ per iteration
    block_sizes: list[int]  # b per iteration (1: plain decoding)
    prompt_tokens: int
    tool_call: ToolCall | None = None
    stats: Stats = field(default_factory=Stats, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.stats.tokens_per_second


class Pair:
    """A loaded target and drafter with their tokenizer, chat format and engine."""

    def __init__(self, model: Model, *, block_size: int | None = None, draft_window: int | None = None,
                 tree_budget: int | str = 0):
        self.model, self.block_size, self.draft_window = model, block_size, draft_window
        self.tree_budget = tree_budget
        self._warm = False

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def format(self):
        return self.model.format

    @property
    def thinking(self) -> bool:
        """The pair's thinking default: what its drafter was trained with (formats.thinking_default)."""
        return self.model.thinking

    @cached_property
    def engine(self) -> Engine:
        return self.new_engine()

    def new_engine(self, max_context: int | None = None) -> Engine:
        """An engine for this pair: block size None is adaptive up to the drafter's B, a number pins it."""
        m = self.model
        return Engine(m.target, m.drafter, block_size=self.block_size if m.drafter else None,
                      max_context=min(max_context or m.max_context, m.max_context), adaptive=self.block_size is None,
                      draft_window=self.draft_window, tree_budget=self.tree_budget if m.drafter else 0)

    def warm_up(self, sampling: SamplingParams | None = None) -> float | None:
        """Capture graphs and measure adaptive costs now (otherwise the first generation does)."""
        self._warm = True
        return self.engine.warm_up(sampling)

    def render(self, prompt: Prompt, *, system: str | None = None, raw: bool = False, think: bool | None = None,
               reasoning_effort: str | None = None) -> ChatPrompt:
        """Prompt ids as `dflash run` renders them: a user message or a list of {role, content} messages
        through the chat template (thinking: `think`, else the pair's default), or the text with `raw`."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("the prompt is empty")
        else:
            from .jsonl import validate_messages

            if not isinstance(prompt, list) or not prompt:
                raise UsageError("the prompt must be a string or a non-empty list of {role, content} messages")
            prompt = validate_messages(prompt, "messages", UsageError)
        reasoning = Reasoning(think, check_effort(reasoning_effort, "reasoning_effort"))
        return render_prompt(self.tokenizer, prompt, format=self.format, system=system, raw=raw,
                             enable_thinking=reasoning.enable_thinking(self.thinking),
                             template_kwargs=reasoning.template_kwargs(self.format))

    def stream(self, prompt: Prompt, *, max_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: str | list[str] | None = None,
               raw: bool = False, think: bool | None = None, reasoning_effort: str | None = None,
               system: str | None = None) -> Iterator[Piece]:
        """The answer as it commits: one Piece per iteration."""
        for piece, _ in self._pieces(prompt, max_tokens, temperature, top_p, top_k, min_p, seed, stop, raw, think,
                                     reasoning_effort, system):
            yield piece

    def generate(self, prompt: Prompt, *, max_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: str | list[str] | None = None,
                 raw: bool = False, think: bool | None = None, reasoning_effort: str | None = None,
                 system: str | None = None) -> Result:
        """The whole answer, with the statistics `dflash run --json` reports."""
        text, reasoning, call, stats = [], [], None, Stats()
        for piece, stats in self._pieces(prompt, max_tokens, temperature, top_p, top_k, min_p, seed, stop, raw, think,
                                         reasoning_effort, system):
            text.append(piece.text)
            reasoning.append(piece.reasoning)
            call = piece.tool_call or call
        return Result("".join(text), list(stats.token_ids), "".join(reasoning), stats.finish,
                      list(stats.acceptance_lengths), list(stats.block_sizes), stats.prompt_tokens, call, stats)

    def _pieces(self, prompt, max_tokens, temperature, top_p, top_k, min_p, seed, stop, raw, think, effort, system):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise UsageError(f"max_tokens must be a whole number of at least 1, got {max_tokens!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampling = SamplingParams(temperature, top_k, top_p, min_p, seed)
        rendered = self.render(prompt, system=system, raw=raw, think=think, reasoning_effort=effort)
        engine = self.engine
        if len(rendered.ids) >= engine.max_context:
            raise DflashError(f"the prompt is {len(rendered.ids)} tokens; the context limit is {engine.max_context} "
                              "(raise it with max_context=, or shorten the prompt)")
        if not self._warm:  # as `dflash run` does before its first answer
            self.warm_up(sampling)
        request = Request(rendered.ids, max_tokens, self.model.stop_token_ids, sampling,
                          keep_prefix=rendered.keep_prefix)
        stats = Stats()
        chunks = stream_text(engine, self.tokenizer, request, stats, stops, prompt=rendered)
        try:
            for chunk in chunks:
                yield Piece(chunk.text, chunk.reasoning, list(chunk.step.tokens), chunk.step.finish,
                            chunk.tool_call), stats
        finally:
            chunks.close()
