"""Every model family the engine runs, as one table of tiny cases: tests/test_conformance.py runs the
same checks over each row. A new family is a checkpoint writer in tests/tiny*.py, a pair fixture in
tests/conftest.py and one `Family` here.

Each case names its pair (a session fixture of tests/conftest.py: target and drafter directories), the
target checkpoints whose logits are compared with transformers (`layouts`: every released layout the
loader reads), the transformers model that is the independent reference, and the parameters of each
check (prompts, token counts, block sizes, how much of the drafts a fitted drafter must get accepted).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers

from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS, STORY_PROMPTS, random_prompts
from .tiny import (copy_stories, qwen3_moe_config, qwen35_config, qwen35_moe_config, save_weights, target_config,
                   write_qwen35, write_target)
from .tiny_gemma4 import gemma4_config, reference as gemma4_reference, write_gemma4
from .tiny_gpt_oss import gpt_oss_config, reference as gpt_oss_reference, write_gpt_oss
from .tiny_muse import muse_config, write_muse


def transformers_model(cls) -> Callable[[Path], torch.nn.Module]:
    """`cls` from the checkpoint in fp32, every tensor read and none left over: the layout is the released one."""
    def load(directory: Path) -> torch.nn.Module:
        model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        return model.eval()
    return load


def auto_model(directory: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def uniform_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    """Random prompts of 1-39 ids drawn from the whole vocabulary but its last id."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@dataclass(frozen=True)
class Layout:
    """A target checkpoint whose fp32 logits must equal transformers' for `tokens` random ids below
    `id_high`, the prompt fed in each of `chunkings`."""
    name: str
    write: Callable[[Path], Path]
    reference: Callable[[Path], torch.nn.Module]
    tokens: int
    id_high: int
    seed: int
    chunkings: tuple[tuple[int, ...], ...]
    stepwise: bool = False  # the reference decodes token by token (see Family "qwen3.5-moe")


@dataclass(frozen=True)
class Greedy:
    """Greedy speculative tokens = transformers' `generate` at each block size. `accepted`: on the
    prompts of `fitted` at the drafter's own block size, the longest acceptance is at least [0] and the
    mean above [1] (a fitted drafter's drafts really are accepted)."""
    prompts: Callable  # model -> prompts
    tokens: int
    block_sizes: tuple[int, ...]
    max_context: int | None = None
    fitted: tuple[tuple[int, ...], ...] = ()
    accepted: tuple[int, float] | None = None


@dataclass(frozen=True)
class Sampled:
    """Seeded sampling with speculation = plain decoding with the same seed, at each block size (None:
    the drafter's own)."""
    prompt: Callable  # model -> prompt
    tokens: int
    params: Callable[[int], SamplingParams]  # seed -> sampling
    seeds: int
    block_sizes: tuple[int | None, ...] = (None,)


@dataclass(frozen=True)
class Family:
    name: str
    pair: str  # the fixture of tests/conftest.py giving (target dir, drafter dir)
    reference: Callable[[Path], torch.nn.Module]  # transformers on the pair's target
    layouts: tuple[Layout, ...]
    greedy: Greedy
    sampled: Sampled
    prompt: Callable  # model -> the prompt of the one-step checks (host reads, replay)
    replay_prompts: Callable  # model -> prompts a recorded step is replayed over
    replay_tokens: int
    min_replays: int
    # The pair run through the interpreted Triton kernels (a smaller one where the family's is slow); None
    # where another case runs the same kernels (Triton's interpreter costs a minute a case on 2 cores).
    kernel_pair: str | None
    kernel_tokens: int = 16
    kernel_block: int = 4
    notes: str = ""


def _stories(model, prompts=STORY_PROMPTS) -> list[list[int]]:
    return [model.tokenizer.encode(p) for p in prompts]


def _tied_qwen35(directory: Path) -> Path:
    """A Qwen3.5 tied only at the top level, with no lm_head tensor (as Qwen3.5-4B ships)."""
    from safetensors.torch import load_file

    d = write_qwen35(directory, qwen35_config(tie=True), seed=3, slow_decay=True)
    w = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in w
    save_weights(d, w)
    return d


QWEN35_LOGITS = ((41,), (1, 3, 7, 30), (16, 16, 9))
MOE_LOGITS = ((29,), (1, 8, 20))
GPT_OSS_LOGITS = ((37,), (1, 3, 7, 26), (8, 8, 21))
DENSE_LOGITS = ((33,), (1, 4, 28), (16, 16, 1))
GEMMA4_LOGITS = ((29,), (1, 7, 21), (5, 1, 14, 9))  # a window of 8: every chunking crosses its boundary
HYBRID_SAMPLING = lambda seed: SamplingParams(temperature=0.7, top_p=0.9, seed=seed)  # noqa: E731
MOE_SAMPLING = lambda seed: SamplingParams(temperature=0.8, top_k=40, seed=seed)  # noqa: E731

FAMILIES = [
    Family(
        "qwen3", "qwen3_pair", auto_model,
        layouts=(Layout("untied", lambda d: write_target(d, target_config("qwen3", tie=False)),
                        transformers_model(transformers.Qwen3ForCausalLM), 33, 512, 1, DENSE_LOGITS),
                 Layout("tied", lambda d: write_target(d, target_config("qwen3", tie=True), seed=2),
                        transformers_model(transformers.Qwen3ForCausalLM), 33, 512, 1, DENSE_LOGITS)),
        greedy=Greedy(lambda m: uniform_prompts(8, 512, seed=len("qwen3_pair")), 48, (1, 2, 4, 16), max_context=200),
        sampled=Sampled(lambda m: uniform_prompts(1, 512, seed=4)[0], 24, MOE_SAMPLING, 2),
        prompt=lambda m: uniform_prompts(1, 512, seed=6)[0] + [7], replay_prompts=lambda m: uniform_prompts(2, 512, 8),
        replay_tokens=32, min_replays=2 * 32 // 16, kernel_pair="qwen3_kernel_pair",
        notes="a random block-16 drafter (drafts are almost never accepted)"),
    Family(
        "llama3.1", "llama_pair", auto_model,
        layouts=(Layout("llama3-rope, sharded", lambda d: write_target(
            d, target_config("llama", tie=False, layers=3, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}), seed=3, shards=3),
            transformers_model(transformers.LlamaForCausalLM), 90, 512, 1, ((90,), (1, 60, 29))),),
        greedy=Greedy(lambda m: uniform_prompts(8, 512, seed=len("llama_pair")), 48, (1, 2, 4, 16), max_context=200),
        sampled=Sampled(lambda m: uniform_prompts(1, 512, seed=4)[0], 24, MOE_SAMPLING, 2),
        prompt=lambda m: uniform_prompts(1, 512, seed=6)[0] + [7], replay_prompts=lambda m: uniform_prompts(2, 512, 8),
        replay_tokens=32, min_replays=2 * 32 // 16, kernel_pair=None,  # qwen3's kernels, and the rope table's
        notes="llama3 rope scaling past its original 64 positions, tied embeddings, 3 shards"),
    Family(
        "stories260K", "stories_pair", auto_model,
        layouts=(Layout("as shipped", lambda d: copy_stories(d), transformers_model(transformers.LlamaForCausalLM),
                        40, 512, 1, ((40,), (1, 4, 35), (8, 32))),),
        greedy=Greedy(lambda m: _stories(m, STORY_PROMPTS[:4]) + uniform_prompts(4, 512, 7), 48, (1, 2, 4, 8),
                      max_context=200),
        sampled=Sampled(lambda m: _stories(m, STORY_PROMPTS[1:2])[0], 40,
                        lambda seed: SamplingParams(temperature=0.8, top_p=0.95, seed=seed), 3, (2, 8)),
        prompt=lambda m: _stories(m, STORY_PROMPTS[:1])[0], replay_prompts=lambda m: _stories(m, STORY_PROMPTS[:2]),
        replay_tokens=48, min_replays=2 * 48 // 8, kernel_pair=None,  # qwen3's kernels
        notes="the trained demo pair (Llama target, block-8 drafter trained by `dflash train`)"),
    Family(
        "qwen3-moe", "qwen3_moe_pair", transformers_model(transformers.Qwen3MoeForCausalLM),
        layouts=(Layout("per-expert", lambda d: write_target(d, qwen3_moe_config(), seed=2),
                        transformers_model(transformers.Qwen3MoeForCausalLM), 29, 500, 0, MOE_LOGITS),
                 Layout("fused", lambda d: write_target(d, qwen3_moe_config(), seed=2, layout="fused"),
                        transformers_model(transformers.Qwen3MoeForCausalLM), 29, 500, 0, MOE_LOGITS)),
        greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=5), 32, (1, 2, 4, 8),
                      fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(6, 1.5)),
        sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 24, MOE_SAMPLING, 2),
        prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
        min_replays=5, kernel_pair="qwen3_moe_pair",
        notes="the Qwen3-Coder layout: 16 experts, top-4, per-expert or fused tensors; a fitted drafter"),
    Family(
        "qwen3.5", "qwen35_pair", transformers_model(transformers.Qwen3_5ForConditionalGeneration),
        layouts=(Layout("VL wrapper", lambda d: write_qwen35(d, qwen35_config(), seed=3, slow_decay=True),
                        transformers_model(transformers.Qwen3_5ForConditionalGeneration), 41, 512, 1, QWEN35_LOGITS),
                 Layout("text-only", lambda d: write_qwen35(d, qwen35_config(wrapper=False), seed=3, slow_decay=True),
                        transformers_model(transformers.Qwen3_5ForCausalLM), 41, 512, 1, QWEN35_LOGITS),
                 Layout("tied", _tied_qwen35, transformers_model(transformers.Qwen3_5ForConditionalGeneration), 41,
                        512, 1, QWEN35_LOGITS)),
        greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(2, 500, seed=99), 40, (1, 2, 4, 8),
                      fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(8, 2.0)),
        sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 32, HYBRID_SAMPLING, 3, (3, 8)),
        prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
        min_replays=5, kernel_pair="qwen35_kernel_pair", kernel_tokens=12,
        notes="Gated DeltaNet + gated attention, the released VL wrapper; a fitted Qwen3.6-style drafter"),
    Family(
        "qwen3.5-moe", "qwen35_moe_pair", transformers_model(transformers.Qwen3_5MoeForConditionalGeneration),
        # transformers' decode path, token by token (its recurrent gated delta rule, as ours): its chunked
        # prefill parts from its own decode by up to 2e-4 on these random weights.
        layouts=(Layout("VL wrapper, fused", lambda d: write_qwen35(d, qwen35_moe_config(), seed=3, layout="fused"),
                        transformers_model(transformers.Qwen3_5MoeForConditionalGeneration), 29, 500, 0, MOE_LOGITS,
                        stepwise=True),
                 Layout("text-only, per-expert", lambda d: write_qwen35(d, qwen35_moe_config(wrapper=False), seed=3),
                        transformers_model(transformers.Qwen3_5MoeForCausalLM), 29, 500, 0, MOE_LOGITS,
                        stepwise=True)),
        greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=5), 32, (1, 2, 4, 8),
                      fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(6, 1.5)),
        sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 24, MOE_SAMPLING, 2),
        prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
        min_replays=5, kernel_pair=None,  # qwen3.5's and qwen3-moe's kernels, and the shared expert's
        notes="the 35B-A3B layout: VL wrapper, fused experts and a gated shared expert; a fitted drafter"),
    Family(
        "gpt-oss", "gpt_oss_pair", gpt_oss_reference,
        layouts=(Layout("mxfp4", lambda d: write_gpt_oss(d, gpt_oss_config(), seed=2), gpt_oss_reference, 37, 256,
                        1, GPT_OSS_LOGITS),
                 Layout("dense", lambda d: write_gpt_oss(d, gpt_oss_config(mxfp4=False), seed=2), gpt_oss_reference,
                        37, 256, 1, GPT_OSS_LOGITS)),
        greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=7), 32, (1, 2, 4, 8),
                      fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(6, 1.5)),
        sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 24, MOE_SAMPLING, 2),
        prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
        min_replays=5, kernel_pair="gpt_oss_pair",
        notes="MXFP4 experts, sinks, a window of 8 (shorter than the prompts), YaRN; a drafter with biases"),
    Family(
        "gemma4", "gemma4_pair", gemma4_reference,
        layouts=(Layout("31B: gemma4 wrapper, untied", lambda d: write_gemma4(d, gemma4_config(tie=False), seed=2),
                        gemma4_reference, 29, 512, 1, GEMMA4_LOGITS),
                 Layout("12B: gemma4_unified wrapper", lambda d: write_gemma4(d, gemma4_config(unified=True), seed=2),
                        gemma4_reference, 29, 512, 1, GEMMA4_LOGITS),
                 Layout("text-only", lambda d: write_gemma4(d, gemma4_config(wrapper=False), seed=2),
                        gemma4_reference, 29, 512, 1, GEMMA4_LOGITS)),
        greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=5), 32, (1, 2, 4, 8),
                      fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(6, 1.5)),
        sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 24, MOE_SAMPLING, 2),
        prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
        min_replays=5, kernel_pair="gemma4_pair",
        notes="sliding (window 8) and global layers of two head shapes, k=v, proportional rope, soft-cap 3; "
              "a fitted drafter (sliding causal, full not) on the scaled embedding"),
    Family(
        "gemma4-moe", "gemma4_moe_pair", gemma4_reference,
        layouts=(Layout("26B-A4B: routed experts", lambda d: write_gemma4(d, gemma4_config(moe=True, tie=False),
                                                                          seed=2), gemma4_reference, 37, 512, 1,
                        ((37,), (1, 7, 29), (5, 1, 14, 17))),),  # 37 and 29 rows: its per-expert loop
        greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=5), 32, (1, 2, 4, 8),
                      fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(6, 1.5)),
        sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 24, MOE_SAMPLING, 2),
        prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
        min_replays=5, kernel_pair=None,  # gemma4's kernels (its experts run in torch)
        notes="8 experts top-2 with router scale and per-expert scale beside the GELU MLP; a fitted drafter"),
    Family(
        "dflash2", "dflash2_pair", transformers_model(transformers.Qwen3_5ForConditionalGeneration),
        layouts=(),  # the target is qwen3.5's (its logits are that case's); the drafter's math: test_dflash2.py
        greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(2, 500, seed=99), 40, (1, 2, 4, 8),
                      fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(8, 1.5)),
        sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 32, HYBRID_SAMPLING, 3, (3, 8)),
        prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
        min_replays=5, kernel_pair=None,  # qwen3.5's; its walk captured: test_dflash2.py (stand-in for CUDA)
        notes="qwen3.5's target with a fitted DFlash2 drafter (convs and the candidate selector's walk)"),
]

def _muse_defaults(directory: Path) -> Path:
    """A Muse-Glimmer config.json that leaves layer_types, layer_rope_theta and the scales to transformers' defaults."""
    cfg = muse_config(layers=5)
    for key in ("layer_types", "layer_rope_theta", "final_logit_softcapping", "qk_scale_factor", "output_multiplier",
                "post_norm_eps"):
        del cfg["text_config"][key]
    return write_muse(directory, cfg, seed=4)


MUSE = transformers_model(transformers.MuseGlimmerForConditionalGeneration)
MUSE_LOGITS = ((33,), (1, 4, 28), (7, 9, 17))  # the window of 8 crossed inside and across chunks
FAMILIES.append(Family(
    "muse-glimmer", "muse_pair", MUSE,
    layouts=(Layout("VL wrapper", lambda d: write_muse(d, muse_config(), seed=2), MUSE, 33, 512, 1, MUSE_LOGITS),
             Layout("tight soft-cap", lambda d: write_muse(d, muse_config(softcap=1.5, multiplier=1.0), seed=3), MUSE,
                    33, 512, 2, MUSE_LOGITS),
             Layout("config defaults", _muse_defaults, MUSE, 33, 512, 3, MUSE_LOGITS)),
    greedy=Greedy(lambda m: HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=5), 32, (1, 2, 4, 8),
                  fitted=tuple(map(tuple, HYBRID_PROMPTS[:3])), accepted=(6, 1.5)),
    sampled=Sampled(lambda m: HYBRID_PROMPTS[0], 24, MOE_SAMPLING, 2, (None, 3)),
    prompt=lambda m: HYBRID_PROMPTS[0], replay_prompts=lambda m: HYBRID_PROMPTS[2:3], replay_tokens=32,
    min_replays=5, kernel_pair="muse_kernel_pair",
    notes="sandwich norms, gated attention, a window of 8 with NoPE full layers, soft-capped logits; a fitted "
          "non-causal drafter in the assistant's shape"))

BY_NAME = {f.name: f for f in FAMILIES}
