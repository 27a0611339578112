"""The Qwen3.5 / 3.6 hybrid family (Gated DeltaNet + gated attention): features, exact rollback of the
recurrent state, next turns from the prefix snapshot, and its configs. (Its logits in every layout,
greedy and seeded decoding, host reads and graph replay: tests/test_conformance.py.)

The independent reference is transformers 5's own `Qwen3_5ForConditionalGeneration` /
`Qwen3_5ForCausalLM` on the same tiny checkpoint (tests/conftest.py imports it with its torch paths).
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

from dflash_cli import loader
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError
from dflash_cli.kernels.gated_delta import gated_delta_rule_ref, replay_ref
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS
from .tiny import drafter_config, qwen35_config, write_drafter, write_qwen35

TOL = dict(rtol=1e-4, atol=1e-4)


def _hf(directory, wrapper: bool = True):
    cls = Qwen3_5ForConditionalGeneration if wrapper else Qwen3_5ForCausalLM
    model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # the layout is the released one
    return model


def _prefill(model, ids: list[int], chunks: list[int] | None = None, capacity: int = 256, block: int = 8):
    """Logits of every position, the prompt fed in chunks of the given sizes (all of it by default)."""
    cache = model.target.new_cache(capacity, block)
    out, start = [], 0
    for size in chunks or [len(ids)]:
        logits, _ = model.target.forward(torch.tensor(ids[start:start + size]), cache, logits_from=0, commit=True)
        out.append(logits)
        start += size
    return torch.cat(out), cache


def test_features_are_the_outputs_of_linear_and_full_layers(tmp_path):
    d = write_qwen35(tmp_path / "t", qwen35_config(layers=5), seed=4)
    model = loader.load(d, None, device="cpu")
    ids = torch.randint(0, 512, (12,)).tolist()
    with torch.no_grad():
        hidden = _hf(d)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    cache = model.target.new_cache(64, 4)
    _, features = model.target.forward(torch.tensor(ids), cache, feature_layers=(0, 2, 3), commit=True)
    want = torch.cat([hidden[i + 1][0] for i in (0, 2, 3)], dim=-1)  # layer 3 is full attention, 0 and 2 linear
    torch.testing.assert_close(features, want, **TOL)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return loader.load(write_qwen35(tmp_path_factory.mktemp("q35") / "t", qwen35_config(), seed=5, slow_decay=True),
                       None, device="cpu")


@pytest.mark.parametrize("accepted", [0, 3, 7], ids=["none", "some", "all"])
def test_a_verify_block_rolls_back_to_exactly_the_committed_tokens(slow_model, accepted):
    """Verify B = 8 tokens, commit a + 1: the recurrent states, conv windows and the next logits equal a
    prefill from scratch of prompt + block[:a + 1]."""
    b = 8
    g = torch.Generator().manual_seed(accepted)
    prompt, block = torch.randint(0, 512, (17,), generator=g).tolist(), torch.randint(0, 512, (b,), generator=g)
    _, cache = _prefill(slow_model, prompt)
    slow_model.target.forward(block, cache, logits_from=0)
    slow_model.target.commit(cache, torch.tensor(accepted + 1))
    _, fresh = _prefill(slow_model, prompt + block[:accepted + 1].tolist())
    assert int(cache.length) == int(fresh.length) == len(prompt) + accepted + 1
    torch.testing.assert_close(cache.state, fresh.state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.conv, fresh.conv, rtol=0, atol=0)  # the same inputs, gathered
    nxt = torch.randint(0, 512, (3,), generator=g)
    got, _ = slow_model.target.forward(nxt, cache, logits_from=0, commit=True)
    want, _ = slow_model.target.forward(nxt, fresh, logits_from=0, commit=True)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.slow  # ~20 s interpreted
def test_on_the_kernel_path_a_committed_verify_block_leaves_the_decode_steps_state_bit_for_bit(qwen35_kernel_pair,
                                                                                              monkeypatch):
    """bf16, through the kernels with the batch-invariant linear layers (as on a GPU with
    DFLASH_LINEAR=invariant): verify a block, commit a + 1 of its rows (the commit replays the recorded rows),
    and every linear layer's recurrent state and conv window equal, bit for bit, those left by plain decoding
    of the same tokens one step at a time: the replay steps the state with the rule's own arithmetic."""
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    target = loader.load(qwen35_kernel_pair[0], None, device="cpu", dtype="bfloat16").target
    g = torch.Generator().manual_seed(7)
    prompt, block = torch.randint(3, 256, (6,), generator=g), torch.randint(3, 256, (4,), generator=g)
    for accepted in (1, 3):
        spec, plain = target.new_cache(32, 4), target.new_cache(32, 4)
        target.forward(prompt, spec, commit=True)
        target.forward(block, spec, logits_from=0)
        target.commit(spec, torch.tensor(accepted + 1))
        target.forward(prompt, plain, commit=True)
        for token in block[:accepted + 1]:
            target.forward(token[None], plain, logits_from=0, commit=True)
        assert int(spec.length) == int(plain.length) == len(prompt) + accepted + 1
        assert torch.equal(spec.state, plain.state), f"{accepted + 1} committed: the recurrent states differ"
        assert torch.equal(spec.conv, plain.conv), f"{accepted + 1} committed: the conv windows differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_linear_layer_on_the_glue_kernels_equals_its_torch_path(slow_model, monkeypatch, dtype):
    """A Gated DeltaNet layer with its two glue kernels (kernels/gdn_glue.py, in Triton's interpreter) against
    its torch path: a prefill chunk writes the state and conv window through, then a verify block of 5 rows
    fills the record and leaves them as they were; the outputs, states, windows and records agree."""
    from types import SimpleNamespace

    layer = next(lay.mixer for lay in slow_model.target.layers if hasattr(lay.mixer, "slot"))
    layer = type(layer)(**{**vars(layer), "conv": layer.conv.to(dtype)})  # the conv in the model's dtype
    w_in = torch.randn(layer.shape.conv_dim + layer.shape.value_dim + 2 * layer.shape.heads_v, 64,
                       generator=torch.Generator().manual_seed(0)).to(dtype)
    layer.in_proj = lambda h: h @ w_in.t()
    layer.out_proj = lambda o: o
    g = torch.Generator().manual_seed(1)
    prompt, block = torch.randn(6, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g).to(dtype)
    results = []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("DFLASH_KERNELS", mode)
        cache = slow_model.target.new_cache(32, 8)
        cache.rec.conv = cache.rec.conv.to(dtype)
        cache.rec.rec_x = cache.rec.rec_x.to(dtype)
        out = [layer(prompt, cache, SimpleNamespace(commit=True, mask=None))]
        state, conv = cache.rec.state.clone(), cache.rec.conv.clone()
        out.append(layer(block, cache, SimpleNamespace(commit=False, mask=None)))
        assert torch.equal(cache.rec.state, state) and torch.equal(cache.rec.conv, conv), mode
        rec = cache.rec
        results.append((*out, state, conv, rec.rec_x[:, :5], rec.rec_k[:, :5], rec.rec_v[:, :5], rec.rec_g[:, :5],
                        rec.rec_beta[:, :5]))
    # bf16: the torch path convolves in bf16, the kernels accumulate in fp32 (as before them): a rounding apart
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=8e-2)
    for name, a, b in zip(("prefill out", "verify out", "state", "conv", "x", "k", "v", "g", "beta"), *results):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, name=name: f"{dtype}, {name}: {m}")


def test_masked_replay_is_bit_exact():
    """Steps with g = beta = 0 leave the state bit for bit: replaying B recorded steps with the last
    B - n masked equals running only the first n."""
    g = torch.Generator().manual_seed(0)
    n_layers, b, hk, hv, dk, dv = 3, 8, 2, 4, 16, 16
    k = torch.nn.functional.normalize(torch.randn(n_layers, b, hk, dk, generator=g), dim=-1)
    v = torch.randn(n_layers, b, hv, dv, generator=g)
    decay = -torch.rand(n_layers, b, hv, generator=g)
    beta = torch.rand(n_layers, b, hv, generator=g)
    state = torch.randn(n_layers, hv, dk, dv, generator=g)
    for count in range(b + 1):
        replayed = state.clone()
        replay_ref(replayed, k, v, decay, beta, torch.tensor(count))
        _, direct = gated_delta_rule_ref(k[:, :count], k[:, :count], v[:, :count], decay[:, :count],
                                         beta[:, :count], state, 1.0)
        assert torch.equal(replayed, direct), f"count {count}"


def _tokens(engine: Engine, prompt: list[int], n: int, sampling=None, keep_prefix=None) -> tuple[list[int], list]:
    steps = list(engine.generate(Request(prompt, n, sampling=sampling or SamplingParams(), keep_prefix=keep_prefix)))
    return [t for s in steps for t in s.tokens], steps


def test_next_turns_restart_from_the_prefix_snapshot_or_from_nothing(qwen35_pair):
    """A chat's second turn shares the first prompt: restarting from the snapshot kept during the first
    prefill (never from the live state, which holds a queued iteration with lookahead) gives the tokens
    of a fresh engine; without a snapshot the prefill starts over, with the same tokens."""
    model = loader.load(*qwen35_pair, device="cpu")
    first = HYBRID_PROMPTS[1]
    for lookahead in (False, True):
        engine = Engine(model.target, model.drafter, lookahead=lookahead)
        answer, _ = _tokens(engine, first + [7, 8, 9], 12, keep_prefix=len(first))
        assert engine.target_cache.prefix[0] == len(first)
        second = first + [7, 8] + answer[:5] + [42, 43]  # diverges from the cached tokens after `first + [7, 8]`
        got, _ = _tokens(engine, second, 20)
        want, _ = _tokens(Engine(model.target, model.drafter), second, 20)
        assert got == want
        third = [1] + second  # shares nothing: the state starts from zero
        got, _ = _tokens(engine, third, 20)
        assert got == _tokens(Engine(model.target, model.drafter), third, 20)[0]


def test_a_stop_token_inside_an_accepted_block_with_lookahead(qwen35_pair):
    model = loader.load(*qwen35_pair, device="cpu")
    prompt = HYBRID_PROMPTS[0]
    plain, _ = _tokens(Engine(model.target), prompt, 40)
    _, steps = _tokens(Engine(model.target, model.drafter), prompt, 40)
    block = next(s for s in steps if not s.prefill and s.acceptance_length >= 3)
    stop = block.tokens[1]
    engine = Engine(model.target, model.drafter, lookahead=True)
    steps = list(engine.generate(Request(prompt, 40, frozenset({stop}))))
    got = [t for s in steps for t in s.tokens]
    assert got == plain[:plain.index(stop)] and steps[-1].finish == "stop"
    again, _ = _tokens(engine, prompt, 40)  # the queued iteration left nothing behind
    assert again == plain


def test_config_problems_are_one_line(tmp_path):
    cfg = qwen35_config()
    cfg["text_config"]["attn_output_gate"] = False
    d = write_qwen35(tmp_path / "gate", qwen35_config())
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DflashError, match="attn_output_gate false is not supported"):
        loader.load(d, None, device="cpu")
    cfg = qwen35_config()
    del cfg["text_config"]["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DflashError, match="missing 'num_hidden_layers'"):
        loader.load(d, None, device="cpu")


@pytest.mark.parametrize("key, value", [("output_multiplier", 0.2), ("input_embedding_scale", 2.0),
                                        ("final_logit_softcapping", 20.0)])
def test_drafter_keys_that_change_the_math_are_refused(tmp_path, key, value):
    cfg = qwen35_config()
    t = write_qwen35(tmp_path / "t", cfg)
    dcfg = drafter_config(cfg["text_config"], target_layer_ids=(1, 3), mask_token_id=500)
    d = write_drafter(tmp_path / "d", dcfg)
    (d / "config.json").write_text(json.dumps(dcfg | {"dflash_config": dcfg["dflash_config"] | {key: value}}))
    with pytest.raises(DflashError, match=f"'{key}' = {value} changes the drafter's math"):
        loader.load(t, d, device="cpu")
    (d / "config.json").write_text(json.dumps(dcfg | {"architectures": ["DSparkDraftModel"]}))
    with pytest.raises(DflashError, match=r"drafter architecture DSparkDraftModel \(DSpark: .*\) is not supported"):
        loader.load(t, d, device="cpu")


def test_sliding_draft_layers_are_causal_in_the_block_unless_the_config_says_otherwise(tmp_path):
    from dflash_cli.config import DrafterConfig

    cfg = qwen35_config()["text_config"]
    base = drafter_config(cfg, layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    for extra, want in (({}, (True, False)), ({"is_causal": False}, (False, False)),
                        ({"dflash_config": base["dflash_config"] | {"causal": True}}, (True, True))):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps(base | extra))
        assert DrafterConfig.from_dir(d).causal == want, extra
