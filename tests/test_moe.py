"""Mixture-of-experts targets: Qwen3-MoE (Qwen3-Coder-30B-A3B's layout) and the Qwen3.5-MoE hybrid
(35B-A3B's): transformers' logits in both expert layouts, and lossless speculative decoding with a
drafter that is accepted. The reference is transformers' own Qwen3MoeForCausalLM /
Qwen3_5MoeForConditionalGeneration on the same tiny checkpoint."""
from __future__ import annotations

import pytest
import torch
import transformers

from dflash_cli import loader
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS, random_prompts
from .tiny import qwen3_moe_config, qwen35_moe_config, write_qwen35, write_target

TOL = dict(rtol=1e-4, atol=1e-4)
CASES = {
    "qwen3-moe, per-expert": (lambda d: write_target(d, qwen3_moe_config(), seed=2), transformers.Qwen3MoeForCausalLM),
    "qwen3-moe, fused": (lambda d: write_target(d, qwen3_moe_config(), seed=2, layout="fused"),
                         transformers.Qwen3MoeForCausalLM),
    "qwen3.5-moe, VL wrapper, fused": (lambda d: write_qwen35(d, qwen35_moe_config(), seed=3, layout="fused"),
                                       transformers.Qwen3_5MoeForConditionalGeneration),
    "qwen3.5-moe, text-only, per-expert": (lambda d: write_qwen35(d, qwen35_moe_config(wrapper=False), seed=3),
                                           transformers.Qwen3_5MoeForCausalLM),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_in_both_expert_layouts(tmp_path, case):
    build, cls = CASES[case]
    d = build(tmp_path / "t")
    model = loader.load(d, None, device="cpu")
    hf, info = cls.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 500, (29,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if "qwen3.5" in case:
            # transformers' decode path, token by token (its recurrent gated delta rule, as ours): its
            # chunked prefill parts from its own decode by up to 2e-4 on these random weights.
            out = hf(ids[None, :1], use_cache=True)
            rows = [out.logits[0, -1]]
            for i in range(1, len(ids)):
                out = hf(ids[None, i:i + 1], cache=out.past_key_values, use_cache=True)
                rows.append(out.logits[0, -1])
            want = torch.stack(rows)
        else:
            want = hf(ids[None]).logits[0]
    for chunks in ([29], [1, 8, 20]):
        cache, got, start = model.target.new_cache(64, 8), [], 0
        for size in chunks:
            logits, _ = model.target.forward(ids[start:start + size], cache, logits_from=0, commit=True)
            got.append(logits)
            start += size
        torch.testing.assert_close(torch.cat(got), want, **TOL, msg=f"{case}, chunks {chunks}")


@pytest.mark.parametrize("pair_name", ["qwen3_moe_pair", "qwen35_moe_pair"])
def test_greedy_speculative_output_equals_transformers_generate(pair_name, request):
    target, drafter = request.getfixturevalue(pair_name)
    model = loader.load(target, drafter, device="cpu")
    cls = transformers.Qwen3MoeForCausalLM if pair_name == "qwen3_moe_pair" else \
        transformers.Qwen3_5MoeForConditionalGeneration
    hf = cls.from_pretrained(target, dtype=torch.float32)
    taus = []
    for prompt in HYBRID_PROMPTS[:3] + random_prompts(1, 500, seed=5):
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        for b in (1, 2, 4, 8):
            steps = list(Engine(model.target, model.drafter, block_size=b).generate(Request(prompt, 32)))
            assert [t for s in steps for t in s.tokens] == want, f"block size {b}, prompt {prompt}"
            if b == 8 and prompt in HYBRID_PROMPTS:
                taus += [s.acceptance_length for s in steps if not s.prefill]
    assert max(taus) >= 6 and sum(taus) / len(taus) > 1.5, taus  # drafts really are accepted


@pytest.mark.parametrize("pair_name", ["qwen3_moe_pair", "qwen35_moe_pair"])
def test_seeded_sampling_equals_plain_decoding(pair_name, request):
    model = loader.load(*request.getfixturevalue(pair_name), device="cpu")
    for seed in range(2):
        sampling = SamplingParams(temperature=0.8, top_k=40, seed=seed)
        want = [t for s in Engine(model.target).generate(Request(HYBRID_PROMPTS[0], 24, sampling=sampling))
                for t in s.tokens]
        got = [t for s in Engine(model.target, model.drafter).generate(Request(HYBRID_PROMPTS[0], 24, sampling=sampling))
               for t in s.tokens]
        assert got == want, f"seed {seed}"


def test_the_moe_step_never_reads_back_to_the_host(qwen3_moe_pair, monkeypatch):
    """Through the Triton kernels (interpreted here), as a CUDA graph captures the step: routing, the
    expert sort and the slot table are device ops with fixed shapes."""
    from dflash_cli import ops

    from .host_reads import HostReads
    from .test_graph_safety import attention_masked_on_device

    monkeypatch.setattr(ops, "attention", attention_masked_on_device)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    model = loader.load(*qwen3_moe_pair, device="cpu")
    engine = Engine(model.target, model.drafter)
    steps = engine.generate(Request(HYBRID_PROMPTS[0], 16))
    next(steps)
    with torch.inference_mode(), HostReads() as reads:
        engine._device_step(SamplingParams().mode)(torch.tensor([5]))
    assert reads.seen == []
    steps.close()
