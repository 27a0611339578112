"""Muse-Glimmer-30B: the target's details that its conformance case (tests/families.py) does not isolate, its
two drafters (the DFlash2 drafter and Meta's v1 assistant head) and its registry row.

The target's logits, verify rows, greedy and seeded-sampling equality with a fitted drafter, host reads and
replays are tests/test_conformance.py's `muse-glimmer` case."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from dflash_cli import loader, registry
from dflash_cli.config import DrafterConfig
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError
from dflash_cli.models import target_config
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS
from .dflash2_fit import as_dflash2, identity_init
from .tiny import save_weights
from .tiny_muse import muse_config, write_assistant, write_muse


def _tokens(engine: Engine, prompt: list[int], n: int, sampling: SamplingParams | None = None) -> list[int]:
    return [t for s in engine.generate(Request(prompt, n, sampling=sampling or SamplingParams())) for t in s.tokens]


def test_each_detail_of_the_target_is_needed_for_transformers_logits(tmp_path):
    """The per-layer rope (NoPE full layers), the soft-cap, the output multiplier and the sandwich norms'
    epsilon each move the logits away from transformers' (the conformance case holds them all equal)."""
    import transformers

    d = write_muse(tmp_path / "t", muse_config(softcap=1.5, multiplier=0.7, layers=4), seed=5)
    hf = transformers.MuseGlimmerForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]

    def logits(model) -> torch.Tensor:
        return model.target.forward(ids, model.target.new_cache(64), logits_from=0, commit=True)[0]

    model = loader.load(d, None, device="cpu")
    torch.testing.assert_close(logits(model), want, rtol=1e-4, atol=1e-4)
    _, feats = model.target.forward(ids, model.target.new_cache(64), feature_layers=(0, 2), commit=True)
    with torch.no_grad():  # a drafter's features: the residual stream after each layer, HF's hidden_states[i + 1]
        states = hf(ids[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats, torch.cat((states[1][0], states[3][0]), -1), rtol=1e-4, atol=1e-4)
    wrong = []
    nope = loader.load(d, None, device="cpu")
    for layer in nope.target.layers:
        layer.mixer.inner.cos_sin = None  # every layer rotated with the global θ
    wrong.append(nope)
    uncapped = loader.load(d, None, device="cpu")
    uncapped.target.cfg = replace(uncapped.target.cfg, logit_softcap=None)
    wrong.append(uncapped)
    unscaled = loader.load(d, None, device="cpu")
    unscaled.target.head.multiplier = 1.0
    wrong.append(unscaled)
    embedded = loader.load(d, None, device="cpu")
    embedded.target.unit = embedded.target.unit * 2  # the embedding's norm carries no weight
    wrong.append(embedded)
    for i, model in enumerate(wrong):
        assert not torch.allclose(logits(model), want, rtol=1e-4, atol=1e-4), i


def test_config_checks_refuse_what_is_not_implemented(tmp_path):
    cfg = muse_config()
    text = cfg["text_config"]
    for change, message in (
            ({"layer_rope_theta": [5000.0] * 7 + [0]}, "layer_rope_theta gives 5000"),
            ({"attention_bias": True}, "attention biases are not supported"),
            ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
            ({"layer_types": ["sliding_attention"] * 3}, "one entry for each of the 8 layers")):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg | {"text_config": text | change}))
        with pytest.raises(DflashError, match=message):
            target_config(d)
    d = tmp_path / "flat"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(text | {"model_type": "muse_glimmer"}))
    with pytest.raises(DflashError, match="keeps its text model under 'text_config'"):
        target_config(d)


# ---- Meta's v1 assistant head ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assistant_pair(muse_pair, tmp_path_factory):
    """muse_pair's fitted drafter written in Meta's assistant layout (top-level keys, two renamed tensors)."""
    t, d = muse_pair
    target_cfg = json.loads((t / "config.json").read_text())
    return t, d, write_assistant(tmp_path_factory.mktemp("assistant") / "a", d, target_cfg)


def test_the_assistant_config_reads_as_a_non_causal_v1_drafter(assistant_pair):
    _, native, assistant = assistant_pair
    cfg, want = DrafterConfig.from_dir(assistant), DrafterConfig.from_dir(native)
    assert cfg.causal == (False, False) and cfg.renames
    assert replace(cfg, renames=()) == want
    raw = json.loads((assistant / "config.json").read_text())
    del raw["target_layer_ids"], raw["block_size"], raw["rope_parameters"]
    defaults = DrafterConfig.from_raw(raw, assistant)  # MuseGlimmerAssistantConfig's defaults fill them
    assert (defaults.target_layer_ids, defaults.block_size, defaults.rope_theta) == ((1, 13, 25, 37, 49), 16, 500000.0)


def test_the_assistant_head_computes_what_transformers_computes(assistant_pair):
    """Our drafter loaded from the assistant checkpoint gives transformers' MuseGlimmerAssistantModel's final
    hidden states for the block rows: its renamed tensors, its non-causal block, the raw (un-normed) target
    embedding of the block. The context (8 tokens) and the block fill its window of 16 exactly: past the window
    transformers 5.25 does not apply it when the context comes in the same call (its mask is built over the
    block's rows only), where vLLM and our drafter do, as for every sliding DFlash layer."""
    import transformers

    t, _, assistant = assistant_pair
    model = loader.load(t, assistant, device="cpu")
    hf, info = transformers.MuseGlimmerAssistantModel.from_pretrained(assistant, dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    drafter, target = model.drafter, model.target
    ids = torch.randint(0, 500, (14,), generator=torch.Generator().manual_seed(0))
    n, b = 8, drafter.cfg.block_size
    _, feats = target.forward(ids[:n], target.new_cache(64), feature_layers=drafter.cfg.target_layer_ids, commit=True)
    cache = drafter.new_cache(64)
    drafter.add_context(feats, cache)
    got = drafter.block_hidden(ids[n:n + 1], cache, b)
    noise = torch.nn.functional.embedding(torch.cat((ids[n:n + 1], drafter.mask_ids)), target.embed)
    with torch.no_grad():
        want = hf.eval()(noise_embeds=noise[None], context_hidden_states=feats[None],
                         position_ids=torch.arange(n + b)[None]).last_hidden_state[0, 1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_greedy_with_the_assistant_head_equals_plain_decoding_and_drafts_are_accepted(assistant_pair):
    t, native, assistant = assistant_pair
    model = loader.load(t, assistant, device="cpu")
    original = loader.load(t, native, device="cpu")
    taus = []
    for prompt in HYBRID_PROMPTS[:3:2]:  # fitted greedily
        plain = _tokens(Engine(model.target), prompt, 24)
        for b in (2, 4, 8):
            steps = list(Engine(model.target, model.drafter, block_size=b).generate(Request(prompt, 24)))
            assert [x for s in steps for x in s.tokens] == plain, b
            taus += [s.acceptance_length for s in steps if not s.prefill and b == 8]
    for name in ("fc", "hidden_norm", "norm", "w_kv"):  # the renamed tensors and the rest, as the original's
        assert torch.equal(getattr(model.drafter, name), getattr(original.drafter, name)), name
    assert max(taus) >= 6 and sum(taus) / len(taus) > 3, taus


# ---- the DFlash2 drafter -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dflash2_muse_pair(muse_pair, tmp_path_factory):
    """A DFlash2 drafter in the released Muse-Glimmer-30B-DFlash2 layout (non-causal sliding layers, the target's
    output multiplier and soft-cap in dflash_config), identity-initialised from the fitted v1 drafter (its
    drafts are the v1 drafter's, so they are accepted) with its selector codebooks perturbed."""
    from safetensors.torch import load_file

    t, v1 = muse_pair
    cfg = as_dflash2(json.loads((v1 / "config.json").read_text()))
    text = json.loads((t / "config.json").read_text())["text_config"]
    cfg["dflash_config"] |= {"output_multiplier": text["output_multiplier"],
                             "final_logit_softcapping": text["final_logit_softcapping"]}
    cfg["vocab_size"] = text["vocab_size"]
    d = tmp_path_factory.mktemp("dflash2") / "d"
    d.mkdir()
    w = identity_init(DrafterConfig.from_raw(cfg, d), load_file(str(v1 / "model.safetensors")))
    g = torch.Generator().manual_seed(0)
    for name in ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook"):
        w[name] = 0.05 * torch.randn(w[name].shape, generator=g)
    save_weights(d, w)
    (d / "config.json").write_text(json.dumps(cfg))
    return t, d


def test_the_dflash2_drafter_is_lossless_and_accepted(dflash2_muse_pair):
    t, d = dflash2_muse_pair
    model = loader.load(t, d, device="cpu")
    assert model.drafter.selector is not None and model.drafter.cfg.final_logit_softcapping == 20.0
    taus = []
    for prompt in HYBRID_PROMPTS[:3:2]:
        plain = _tokens(Engine(model.target), prompt, 24)
        for b in (1, 2, 4, 8):
            steps = list(Engine(model.target, model.drafter, block_size=b).generate(Request(prompt, 24)))
            assert [x for s in steps for x in s.tokens] == plain, b
            taus += [s.acceptance_length for s in steps if not s.prefill and b == 8]
    assert max(taus) >= 6 and sum(taus) / len(taus) > 3, taus
    sampling = SamplingParams(temperature=0.8, top_k=40, seed=3)
    assert _tokens(Engine(model.target, model.drafter), HYBRID_PROMPTS[0], 24, sampling) == \
        _tokens(Engine(model.target), HYBRID_PROMPTS[0], 24, sampling)


# ---- the registry row ------------------------------------------------------------------------------------------
def test_the_registry_row_runs_here_with_thinking_on():
    pair = registry.resolve("muse-glimmer-30b")
    assert pair.supported and pair.think and pair.gpus == 1 and not pair.note
    assert (pair.target, pair.drafter, pair.block_size) == ("meta-models/Muse-Glimmer-30B",
                                                            "z-lab/Muse-Glimmer-30B-DFlash2", 16)
