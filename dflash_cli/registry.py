"""The released DFlash pairs (DESIGN §3): aliases, Hub ids, and whether this version runs them."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from .errors import UsageError


@dataclass(frozen=True)
class QuantRepo:
    """A quantized checkpoint of a pair's target: what `--quantize fp8|int4` (and auto, for an official
    one) downloads instead of the bf16 target. The drafter stays the pair's own, in bf16."""

    repo: str  # Hub repo id
    format: str  # "fp8" or "int4": the format it is held in on the GPU (memory.FORMATS)
    layout: str  # on-disk format (quant/plan.py): fp8-block, gptq, awq, auto-round or compressed-tensors
    official: bool = False  # published by the target's own organisation (auto picks only these)
    verified: bool = False  # the id was seen on a public page when it was added; False: from notes, unconfirmed
    gb: float | None = None  # published weight size in GB, where the checkpoint keeps more than the
    # embedding, head and norms in bf16 (then an all-projections estimate would be too small)


# Target kinds dflash does not quantize: gpt-oss's experts ship MXFP4 already (quant/cache.py refuses gpt_oss).
UNQUANTIZED_KINDS = ("gpt-oss",)


@dataclass(frozen=True)
class ModelPair:
    alias: str  # what users type: `dflash run qwen3-8b`
    target: str  # Hub repo id of the target model
    drafter: str  # Hub repo id of its DFlash drafter
    block_size: int  # tokens per draft block; the drafter's config.json is what the engine reads
    supported: bool = True  # whether this version can run the pair
    note: str = ""  # why not, in one line, when unsupported
    gated: bool = False  # the target needs an accepted licence and a token
    kind: str = "dense"  # dense, hybrid, moe, hybrid-moe or gpt-oss: the target's architecture family
    think: bool = False  # the thinking mode the drafter was trained with: the chat default
    gpus: int = 1  # GPUs the pair needs; above 1 it is handed to SGLang/vLLM (`dflash serve --engine`)
    tested_quantized: bool = True  # its family is tested quantized (config.QUANT_FAMILIES); False: refused by name
    quantized: tuple[QuantRepo, ...] = ()  # quantized checkpoints of the target, official ones first

    def official(self, fmt: str) -> QuantRepo | None:
        """The target's official checkpoint in `fmt` ("fp8", "int4"), if there is one."""
        return next((q for q in self.quantized if q.official and q.format == fmt), None)

    @property
    def quantizable(self) -> bool:
        """Whether dflash runs this target quantized (an official checkpoint, or quantized at load)."""
        return self.tested_quantized and self.kind not in UNQUANTIZED_KINDS

    @property
    def engine_only(self) -> bool:
        """Too big for one GPU: served by SGLang or vLLM with tensor parallelism, never by this engine."""
        return self.gpus > 1


# Why a pair cannot run yet (shown by `dflash models` and in the error when one is asked for).
_GLM53 = "GLM-5.3-Flash target architecture (KDA linear attention and MLA hybrid)"


# Quantized targets (research/landscape-and-quantization.md Part B1). `verified`: the repo id was seen on a
# public page (a model card, a collection, a card naming it as its source) when the row was written, Dec 2026;
# the others come from the research notes and the release pattern, and could not be confirmed here.
def _fp8(repo: str, verified: bool = False) -> QuantRepo:
    return QuantRepo(repo, "fp8", "fp8-block", official=True, verified=verified)


def _int4(repo: str, layout: str, *, official: bool = False, verified: bool = False,
          gb: float | None = None) -> QuantRepo:
    return QuantRepo(repo, "int4", layout, official=official, verified=verified, gb=gb)


QUANTIZED: dict[str, tuple[QuantRepo, ...]] = {
    "qwen3-4b": (_fp8("Qwen/Qwen3-4B-FP8"), _int4("Qwen/Qwen3-4B-AWQ", "awq", official=True)),
    "qwen3-8b": (_fp8("Qwen/Qwen3-8B-FP8", verified=True), _int4("Qwen/Qwen3-8B-AWQ", "awq", official=True, verified=True)),
    # Meta publishes none; the base weights are the same as Meta-Llama-3.1-8B-Instruct's.
    "llama3.1-8b": (QuantRepo("RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8", "fp8", "compressed-tensors"),
                    _int4("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16", "compressed-tensors", verified=True),
                    _int4("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", "awq", verified=True)),
    "qwen3-coder-30b-a3b": (_fp8("Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8", verified=True),),
    # Qwen's GPTQ-Int4 of the 27B keeps much of the model in bf16: 30.3 GB, about its FP8's 30.9 (Kaitchup, 2026-03).
    "qwen3.5-27b": (_fp8("Qwen/Qwen3.5-27B-FP8"),
                    _int4("Qwen/Qwen3.5-27B-GPTQ-Int4", "gptq", official=True, verified=True, gb=30.3)),
    "qwen3.5-35b-a3b": (_fp8("Qwen/Qwen3.5-35B-A3B-FP8"), _int4("Qwen/Qwen3.5-35B-A3B-GPTQ-Int4", "gptq", official=True)),
    # Qwen publishes no int4 of 3.6 (Qwen3.6-27B-GPTQ-Int4 does not exist): community GPTQ / AutoRound ones.
    "qwen3.6-27b": (_fp8("Qwen/Qwen3.6-27B-FP8", verified=True),
                    _int4("AxisQuant/Qwen3.6-27b-gptq-int4", "gptq", verified=True),
                    _int4("btbtyler09/Qwen3.6-27B-GPTQ-4bit", "gptq", verified=True)),
    "qwen3.6-35b-a3b": (_fp8("Qwen/Qwen3.6-35B-A3B-FP8", verified=True),
                        _int4("Intel/Qwen3.6-35B-A3B-int4-AutoRound", "auto-round", verified=True),
                        _int4("nchapman/Qwen3.6-35B-A3B-int4-AutoRound", "auto-round", verified=True),
                        _int4("palmfuture/Qwen3.6-35B-A3B-GPTQ-Int4", "gptq", verified=True, gb=24.4)),
    "qwen3.8-27b": (_fp8("Qwen/Qwen3.8-27B-FP8", verified=True),
                    _int4("cyankiwi/Qwen3.8-27B-AWQ-INT4", "compressed-tensors", verified=True)),
}


def _engine(gpus: int) -> str:
    return f"needs {gpus} GPUs: `dflash serve --engine sglang|vllm` hands it to an engine with tensor parallelism"

PAIRS: tuple[ModelPair, ...] = (
    # The Qwen3 b16 drafters were trained without thinking (DESIGN §3).
    ModelPair("qwen3-4b", "Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16", 16),
    ModelPair("qwen3-8b", "Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", 16),
    ModelPair("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "z-lab/LLaMA3.1-8B-Instruct-DFlash-UltraChat", 10,
              gated=True),
    ModelPair("qwen3-coder-30b-a3b", "Qwen/Qwen3-Coder-30B-A3B-Instruct", "z-lab/Qwen3-Coder-30B-A3B-DFlash", 16,
              kind="moe"),  # a non-thinking coder
    # gpt-oss drafters: block 8 (20b) and 10 (120b), not 16 (research/moe-gptoss.md §4). Experts stay
    # MXFP4 (12.8 / 60.8 GiB); gpt-oss always reasons (harmony), at medium effort unless asked.
    ModelPair("gpt-oss-20b", "openai/gpt-oss-20b", "z-lab/gpt-oss-20b-DFlash", 8, kind="gpt-oss", think=True),
    ModelPair("gpt-oss-120b", "openai/gpt-oss-120b", "z-lab/gpt-oss-120b-DFlash", 10, kind="gpt-oss", think=True),
    # The Qwen3.5 / 3.6 drafters were trained with thinking on (research/hybrid.md §5).
    *(ModelPair(f"qwen3.5-{size.lower()}", f"Qwen/Qwen3.5-{size}", f"z-lab/Qwen3.5-{size}-DFlash", 16,
                kind="hybrid", think=True) for size in ("4B", "9B", "27B")),
    ModelPair("qwen3.5-35b-a3b", "Qwen/Qwen3.5-35B-A3B", "z-lab/Qwen3.5-35B-A3B-DFlash", 16, kind="hybrid-moe",
              think=True),
    ModelPair("qwen3.6-27b", "Qwen/Qwen3.6-27B", "z-lab/Qwen3.6-27B-DFlash", 16, kind="hybrid", think=True),
    ModelPair("qwen3.6-35b-a3b", "Qwen/Qwen3.6-35B-A3B", "z-lab/Qwen3.6-35B-A3B-DFlash", 16, kind="hybrid-moe",
              think=True),
    # Gemma 4 (models/gemma4.py). Ids as vLLM's and SGLang's users run them (note the 12B drafter's `gemma4-`
    # spelling); the 31B drafter's block 16 is its config's, the 12B's and 26B-A4B's are z-lab's usual 16 [not
    # seen in a config]. Thinking off: the drafters' users run them without the thinking channel [not stated
    # by z-lab]. Apache 2.0, not gated.
    ModelPair("gemma-4-12b", "google/gemma-4-12B-it", "z-lab/gemma4-12B-it-DFlash", 16),
    ModelPair("gemma-4-31b", "google/gemma-4-31B-it", "z-lab/gemma-4-31B-it-DFlash", 16),
    ModelPair("gemma-4-26b-a4b", "google/gemma-4-26B-A4B-it", "z-lab/gemma-4-26B-A4B-it-DFlash", 16, kind="moe"),
    # DFlash2 drafters (research/dflash2.md §1, §4): the v1 drafter plus dynamic convs and a candidate selector.
    # Qwen3.8-27B is the Qwen3.5 hybrid architecture; thinking on, its template's reasoning effort at its default.
    ModelPair("qwen3.8-27b", "Qwen/Qwen3.8-27B", "z-lab/Qwen3.8-27B-DFlash2", 8, kind="hybrid", think=True),
    # Muse-Glimmer-30B (models/muse_glimmer.py), 60 GB in bf16: one 80 GB GPU. Repo ids as public configs and
    # serving recipes cite them (z-lab's drafter at b54ffdd1; Meta's v1 `meta-models/Muse-Glimmer-30B-assistant`
    # loads too, as --drafter). Thinking on: the DFlash2 drafter was fine-tuned from Meta's assistant [U: its mode].
    ModelPair("muse-glimmer-30b", "meta-models/Muse-Glimmer-30B", "z-lab/Muse-Glimmer-30B-DFlash2", 16, think=True),
    # Published by incoai, not in z-lab's list; the target's repo id is not confirmed (research/dflash2.md §4).
    ModelPair("glm-5.3-flash", "zai-org/GLM-5.3-Flash", "incoai/GLM-5.3-Flash-DFlash2", 8, supported=False,
              note=_GLM53, kind="hybrid"),
    # Pairs beyond one GPU (suggested counts are for 80 GB cards at bf16, FP8 or the native INT4 of Kimi).
    ModelPair("qwen3.5-122b-a10b", "Qwen/Qwen3.5-122B-A10B", "z-lab/Qwen3.5-122B-A10B-DFlash", 16, supported=False,
              note=_engine(4), kind="hybrid-moe", think=True, gpus=4),
    ModelPair("qwen3.5-397b-a17b", "Qwen/Qwen3.5-397B-A17B", "z-lab/Qwen3.5-397B-A17B-DFlash", 16, supported=False,
              note=_engine(8), kind="hybrid-moe", think=True, gpus=8),
    # Qwen3-Next architecture (hybrid linear attention, MoE); a non-thinking coder (research/hybrid.md §5).
    ModelPair("qwen3-coder-next", "Qwen/Qwen3-Coder-Next", "z-lab/Qwen3-Coder-Next-DFlash", 16, supported=False,
              note=_engine(4), kind="hybrid-moe", gpus=4),
    # Block 8 as its config.json was reported; a downloaded drafter's own config.json wins (handoff.py).
    ModelPair("kimi-k2.5", "moonshotai/Kimi-K2.5", "z-lab/Kimi-K2.5-DFlash", 8, supported=False, note=_engine(8),
              kind="moe", gpus=8),
    # Block size not yet seen in a config: 16 as z-lab's other v1 drafters, until the checkpoint says otherwise.
    ModelPair("glm-5.1", "zai-org/GLM-5.1", "z-lab/GLM-5.1-DFlash", 16, supported=False, note=_engine(8), kind="moe",
              gpus=8),
)

PAIRS = tuple(replace(p, quantized=QUANTIZED.get(p.alias, p.quantized)) for p in PAIRS)
_BY_ALIAS = {p.alias: p for p in PAIRS}

# The CPU demo pair ships inside the package: the trained stories260K Llama and a drafter trained
# for it by `dflash train` (scripts/make_demo_pair.py). Nothing to download.
DEMO = "demo"
# stories260K, like llama2.c's models, ends every story with BOS (id 1), and llama2.c's run.c stops
# there: so does the demo in run and chat, or an answer runs on into unrelated stories to the end of
# the context (and a chat's first answer fills it).
DEMO_STORY_END = 1


def demo_dirs() -> tuple[Path, Path]:
    """(target, drafter) directories of the demo pair."""
    root = Path(str(resources.files("dflash_cli").joinpath("data/demo")))
    return root / "stories260K", root / "stories260K-dflash"


def all_pairs() -> tuple[ModelPair, ...]:
    return PAIRS


def is_demo(name: str) -> bool:
    """`name` names the shipped demo pair (case and spaces as `resolve` ignores them)."""
    return name.strip().lower() == DEMO


def aliases() -> list[str]:
    return [p.alias for p in PAIRS] + [DEMO]


def resolve(name: str) -> ModelPair:
    """The pair for an alias (case-insensitive); a usage error with a suggestion otherwise."""
    key = name.strip().lower()
    pair = _BY_ALIAS.get(key)
    if pair is not None:
        return pair
    if is_demo(name):
        raise UsageError("the demo pair ships with dflash: there is nothing to download or remove")
    by_repo = [p for p in PAIRS if key in (p.target.lower(), p.drafter.lower())]
    if by_repo:  # `dflash run Qwen/Qwen3-8B`: the released pair of that target (or drafter)
        return by_repo[0]
    if "/" in key:
        raise UsageError(f"unknown model '{name}': a Hub repo id or a directory goes after --target "
                         f"(--target {name} --drafter DRAFTER; `dflash models` lists the aliases)")
    close = difflib.get_close_matches(key, _BY_ALIAS, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else " (see `dflash models`)"
    raise UsageError(f"unknown model '{name}'{hint}")
