"""Gemma 4 beyond the conformance checks (tests/families.py runs those): its rope, its two K/V shapes,
its config boundary, the two details of its DFlash drafters (the scaled embedding, the soft-capped
logits), the registry rows and the serve hand-off."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from dflash_cli import loader
from dflash_cli.config import DrafterConfig
from dflash_cli.drafter import Drafter
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError
from dflash_cli.formats import AnswerDelta
from dflash_cli.models import target_config
from dflash_cli.rope import inv_frequencies

from .conftest import HYBRID_PROMPTS
from .tiny_gemma4 import gemma4_config, gemma4_text, write_gemma4


def test_the_proportional_rope_is_transformers():
    """Global layers: the first quarter of the 16 pairs of a 32-dim head rotate at θ^(-2i/32), the rest not."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    text = {k: v for k, v in gemma4_text().items() if k not in ("model_type", "torch_dtype")}
    hf = Gemma4TextRotaryEmbedding(Gemma4TextConfig(**text))
    for kind, dim in (("full_attention", 32), ("sliding_attention", 16)):
        params = text["rope_parameters"][kind]
        ours, factor = inv_frequencies(dim, params["rope_theta"], params if params["rope_type"] != "default" else None)
        torch.testing.assert_close(ours, getattr(hf, f"{kind}_inv_freq"), rtol=0, atol=0)
        assert factor == 1.0
    assert (ours := inv_frequencies(32, 1e6, text["rope_parameters"]["full_attention"])[0])[4:].eq(0).all()
    assert ours[:4].gt(0).all()


def test_two_kv_shapes_live_in_one_cache_and_the_memory_plan_counts_both(tmp_path):
    d = write_gemma4(tmp_path / "t", gemma4_config(layers=4))
    family, cfg = target_config(d)
    model = loader.load(d, None, device="cpu")
    cache = model.target.new_cache(64)
    assert [tuple(k.shape) for k in cache.k] == [(2, 2, 64, 16), (2, 1, 64, 32)]  # sliding; global: 1 head of 32
    assert cache.layer(2)[0].shape == (1, 64, 32) and cache.layer(1)[0].shape == (2, 64, 16)
    per_token, fixed = family.cache_bytes(cfg, torch.float32, 8)
    assert per_token * 64 + fixed == cache.nbytes()


@pytest.mark.parametrize("change, message", [
    ({"hidden_size_per_layer_input": 256}, "'hidden_size_per_layer_input' = 256"),
    ({"hidden_size_per_layer_input": None}, None),  # absent from a gemma4_text config: transformers' 256
    ({"num_kv_shared_layers": 2}, "'num_kv_shared_layers' = 2"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention 'all'"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
    ({"attention_bias": True}, "attention biases"),
])
def test_what_gemma4_settings_dflash_does_not_run_are_refused_by_name(tmp_path, change, message):
    cfg = gemma4_config()
    d = write_gemma4(tmp_path / "t", cfg)
    text = dict(cfg["text_config"], **change)
    if change.get("hidden_size_per_layer_input", 0) is None:
        del text["hidden_size_per_layer_input"]
        message = "'hidden_size_per_layer_input' = 256"
    (d / "config.json").write_text(json.dumps(cfg | {"text_config": text}))
    with pytest.raises(DflashError, match=message):
        loader.load(d, None, device="cpu")


def _tokens_per_step(engine: Engine, prompts) -> float:
    """Mean tokens each speculative step commits (the prefill's first token left out)."""
    steps = [len(s.tokens) for p in prompts for s in list(engine.generate(Request(list(p), 32)))[1:]]
    return sum(steps) / len(steps)


@pytest.fixture(scope="module")
def gemma4_model(gemma4_pair):
    return loader.load(*gemma4_pair, device="cpu")


def test_the_drafter_embeds_the_block_as_the_target_does_and_soft_caps_its_logits(gemma4_model):
    """The loaded drafter takes √hidden and the cap from its target; its sliding layer is causal, its full not."""
    cfg = gemma4_model.drafter.cfg
    assert cfg.input_embedding_scale == 64**0.5 == gemma4_model.target.embed_scale
    assert cfg.final_logit_softcapping == 3.0 == gemma4_model.target.cfg.logit_softcap
    assert cfg.causal == (True, False)


def test_a_fitted_drafter_is_accepted_only_with_the_scaled_embedding(gemma4_pair, gemma4_model):
    """The drafter was fitted on √hidden-scaled block embeddings (as z-lab's are): given the raw table
    (vLLM's bug) its drafts are rejected."""
    target = gemma4_model.target
    scaled = _tokens_per_step(Engine(target, gemma4_model.drafter, max_context=200), HYBRID_PROMPTS[:3])
    raw = dataclasses.replace(gemma4_model.drafter.cfg, input_embedding_scale=1.0)
    unscaled = Drafter.load(gemma4_pair[1], raw, target.embed, target.lm_head, 256)
    plain = _tokens_per_step(Engine(target, unscaled, max_context=200), HYBRID_PROMPTS[:3])
    assert scaled > 2.0 and plain < 1.5, (scaled, plain)


def test_draft_logits_are_the_heads_soft_capped(gemma4_model):
    drafter, target = gemma4_model.drafter, gemma4_model.target
    cache = drafter.new_cache(64)
    ids = torch.tensor(HYBRID_PROMPTS[0])
    _, features = target.forward(ids, target.new_cache(64), feature_layers=drafter.cfg.target_layer_ids, commit=True)
    drafter.add_context(features, cache)
    bonus = ids[-1:]
    logits = drafter.draft_logits(bonus, cache, 8)
    raw = F.linear(drafter.block_hidden(bonus, cache, 8), drafter.lm_head)
    torch.testing.assert_close(logits, 3.0 * torch.tanh(raw / 3.0))
    assert raw.abs().max() > 3.0 >= logits.abs().max()  # the cap bites on this model


def test_a_drafter_restating_another_soft_cap_is_refused(tmp_path, gemma4_pair):
    t, d = gemma4_pair
    other = tmp_path / "d"
    other.mkdir()
    for f in d.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"final_logit_softcapping": 30.0}))
    with pytest.raises(DflashError, match="'final_logit_softcapping' = 30.0 changes the drafter's math"):
        loader.load(t, other, device="cpu")
    assert DrafterConfig.from_dir(d).final_logit_softcapping == 3.0  # its own restated cap: read, then checked


def test_the_registry_rows_and_their_hand_off():
    from dflash_cli import registry
    from dflash_cli.handoff import Pair, launch_command

    rows = {a: registry.resolve(a) for a in ("gemma-4-12b", "gemma-4-31b", "gemma-4-26b-a4b")}
    assert [(p.target, p.drafter, p.kind, p.think, p.gpus) for p in rows.values()] == [
        ("google/gemma-4-12B-it", "z-lab/gemma4-12B-it-DFlash", "dense", False, 1),
        ("google/gemma-4-31B-it", "z-lab/gemma-4-31B-it-DFlash", "dense", False, 1),
        ("google/gemma-4-26B-A4B-it", "z-lab/gemma-4-26B-A4B-it-DFlash", "moe", False, 1)]
    p = rows["gemma-4-31b"]
    pair = Pair(p.alias, p.target, p.drafter, p.block_size, p.kind, p.gpus)
    vllm = launch_command("vllm", pair).argv
    sglang = launch_command("sglang", pair).argv
    assert "--attention-backend" not in vllm  # FlashAttention takes no 512-dim heads: vLLM picks
    assert sglang[sglang.index("--attention-backend") + 1] == "triton"


def _run(model, block: int | None, sampling, n: int = 12) -> list[int]:
    engine = Engine(model.target, model.drafter if block else None, block_size=block)
    return [t for s in engine.generate(Request(list(HYBRID_PROMPTS[0]), n, sampling=sampling)) for t in s.tokens]


@pytest.mark.slow
def test_the_interpreted_kernels_give_the_reference_tokens_eagerly_and_captured(gemma4_pair, monkeypatch):
    """Triton's interpreter (DFLASH_KERNELS=triton): greedy speculative tokens at block 4 = the torch path's
    plain ones, eagerly and captured once then replayed under the stand-in for CUDA; seeded sampling with
    speculation = plain decoding with the same seed."""
    from dflash_cli.sampling import SamplingParams

    from .fake_cuda import stand_in

    model = loader.load(*gemma4_pair, device="cpu")
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8, top_k=40, seed=3)
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    want_greedy, want_sampled = _run(model, None, greedy), _run(model, None, sampled)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    assert _run(model, 4, greedy) == want_greedy
    assert _run(model, 4, sampled) == want_sampled
    with stand_in(kernels="triton") as fake:
        gpu = loader.load(*gemma4_pair, device="cuda", dtype="float32")
        engine = Engine(gpu.target, gpu.drafter, block_size=4)
        assert engine.graphs.enabled
        assert [t for s in engine.generate(Request(list(HYBRID_PROMPTS[0]), 12)) for t in s.tokens] == want_greedy
        assert engine.graphs.enabled and fake.captures == 1


# ---- the chat format -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma4_tokenizer(tmp_path_factory):
    from .tiny_gemma4 import write_gemma4_tokenizer

    d = tmp_path_factory.mktemp("gemma4-tokenizer")
    write_gemma4_tokenizer(d)
    return loader.load_tokenizer(d)


def _answer(fmt, tokenizer, prompt, text: str, stop_strings=(), one_by_one: bool = False):
    parser = fmt.parser(tokenizer, prompt, stop_strings)
    ids = tokenizer.encode(text, add_special_tokens=False)
    delta = sum((parser.push([t]) for t in ids), start=AnswerDelta()) if one_by_one else parser.push(ids)
    return delta + parser.finish("stop"), parser


def test_the_thought_channel_is_reasoning_and_the_format_is_detected(gemma4_tokenizer):
    from dflash_cli.formats import detect

    fmt = detect(gemma4_tokenizer)
    assert fmt.name == "gemma4"
    messages = [{"role": "user", "content": "2+2?"}]
    on = fmt.render(gemma4_tokenizer, messages, thinking=True)
    assert gemma4_tokenizer.decode(on.ids).startswith("<bos><|turn>system\n<|think|><turn|>")
    answer = "<|channel>thought\nTwo and two.<channel|>It is 4."
    for one_by_one in (False, True):  # streamed token by token, the same split
        delta, _ = _answer(fmt, gemma4_tokenizer, on, answer, one_by_one=one_by_one)
        assert (delta.reasoning, delta.content, delta.tool_call) == ("Two and two.", "It is 4.", None)
    off = fmt.render(gemma4_tokenizer, messages, thinking=False)
    assert "<|think|>" not in gemma4_tokenizer.decode(off.ids) and not off.opens_think
    delta, _ = _answer(fmt, gemma4_tokenizer, off, "It is 4.")
    assert (delta.reasoning, delta.content) == ("", "It is 4.")


def test_a_tool_call_is_read_into_json_arguments(gemma4_tokenizer):
    from dflash_cli.formats import detect

    fmt = detect(gemma4_tokenizer)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    prompt = fmt.render(gemma4_tokenizer, [{"role": "user", "content": "Weather?"}], thinking=True, tools=tools)
    assert "<|tool>declaration:get_weather<tool|>" in gemma4_tokenizer.decode(prompt.ids)
    text = ('<|channel>thought\nAsk the tool.<channel|><|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,'
            'days:2,units:[<|"|>C<|"|>],ok:true}<tool_call|>')
    delta, _ = _answer(fmt, gemma4_tokenizer, prompt, text, one_by_one=True)
    assert delta.reasoning == "Ask the tool." and delta.content == ""
    assert delta.tool_call.name == "get_weather"
    assert json.loads(delta.tool_call.arguments) == {"city": "Paris, FR", "days": 2, "units": ["C"], "ok": True}


def test_a_stop_string_in_the_reply_ends_the_answer_there(gemma4_tokenizer):
    from dflash_cli.formats import detect

    fmt = detect(gemma4_tokenizer)
    prompt = fmt.render(gemma4_tokenizer, [{"role": "user", "content": "Count"}], thinking=True)
    delta, parser = _answer(fmt, gemma4_tokenizer, prompt, "<|channel>thought\nok<channel|>one two STOP three",
                            stop_strings=("STOP",))
    assert parser.stopped and delta.content == "one two " and delta.reasoning == "ok"
    kept = gemma4_tokenizer.encode("<|channel>thought\nok<channel|>one two ", add_special_tokens=False)
    assert parser.tokens_kept() == len(kept)


def test_a_path_commit_gathers_the_rows_of_every_kv_group():
    """A tree verify's accepted path (rows 0, 2, 3 of a 4-row block) lands in place in both shapes' K/V."""
    from dflash_cli.cache import CommitPlan, GroupedKVCache

    cache = GroupedKVCache.allocate_groups([(2, 4), (1, 8), (2, 4)], 16, torch.float32, torch.device("cpu"))
    assert [tuple(k.shape) for k in cache.k] == [(2, 2, 16, 4), (1, 1, 16, 8)] and cache.slots[2] == (0, 1)
    cache.length.fill_(5)
    for k, v in zip(cache.k, cache.v):
        rows = torch.arange(4, dtype=torch.float32)[:, None].expand(4, k.shape[-1])
        k[:, :, 5:9], v[:, :, 5:9] = rows, -rows
    cache.commit(CommitPlan(3, torch.tensor([0, 2, 3])))
    assert int(cache.length) == 8
    for i in range(3):
        k, v = cache.layer(i)
        assert k[:, 5:8, 0].eq(torch.tensor([0.0, 2.0, 3.0])).all() and v[:, 5:8, 0].eq(-k[:, 5:8, 0]).all()


def test_the_released_shapes_pair_and_their_cache_holds_both_geometries():
    """The synthetic 31B (the released config's numbers): 50 sliding layers of 16 KV heads × 256 and 10
    global ones of 4 × 512 in the memory plan; its drafter's six taps fit the target."""
    from dflash_cli.synthetic import configs

    family, target, drafter, _ = configs("gemma-4-31b")
    drafter.check_against(target, "gemma-4-31b")
    assert target.layer_types.count("full_attention") == 10 and target.layer_types[-1] == "full_attention"
    assert family.cache_bytes(target, torch.bfloat16, 16) == ((50 * 16 * 256 + 10 * 4 * 512) * 2 * 2, 0)
    assert (target.k_eq_v, target.sliding_window, target.logit_softcap) == (True, 1024, 30.0)
    assert drafter.causal == (True, True, True, True, False)


@pytest.mark.parametrize("variant", [dict(tie=False, hidden=48), dict(unified=True), dict(moe=True, tie=False)],
                         ids=["31B", "12B", "26B-A4B"])
def test_bf16_logits_are_transformers_bit_for_bit(tmp_path, variant):
    """A bf16 checkpoint in bf16 (hidden 48: √48 rounds to 6.9375, as the embedding scale must): our norms (the fp32 weight applied before one rounding), the rope, the
    k = v values and their norm, the layer scalar, the soft-cap and the experts (weighted and summed in fp32,
    as transformers' grouped_mm does; a 33-row chunk takes the per-expert loop) round exactly as
    transformers' in bf16."""
    import transformers
    from safetensors.torch import load_file

    from .tiny import save_weights

    d = write_gemma4(tmp_path / "t", gemma4_config(**variant), seed=1)
    save_weights(d, {k: v.to(torch.bfloat16) for k, v in load_file(str(d / "model.safetensors")).items()})
    cls = getattr(transformers, json.loads((d / "config.json").read_text())["architectures"][0])
    ids = torch.randint(0, 511, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = cls.from_pretrained(d, dtype=torch.bfloat16).eval()(ids[None]).logits[0]
    target = loader.load(d, None, device="cpu", dtype="bfloat16").target
    cache = target.new_cache(64)
    got = torch.cat([target.forward(c, cache, logits_from=0, commit=True)[0] for c in (ids[:33], ids[33:34], ids[34:])])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
