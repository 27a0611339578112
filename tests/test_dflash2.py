"""DFlash2 drafters (research/dflash2.md §1): the released layout, the math against a reference written
from the brief, the identity-initialised equivalence with v1, and lossless decoding of a tiny Qwen3.5
hybrid target with a fitted DFlash2 drafter (greedy = transformers' generate, seeded sampling = plain, host
reads and graph replay: tests/test_conformance.py).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dflash_cli import loader
from dflash_cli.cli import main
from dflash_cli.config import DrafterConfig
from dflash_cli.dflash2 import CandidateSelector, dynamic_conv
from dflash_cli.drafter import Drafter, weight_table
from dflash_cli.engine import Engine, Request
from dflash_cli.errors import DflashError
from dflash_cli.sampling import SamplingParams

from .conftest import HYBRID_PROMPTS, random_prompts
from .dflash2_fit import as_dflash2, identity_init
from .test_drafter import _rms, _rope
from .tiny import dflash2_config, qwen35_config, save_weights, write_drafter, write_qwen35

# z-lab/dflash tests/fixtures/dflash2-config.json (Muse-Glimmer-30B-DFlash2, 1326 bytes), verbatim.
MUSE_DFLASH2 = {
    "architectures": ["DFlash2DraftModel"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 200000,
    "is_causal": False,
    "dflash_config": {"block_size": 16, "conv_group_size": 16, "conv_kernel_size": 2, "final_logit_softcapping": 20.0,
                      "mask_token_id": 201818, "output_multiplier": 0.19611613513818404, "selector_rank": 256,
                      "selector_top_k": 16, "target_layer_ids": [1, 13, 25, 37, 49]},
    "dtype": "bfloat16", "eos_token_id": 200001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 6656,
    "initializer_range": 0.02, "intermediate_size": 19968, "layer_types": ["sliding_attention"] * 5,
    "max_position_embeddings": 131072, "max_window_layers": 5, "model_type": "qwen3", "num_attention_heads": 32,
    "num_hidden_layers": 5, "num_key_value_heads": 8, "num_target_layers": 52, "pad_token_id": 200018,
    "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "sliding_window": 2048, "tie_word_embeddings": False, "transformers_version": "5.15.0", "use_cache": False,
    "use_sliding_window": True, "vocab_size": 202048,
}


def test_the_released_config_and_weight_layout(tmp_path):
    """Muse-Glimmer-30B-DFlash2's config gives the tensors of its published safetensors header: 81 of
    them, the codebooks without a `.weight` suffix (shapes from z-lab's dflash2-safetensors-header)."""
    cfg = DrafterConfig.from_raw(MUSE_DFLASH2, tmp_path)
    assert (cfg.block_size, cfg.mask_token_id, cfg.target_layer_ids) == (16, 201818, (1, 13, 25, 37, 49))
    assert cfg.causal == (False,) * 5 and cfg.sliding_windows == (2048,) * 5
    assert (cfg.output_multiplier, cfg.final_logit_softcapping, cfg.input_embedding_scale) == (0.19611613513818404,
                                                                                              20.0, 1.0)
    shapes = {w.name: w.shape for w in weight_table(cfg)}
    assert len(shapes) == 81
    for i in range(5):
        for conv in ("attention_conv", "mlp_conv"):
            assert shapes[f"layers.{i}.{conv}.base_kernel"] == (2, 2, 6656)
            assert shapes[f"layers.{i}.{conv}.kernel_projection.weight"] == (1664, 6656)
    assert shapes["candidate_selector.hidden_projection.weight"] == (256, 6656)
    assert shapes["candidate_selector.predecessor_codebook"] == shapes["candidate_selector.successor_codebook"] \
        == (202048, 256)
    assert shapes["fc.weight"] == (6656, 33280)


# ---- the math, from research/dflash2.md §1.3-1.5, without the engine's code -------------------------------
def naive_conv(z, base, dynamic, group_size):
    """conv(z)[t, c] = Σ_o (base[o, c] + dynamic[t, o, c // gs]) · z[t - o, c], zeros before row 0."""
    out = torch.zeros_like(z)
    for t in range(z.shape[0]):
        for o in range(base.shape[0]):
            if t - o >= 0:
                out[t] += (base[o] + dynamic[t, o].repeat_interleave(group_size)) * z[t - o]
    return out


def naive_attention(h, ctx, w, p, cfg, layer, n):
    """Uncached: K/V of [context ; block] recomputed; visibility as in the newest reference's mask."""
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    b = h.shape[0]
    q = _rms((h @ w[p + "self_attn.q_proj.weight"].T).view(b, hq, d), w[p + "self_attn.q_norm.weight"])
    both = torch.cat((ctx, h))
    k = _rms((both @ w[p + "self_attn.k_proj.weight"].T).view(n + b, hkv, d), w[p + "self_attn.k_norm.weight"])
    v = (both @ w[p + "self_attn.v_proj.weight"].T).view(n + b, hkv, d)
    pos = torch.arange(n + b)
    theta = cfg["rope_parameters"]["rope_theta"]
    q, k = _rope(q, pos[n:], theta), _rope(k, pos, theta)
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
    sliding = cfg["layer_types"][layer] == "sliding_attention"
    causal = sliding if cfg.get("is_causal") is None else cfg["is_causal"]
    pq, pk = pos[n:, None], pos[None, :]
    visible = torch.ones(b, n + b, dtype=torch.bool)
    if causal:
        visible &= pk <= pq
    if sliding:
        visible &= pq - pk < cfg["sliding_window"]
    out = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
    return out.reshape(b, hq * d) @ w[p + "self_attn.o_proj.weight"].T


def naive_dflash2(w, cfg, embed, lm_head, features, bonus: int, block_size: int):
    """(head logits U [B-1, V], the drafted ids) of one DFlash2 draft."""
    dc = cfg["dflash_config"]
    gs, k = dc["conv_group_size"], dc["conv_kernel_size"]
    n = features.shape[0]
    ctx = _rms(features @ w["fc.weight"].T, w["hidden_norm.weight"])
    x = embed[[bonus] + [dc["mask_token_id"]] * (block_size - 1)] * dc.get("input_embedding_scale", 1.0)

    def sublayer(x, p, conv, fn):
        h = _rms(x, w[p + ("input_layernorm" if conv == "attention_conv" else "post_attention_layernorm") + ".weight"])
        dynamic = (h @ w[p + conv + ".kernel_projection.weight"].T).view(block_size, 2, k, -1)
        base = w[p + conv + ".base_kernel"]
        out = fn(naive_conv(h, base[0], dynamic[:, 0], gs))
        return x + naive_conv(out, base[1], dynamic[:, 1], gs)  # the post kernel comes from the input h

    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        x = sublayer(x, p, "attention_conv", lambda h: naive_attention(h, ctx, w, p, cfg, i, n))
        x = sublayer(x, p, "mlp_conv", lambda h: (F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
                                                  * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T)
    hidden = _rms(x, w["norm.weight"])[1:]
    u = hidden @ lm_head.T * dc.get("output_multiplier", 1.0)
    cap = dc.get("final_logit_softcapping")
    if cap:
        u = cap * torch.tanh(u / cap)
    s = "candidate_selector."
    ph = hidden @ w[s + "hidden_projection.weight"].T
    a, bb = w[s + "predecessor_codebook"], w[s + "successor_codebook"]
    drafts, previous = [], bonus
    for t in range(block_size - 1):  # the walk: the best candidate given the one chosen before
        best, best_score = None, float("-inf")
        for c in u[t].topk(dc["selector_top_k"]).indices.tolist():
            score = float(u[t, c] + (a[previous] * ph[t] * bb[c]).sum())
            if score > best_score:
                best, best_score = c, score
        drafts.append(best)
        previous = best
    return u, drafts


@pytest.fixture(scope="module")
def hybrid_target(tmp_path_factory):
    cfg = qwen35_config()
    return write_qwen35(tmp_path_factory.mktemp("d2") / "t", cfg, seed=11, slow_decay=True), cfg["text_config"]


@pytest.mark.parametrize("variant", ["released", "causal-k3"])
def test_the_cached_drafter_matches_the_reference_written_from_the_math(tmp_path, hybrid_target, variant):
    """Every draft of a generation: the engine's head logits and drafted ids equal the uncached reference.
    `released`: the layout of the published files (all sliding, non-causal; the window binds past 16
    tokens), with a multiplier, a softcap and an embedding scale. `causal-k3`: a causal sliding layer and a
    full one (no is_causal), 3 taps, groups of 8, top-4 candidates."""
    t, tcfg = hybrid_target
    if variant == "released":
        cfg = dflash2_config(tcfg, target_layer_ids=(1, 3), mask_token_id=500)
        cfg["dflash_config"] |= {"output_multiplier": 0.5, "final_logit_softcapping": 3.0, "input_embedding_scale": 1.5}
    else:
        cfg = dflash2_config(tcfg, target_layer_ids=(0, 3), mask_token_id=500, group_size=8, top_k=4)
        cfg |= {"layer_types": ["sliding_attention", "full_attention"]}
        del cfg["is_causal"]
        cfg["dflash_config"]["conv_kernel_size"] = 3
    d = write_drafter(tmp_path / "d", cfg, seed=4)
    m = loader.load(t, d, device="cpu")
    w = load_file(str(d / "model.safetensors"))
    prompt = random_prompts(1, 500, seed=7, longest=30)[0]
    ids, calls = list(prompt), 0
    original = m.drafter.draft_block  # what the engine drafts through

    def checked(bonus, cache, block_size, window=None):
        nonlocal calls
        block = original(bonus, cache, block_size, window)
        assert block[:1].tolist() == bonus.tolist()
        got = block[1:]
        logits = m.drafter.draft_logits(bonus, cache, block_size, window)
        n = int(cache.length)
        feats = m.target.forward(torch.tensor(ids[:n]), m.target.new_cache(n + 1, 8),
                                 feature_layers=m.drafter.cfg.target_layer_ids, commit=True)[1]
        want_logits, want = naive_dflash2(w, cfg, m.target.embed, m.target.lm_head, feats, int(bonus), block_size)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        assert got.tolist() == want, f"draft {calls}"
        calls += 1
        return block

    m.drafter.draft_block = checked
    for step in Engine(m.target, m.drafter).generate(Request(prompt, 40)):
        ids += step.tokens
    assert calls >= 5 and len(ids) - len(prompt) == 40 and len(prompt) + 40 > 16  # the window binds


# (4, 2, ...): a conv longer than the block (a DFlash2 drafter at b = 2), whose taps past row 0 read zeros only
@pytest.mark.parametrize("taps, length, hidden, groups", [(2, 8, 64, 4), (1, 3, 16, 16), (3, 5, 48, 3), (2, 1, 8, 1),
                                                          (4, 2, 16, 4), (4, 1, 8, 2)])
def test_the_dynamic_conv_equals_its_definition(taps, length, hidden, groups):
    g = torch.Generator().manual_seed(taps * 100 + length)
    z, base = torch.randn(length, hidden, generator=g), torch.randn(taps, hidden, generator=g)
    dynamic = torch.randn(length, taps, groups, generator=g)
    torch.testing.assert_close(dynamic_conv(z, base, dynamic), naive_conv(z, base, dynamic, hidden // groups),
                               rtol=1e-5, atol=1e-5)


def test_the_walk_is_greedy_given_the_previous_choice_not_viterbi():
    """Two rows, two candidates each, built so that the best path (Viterbi) and the greedy walk differ:
    the walk takes row 0's best and then the best continuation of it."""
    sel = CandidateSelector(hidden_projection=torch.eye(2), predecessor=torch.zeros(4, 2), successor=torch.zeros(4, 2),
                            top_k=2)
    sel.predecessor[2] = torch.tensor([10.0, 0.0])  # after token 2, token 1 gains 10 × P h × 1
    sel.successor[1] = torch.tensor([1.0, 0.0])
    logits = torch.tensor([[0.0, 0.0, 1.0, 2.0],  # row 0: token 3 (2.0) over token 2 (1.0)
                           [0.0, 0.5, 0.0, 1.0]])  # row 1: token 3 (1.0) over token 1 (0.5), unless after 2
    hidden = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert sel.walk(hidden, logits, torch.tensor([0])).tolist() == [3, 3]  # Viterbi would pick [2, 1]: 1 + 10.5
    sel.successor[1] = torch.tensor([-1.0, 0.0])
    logits[0, 2] = 3.0
    assert sel.walk(hidden, logits, torch.tensor([0])).tolist() == [2, 3]  # the edge now pushes token 1 down


# ---- identity-initialised DFlash2 = v1 ---------------------------------------------------------------------
def test_an_identity_initialised_dflash2_drafter_is_the_v1_drafter_bit_for_bit(tmp_path, qwen35_pair):
    """Base kernels = identity, zero projections, zero successor codebook (random predecessor codebook
    and hidden projection): the same head logits bit for bit in fp32 at every draft of a generation, the
    same drafts, the same tokens. A projection off zero by 1e-3 changes the logits (the check can fail)."""
    t, v1_dir = qwen35_pair
    v1_cfg = json.loads((v1_dir / "config.json").read_text())
    cfg = as_dflash2(v1_cfg)
    init = identity_init(DrafterConfig.from_raw(cfg, tmp_path), load_file(str(v1_dir / "model.safetensors")), seed=3)
    d2 = write_drafter(tmp_path / "d2", cfg, weights=init)
    v1, v2 = loader.load(t, v1_dir, device="cpu"), loader.load(t, d2, device="cpu")
    assert v2.drafter.selector is not None and v2.drafter.layers[0].attention_conv is not None
    logits = {1: [], 2: []}
    for m, key in ((v1, 1), (v2, 2)):
        original = m.drafter.draft_block

        def record(bonus, cache, block_size, window=None, m=m, key=key, original=original):
            logits[key].append(m.drafter.draft_logits(bonus, cache, block_size, window))
            return original(bonus, cache, block_size, window)

        m.drafter.draft_block = record
    accepted = 0
    for prompt in HYBRID_PROMPTS[:3]:
        steps1 = list(Engine(v1.target, v1.drafter).generate(Request(prompt, 32)))
        steps2 = list(Engine(v2.target, v2.drafter).generate(Request(prompt, 32)))
        assert [(s.tokens, s.drafts, s.accepted) for s in steps1] == [(s.tokens, s.drafts, s.accepted) for s in steps2]
        accepted += sum(s.accepted for s in steps2)
    assert len(logits[1]) == len(logits[2]) > 5
    assert all(torch.equal(a, b) for a, b in zip(logits[1], logits[2]))
    assert accepted > 0  # a fitted drafter: drafts are accepted

    init["layers.1.mlp_conv.kernel_projection.weight"] = torch.full_like(
        init["layers.1.mlp_conv.kernel_projection.weight"], 1e-3)
    save_weights(d2, init)
    off = loader.load(t, d2, device="cpu")
    features = torch.randn(5, len(off.drafter.cfg.target_layer_ids) * 64)
    caches = v1.drafter.new_cache(64), off.drafter.new_cache(64)
    v1.drafter.add_context(features, caches[0])
    off.drafter.add_context(features, caches[1])
    bonus = torch.tensor([7])
    assert not torch.equal(v1.drafter.draft_logits(bonus, caches[0], 8), off.drafter.draft_logits(bonus, caches[1], 8))


# ---- the fitted DFlash2 drafter (its lossless decoding of the Qwen3.5 hybrid: tests/test_conformance.py) ---
def _tokens(engine: Engine, prompt: list[int], n: int, sampling=None) -> tuple[list[int], list]:
    steps = list(engine.generate(Request(prompt, n, sampling=sampling or SamplingParams())))
    return [t for s in steps for t in s.tokens], steps


def test_the_selector_walk_of_the_fitted_drafter_leaves_the_heads_argmax(dflash2_pair):
    """What the conformance checks of the dflash2 case (greedy = transformers' generate and the rest,
    tests/test_conformance.py) run through: on the prompts that check decodes, at the drafter's block
    size, the candidate selector's walk really chooses other tokens than the head's argmax."""
    model = loader.load(*dflash2_pair, device="cpu")
    drafter = model.drafter
    head, original = [0, 0], drafter.draft_block

    def counting(bonus, cache, block_size, window=None):  # rows where the walk leaves the head's argmax
        block = original(bonus, cache, block_size, window)
        head[0] += int((block[1:] != drafter.draft_logits(bonus, cache, block_size, window).argmax(-1)).sum())
        head[1] += block_size - 1
        return block

    drafter.draft_block = counting
    for prompt in HYBRID_PROMPTS[:3] + random_prompts(2, 500, seed=99):
        _tokens(Engine(model.target, drafter, block_size=8), prompt, 40)
    assert head[0] > 0, head


# ---- one-line errors -------------------------------------------------------------------------------------
def _edit(cfg: dict, change: str) -> dict:
    cfg = json.loads(json.dumps(cfg))
    dc = cfg["dflash_config"]
    if change == "no layer ids":
        del dc["target_layer_ids"]
    elif change == "no conv size":
        del dc["conv_kernel_size"]
    elif change == "group":
        dc["conv_group_size"] = 24
    elif change == "no vocab":
        del cfg["vocab_size"]
    elif change == "vocab":
        cfg["vocab_size"] = 600
    elif change == "multiplier":
        dc["output_multiplier"] = -1.0
    elif change == "top-k":
        dc["selector_top_k"] = 513
    return cfg


@pytest.mark.parametrize("change, message", [
    ("no layer ids", "is missing 'dflash_config.target_layer_ids', which a DFlash2DraftModel needs"),
    ("no conv size", "is missing 'conv_kernel_size' (dflash_config or top level), which a DFlash2DraftModel needs"),
    ("group", "hidden_size 64 is not a multiple of conv_group_size 24"),
    ("no vocab", "config.json is missing 'vocab_size'"),
    ("vocab", "does not match the target: vocab size 600 vs target 512"),
    ("multiplier", "'output_multiplier' should be a positive number, got -1.0"),
    ("top-k", "selector_top_k 513 exceeds the vocabulary (512)"),
])
def test_config_problems_are_one_line(capsys, tmp_path, hybrid_target, change, message):
    t, tcfg = hybrid_target
    d = write_drafter(tmp_path / "d", dflash2_config(tcfg, target_layer_ids=(1, 3), mask_token_id=500))
    (d / "config.json").write_text(json.dumps(_edit(json.loads((d / "config.json").read_text()), change)))
    code = main(["run", "--target", str(t), "--drafter", str(d), "-p", "x", "--raw", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("Error: ") and message in err, err


@pytest.mark.parametrize("name, shape, message", [
    ("candidate_selector.successor_codebook", (500, 16), "successor_codebook has shape (500, 16), config.json implies "
                                                         "(512, 16)"),
    ("layers.1.attention_conv.kernel_projection.weight", (8, 64),
     "kernel_projection.weight has shape (8, 64), config.json implies (16, 64)"),
    ("layers.0.mlp_conv.base_kernel", (2, 3, 64), "base_kernel has shape (2, 3, 64), config.json implies (2, 2, 64)"),
])
def test_a_tensor_of_the_wrong_shape_is_named(tmp_path, hybrid_target, name, shape, message):
    t, tcfg = hybrid_target
    cfg = dflash2_config(tcfg, target_layer_ids=(1, 3), mask_token_id=500)
    d = write_drafter(tmp_path / "d", cfg)
    w = load_file(str(d / "model.safetensors")) | {name: torch.zeros(shape)}
    save_weights(d, w)
    with pytest.raises(DflashError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loader.load(t, d, device="cpu")


def test_codebook_rows_must_match_the_target_head(tmp_path, hybrid_target):
    """Without check_against (e.g. a drafter built for the synthetic bench), the loader still compares the
    codebooks with the head it is given."""
    t, tcfg = hybrid_target
    d = write_drafter(tmp_path / "d", dflash2_config(tcfg, target_layer_ids=(1, 3), mask_token_id=500))
    cfg = DrafterConfig.from_dir(d)
    with pytest.raises(DflashError, match="codebooks have vocab_size 512 rows, but the target's vocabulary is 400"):
        Drafter.load(d, cfg, torch.zeros(400, 64), torch.zeros(400, 64), 64)


# ---- the synthetic bench ---------------------------------------------------------------------------------
def test_the_qwen3_8_synthetic_shape_is_the_published_drafter(capsys):
    """Qwen3.8-27B-DFlash2's config as published: 81 tensors of 1.924 G parameters (within a safetensors
    header's size of the 3,848,817,896 bytes reported for its file, research/dflash2.md §1.2), kernel
    projections 1280 × 5120; and the same code path runs end to end on a CPU at the tiny DFlash2 shape."""
    from dflash_cli.models.weights import table_bytes
    from dflash_cli.synthetic import configs

    _, target, drafter, _ = configs("qwen3.8-27b")
    table = weight_table(drafter)
    assert len(table) == 81 and abs(table_bytes(table, torch.bfloat16) - 3_848_817_896) < 16_384
    assert {w.shape for w in table if "kernel_projection" in w.name} == {(1280, 5120)}
    assert drafter.vocab_size == target.vocab_size == 248320 and target.num_layers == 64
    assert main(["bench", "tiny-dflash2", "--synthetic", "--device", "cpu", "--context", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shape"] == "tiny-dflash2" and report["draft_s"] > 0


def test_the_dflash2_walk_on_the_gpu_is_captured_and_writes_the_cpu_tokens(dflash2_pair):
    """The candidate selector's walk runs inside the captured step (fixed L, per-row argmax and topk):
    under the stand-in for torch.cuda (tests/fake_cuda.py) the captured and replayed steps, with
    lookahead, write plain decoding's tokens."""
    from .fake_cuda import stand_in

    cpu = loader.load(*dflash2_pair, device="cpu")
    prompt = HYBRID_PROMPTS[1]
    want, _ = _tokens(Engine(cpu.target), prompt, 32)
    with stand_in() as gpu:
        model = loader.load(*dflash2_pair, device="cuda", dtype="float32", max_context=256)
        engine = Engine(model.target, model.drafter, adaptive=True)
        got, _ = _tokens(engine, prompt, 32)
    assert got == want and engine.graphs.enabled and gpu.captures == len(engine.policy.sizes) + 1
