"""Caches are sized from free memory before loading, from what the model really holds; a request
that cannot fit is one line."""
from __future__ import annotations

import pytest
import torch

from dflash_cli.engine import cache_slack
from dflash_cli.errors import DflashError
from dflash_cli.memory import GiB, needs_for, plan_context
from dflash_cli.models.weights import table_bytes
from dflash_cli.synthetic import configs

FAMILY, Q8, Q8_DRAFT, _ = configs("qwen3-8b")
NEEDS = needs_for(FAMILY, Q8, Q8_DRAFT, torch.bfloat16, 16, cache_slack(16))


def test_qwen3_8b_sizes_are_what_the_design_notes_say():
    assert 15.0 * GiB < table_bytes(FAMILY.weight_table(Q8), torch.bfloat16) < 15.5 * GiB  # 8.2B params, untied head
    # 36 target layers + 5 draft layers, 8 KV heads of 128, K and V, bf16; no fixed state in a dense cache
    assert (NEEDS.per_token, NEEDS.fixed) == (2 * (36 + 5) * 8 * 128 * 2, 0)


@pytest.mark.parametrize("alias, params", [
    ("qwen3-coder-30b-a3b", 30.5e9), ("qwen3.5-35b-a3b", 34.7e9), ("qwen3.5-27b", 26.9e9), ("qwen3.5-9b", 8.95e9),
    ("qwen3.5-4b", 4.2e9),
])
def test_weights_are_the_published_parameter_counts_in_bfloat16(alias, params):
    """The weight tables count every expert and skip the vision tower and MTP head (text-only loading):
    two bytes per published text-model parameter, within 1%."""
    family, target, _, _ = configs(alias)
    assert abs(table_bytes(family.weight_table(target), torch.bfloat16) / 2 - params) < 0.01 * params


def test_a_hybrid_caches_keys_and_values_for_its_full_attention_layers_only():
    """Qwen3.5-27B: 16 of its 64 layers are full attention (4 KV heads of 256), plus the drafter's 5
    layers (8 KV heads of 128); the 48 Gated DeltaNet layers hold a fixed state instead: their float32
    recurrent states (48 value heads of 128 × 128) three times (live, a chat's prefix snapshot, and the
    copy a capture or a cost measurement holds: gpu-review-2 F9), their conv windows, the verify record."""
    family, target, drafter, _ = configs("qwen3.5-27b")
    needs = needs_for(family, target, drafter, torch.bfloat16, 16, cache_slack(16))
    assert needs.per_token == 2 * 2 * (16 * 4 * 256 + 5 * 8 * 128)
    state = 48 * 48 * 128 * 128 * 4
    assert 3 * state < needs.fixed < 4 * state


def test_context_fills_free_memory_up_to_the_model_limit():
    assert plan_context(NEEDS, Q8.max_position_embeddings, None, 139 * GiB) == Q8.max_position_embeddings
    on_24gb = plan_context(NEEDS, Q8.max_position_embeddings, None, 23 * GiB)
    assert 20_000 < on_24gb < Q8.max_position_embeddings
    assert NEEDS.total(on_24gb) <= 23 * GiB < NEEDS.total(on_24gb + 1)


def test_a_request_that_cannot_fit_says_what_would():
    with pytest.raises(DflashError, match=r"--max-context 40000 needs .* GiB is free: use --max-context \d+ or less"):
        plan_context(NEEDS, Q8.max_position_embeddings, 40000, 20 * GiB)


def test_weights_that_do_not_fit_are_named():
    # 17.3 GiB: the drafter holds its k/v rows twice (drafter.copy_bytes, 80 MB at Qwen3-8B's drafter)
    with pytest.raises(DflashError, match="not enough GPU memory: the weights need 17.3 GiB"):
        plan_context(NEEDS, Q8.max_position_embeddings, None, 12 * GiB)


def test_cpu_uses_the_request_or_a_default():
    assert plan_context(NEEDS, Q8.max_position_embeddings, None, None) == 8192
    assert plan_context(NEEDS, Q8.max_position_embeddings, 100, None) == 100
    with pytest.raises(DflashError, match="beyond the model's 40960 positions"):
        plan_context(NEEDS, Q8.max_position_embeddings, 50000, None)


def test_synthetic_shapes_too_big_for_this_machine_are_refused_with_the_numbers(monkeypatch):
    from dflash_cli import synthetic

    monkeypatch.setattr(synthetic, "host_memory", lambda: 8 * GiB)
    with pytest.raises(DflashError, match=r"synthetic qwen3-8b in float32 needs 3\d\.\d GiB in host memory .*8\.0 GiB is free"):
        synthetic.check_memory("qwen3-8b", torch.float32, torch.device("cpu"), 1024, 16)
    synthetic.check_memory("tiny", torch.float32, torch.device("cpu"), 1024, 8)  # fits: no error


def test_the_plan_counts_what_a_gpu_allocates_beside_weights_and_caches():
    """gpu-review-2 F9: the cuBLAS workspaces of the two streams that run GEMMs, the kernel modules, and
    a long gpt-oss prefill's dequantised expert (MXFP4 → float through int32 indices)."""
    from dflash_cli import memory

    dense = configs("qwen3-8b")[1]
    oss = configs("gpt-oss-20b")[1]
    base = memory.workspace_bytes(dense, 16)
    assert base > memory.CUBLAS_WORKSPACES + memory.KERNEL_MODULES + GiB // 2
    assert oss.prefill_scratch == 30 * oss.intermediate_size * oss.hidden_size > 200 << 20  # ~0.23 GiB at 20b
    assert dense.prefill_scratch == 0


def test_dequantising_an_expert_stays_exact_with_narrow_indices():
    from dflash_cli.kernels.moe import E2M1, dequantize_mxfp4

    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    scales = torch.tensor([[120, 127, 130, 1, 254, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127, 127]],
                          dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    lut = torch.tensor(E2M1)
    b = blocks.long()
    want = torch.stack((lut[b & 15], lut[b >> 4]), -1).flatten(-2) * torch.exp2(scales.double() - 127).float()[..., None]
    assert torch.equal(got, want.flatten(-2))


def test_e2m1_nibbles_decode_to_the_table():
    from dflash_cli.kernels.moe import E2M1, e2m1_values

    got = e2m1_values(torch.arange(16, dtype=torch.uint8))
    assert got.tolist() == list(E2M1) and torch.equal(torch.signbit(got), torch.tensor([n >= 8 for n in range(16)]))


def test_only_projections_are_quantized():
    """The embedding and head (the drafter reads both), norms, routers and gates, Gated DeltaNet's small
    in_proj_a/in_proj_b, A_log, dt_bias and conv stay as loaded; every projection, experts included, is quantized."""
    from dflash_cli.memory import quantizable

    names = {}
    for alias in ("qwen3.6-35b-a3b", "gpt-oss-20b", "qwen3-8b"):
        family, target, _, _ = configs(alias)
        for w in family.weight_table(target) + family.weight_table(target, "fused"):
            names[w.name.replace(".0.", ".N.")] = quantizable(w)
    kept = [n for n, q in names.items() if not q and ".N." in n and "layers.1" not in n]
    assert {"model.layers.N.mlp.gate.weight", "model.layers.N.mlp.shared_expert_gate.weight",
            "model.layers.N.linear_attn.in_proj_a.weight", "model.layers.N.linear_attn.in_proj_b.weight",
            "model.layers.N.linear_attn.A_log", "model.layers.N.linear_attn.conv1d.weight",
            "model.layers.N.mlp.router.weight", "model.layers.N.mlp.experts.gate_up_proj_blocks",
            "model.layers.N.mlp.experts.down_proj_bias", "model.layers.N.input_layernorm.weight"} <= set(kept)
    assert not names["lm_head.weight"] and not names["model.embed_tokens.weight"]
    assert all(names[n] for n in ("model.layers.N.self_attn.q_proj.weight", "model.layers.N.linear_attn.in_proj_qkv.weight",
                                  "model.layers.N.linear_attn.out_proj.weight", "model.layers.N.mlp.experts.N.down_proj.weight",
                                  "model.layers.N.mlp.experts.gate_up_proj", "model.layers.N.mlp.shared_expert.up_proj.weight"))


def test_quantized_projection_bytes_are_the_layouts():
    """As quantizing at load writes them: int4, eight codes per int32 word and a bf16 scale per 128 inputs
    (symmetric); int8 and fp8, a byte a weight and a bf16 scale a row."""
    from dflash_cli.memory import quantized_weight_bytes

    assert quantized_weight_bytes((256, 512), "int4") == 256 * (512 // 2 + 4 * 2)
    assert quantized_weight_bytes((4, 256, 512), "int4") == 4 * 256 * (512 // 2 + 4 * 2)  # stacked experts
    assert quantized_weight_bytes((256, 520), "int4") == 256 * (65 * 4 + 5 * 2)  # a partial word and group
    assert quantized_weight_bytes((256, 512), "int8") == quantized_weight_bytes((256, 512), "fp8") == 256 * 514


def test_qwen36_27b_in_int4_fits_a_24gb_card_where_fp8_does_not():
    """The issue's arithmetic: the 27B in int4 with its bf16 drafter fits 24 GiB (with a 4K context), FP8 does not."""
    from dflash_cli.memory import quantized_bytes

    family, target, drafter, _ = configs("qwen3.6-27b")
    table = family.weight_table(target)

    def pair(fmt):
        return needs_for(family, target, drafter, torch.bfloat16, 16, cache_slack(16),
                         quantized_bytes(table, fmt)).total(4096)
    # ~24.3B projection weights at ~4.2 bits, beside a bf16 embedding and head of 1.27B parameters each
    assert 12.5e9 < quantized_bytes(table, "int4") - 2 * 2 * 1.27e9 < 13.5e9
    assert pair("int4") < 23 * GiB < pair("fp8") < pair("bf16")


# ---- a tree verify's buffers (--tree-budget) ----------------------------------------------------------------
def _tree_needs(alias: str, budget) -> "needs_for":
    from dflash_cli.memory import tree_nodes

    family, target, drafter, _ = configs(alias)
    rows = max(16, tree_nodes(budget))
    return needs_for(family, target, drafter, torch.bfloat16, 16, cache_slack(rows), tree_budget=budget)


@pytest.mark.parametrize("alias", ["qwen3-8b", "qwen3.5-27b"])
def test_the_plan_grows_with_the_tree_budget(alias):
    """Each larger budget needs more at every context: the nodes' logits and activations, their ancestor mask
    over the cache and attention partials (per token), and "auto" is its largest tree, 32 nodes, and a captured
    step for each budget it may pick."""
    chain, *trees = (_tree_needs(alias, n) for n in (0, 8, 16, 32, "auto"))
    assert chain.tree_nodes == 0 and chain.tree_total(4096) == 0
    assert [t.tree_nodes for t in trees] == [8, 16, 32, 32]
    for context in (256, 4096, 32768):
        totals = [n.total(context) for n in (chain, *trees)]
        assert totals == sorted(set(totals)), totals  # strictly growing: 0 < 8 < 16 < 32 < auto
        for t in trees:  # what the tree adds is its part of the total, nothing else moved
            assert t.total(context) - chain.total(context) == t.tree_total(context) + (t.slack - chain.slack) * (
                chain.per_token)
    assert trees[0].per_token > chain.per_token  # the mask [N, capacity] and the partials grow with the context


def test_a_hybrid_tree_counts_its_per_node_records_and_states():
    """Qwen3.5-27B at 32 nodes: the commit's records for 32 rows, not the block's 16 (48 linear layers), and one
    layer's per-node states in the tree rule's scratch ([32, 48, 128, 128] fp32)."""
    family, target, _, _ = configs("qwen3.5-27b")
    chain, tree = _tree_needs("qwen3.5-27b", 0), _tree_needs("qwen3.5-27b", 32)
    records = 48 * (32 - 16) * target.gdn.record_bytes(2)
    assert tree.fixed - chain.fixed == records
    assert tree.workspace - chain.workspace > 32 * 48 * 128 * 128 * 4
    assert tree.tree_bytes == records + tree.workspace - chain.workspace


def test_a_plan_that_just_fits_the_chain_refuses_a_tree_in_one_line():
    """Free memory for exactly 8192 tokens of the chain: the chain plans them, a 32-node tree asked for the same
    --max-context is one line naming the tree and the fix, and without --max-context its context shrinks."""
    chain, tree = _tree_needs("qwen3-8b", 0), _tree_needs("qwen3-8b", 32)
    free = chain.total(8192)
    assert plan_context(chain, Q8.max_position_embeddings, 8192, free) == 8192
    with pytest.raises(DflashError) as e:
        plan_context(tree, Q8.max_position_embeddings, 8192, free)
    line = str(e.value)
    assert "\n" not in line and "--tree-budget 32 verify" in line and "or a smaller --tree-budget" in line
    shrunk = plan_context(tree, Q8.max_position_embeddings, None, free)
    assert 256 <= shrunk < 8192 and tree.total(shrunk) <= free < tree.total(shrunk + 1)
    tight = chain.total(300)  # room for the chain's 300 tokens; the 32-node tree's buffers leave under 256
    assert plan_context(chain, Q8.max_position_embeddings, None, tight) == 300
    with pytest.raises(DflashError, match=r"^not enough GPU memory for a --tree-budget 32 verify: .*use a smaller "
                                          r"--tree-budget, or --tree-budget 0 for the chain\)$"):
        plan_context(tree, Q8.max_position_embeddings, None, tight)


def test_loading_for_a_tree_plans_its_buffers_and_the_engine_keeps_that_context(stories_pair):
    """On the stand-in GPU with room for exactly 300 tokens beside a 16-node tree's buffers: loading for
    --tree-budget 16 plans those 300 tokens, the chain more (the tree's buffers are ~1.6 MB, hundreds of this
    tiny model's tokens), and the engine made with that budget keeps exactly the planned context."""
    from dflash_cli import loader
    from dflash_cli.config import DrafterConfig
    from dflash_cli.engine import Engine
    from dflash_cli.models import target_config

    from .fake_cuda import stand_in

    family, cfg = target_config(stories_pair[0])
    tree = needs_for(family, cfg, DrafterConfig.from_dir(stories_pair[1]), torch.float32, 8, cache_slack(16),
                     tree_budget=16)
    with stand_in(free=tree.total(300)):
        assert loader.load(*stories_pair, device="cuda", dtype="float32").max_context > 300
        model = loader.load(*stories_pair, device="cuda", dtype="float32", tree_budget=16)
        assert model.max_context == 300
        engine = Engine(model.target, model.drafter, tree_budget=16)
        assert engine.max_context == 300
    with stand_in(free=tree.total(200)), pytest.raises(DflashError, match="for a --tree-budget 16 verify"):
        loader.load(*stories_pair, device="cuda", dtype="float32", tree_budget=16)


def test_a_dflash2_drafter_plans_no_tree_as_its_engine_verifies_none():
    """DFlash2 drafters keep their selector chain (Engine: auto picks the chain, a budget is refused by name), so
    their plan counts no tree buffers whatever --tree-budget says."""
    family, target, drafter, _ = configs("qwen3.8-27b")
    chain = needs_for(family, target, drafter, torch.bfloat16, 8, cache_slack(8))
    auto = needs_for(family, target, drafter, torch.bfloat16, 8, cache_slack(8), tree_budget="auto")
    assert auto == chain and auto.tree_nodes == 0
