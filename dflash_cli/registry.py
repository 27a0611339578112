"""The released DFlash pairs (DESIGN §3): aliases, Hub ids, and whether this version runs them."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UsageError


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

    @property
    def engine_only(self) -> bool:
        """Too big for one GPU: served by SGLang or vLLM with tensor parallelism, never by this engine."""
        return self.gpus > 1


# Why a pair cannot run yet (shown by `dflash models` and in the error when one is asked for).
_MUSE = "Muse-Glimmer target architecture (gated attention output, normalised embeddings, scaled logits)"
_GLM53 = "GLM-5.3-Flash target architecture (KDA linear attention and MLA hybrid)"


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
    ModelPair("muse-glimmer-30b", "meta-models/Muse-Glimmer-30B", "z-lab/Muse-Glimmer-30B-DFlash2", 16,
              supported=False, note=_MUSE, think=True),
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
    close = difflib.get_close_matches(key, _BY_ALIAS, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else " (see `dflash models`)"
    raise UsageError(f"unknown model '{name}'{hint}")
