"""Device launches per step (issue 26): the counter, and a ceiling per family so the count cannot creep up.

At batch 1 a GPU iteration is a chain of small dependent launches, each costing 1-2 µs before its body,
so for the hybrid and MoE families the number of launches, not the bytes, sets the speed. The counter
(tests/launch_count.py) counts the launches in the graph the engine captures on the stand-in GPU, with
the Triton kernels in the interpreter; benchmarks/launches.py prints the table (docs/benchmarks.md,
"Launches per step").
"""
from __future__ import annotations

import os

import pytest
import torch

from dflash_cli import cuda, ops

from .fake_cuda import stand_in
from .launch_count import BUDGETS, FAMILIES, breakdown, captured_step, count_family, launches, tree_step

# The counter counts the launches of the Triton interpreter (what a capture on the stand-in GPU records).
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts interpreted Triton launches (TRITON_INTERPRET=1, set on a CPU)")

# Today's counts, measured (python benchmarks/launches.py): launches per layer of each kind and the
# step's fixed work, for a decode step (b = 1, plain) and a verify step (one DFlash iteration at b = 4).
# These are CEILINGS, not issue 26's budgets (launch_count.BUDGETS: dense ≤ 6, hybrid linear ≤ 12, gated
# full ≤ 8, MoE ≤ 12, gpt-oss ≤ 10, drafter ≤ 6, fixed ≤ 20), which need the fusions. A count
# over its ceiling fails (fuse the new launch away, or raise the ceiling here with a reason); a count
# under it fails too, asking for the ceiling to come down to it, so a fusion's gain cannot be spent again
# unnoticed.
# Lowered by the fusions (issue 26, kernels/fused_linear.py and the drafter's norms): drafter 13 -> 11 (its
# residual adds run inside the next norm), DFlash2 drafter 55 -> 53 (the same).
# Issue 24 lowered the linear and MoE kinds: l2norm and the gated RMSNorm are one kernel each (were ~15 torch
# ops), and the router's softmax/top-k/renormalisation one kernel (were 4-7 torch ops).
# The step's fixed work (h-fixed): 16 -> 8 (decode), 35 -> 19 (verify), 23/42 -> 9/20 (hybrid): positions and kv_len
# one launch per step (views of length + offsets), the sampler's values read in place, the packed readback, commit
# count and next bonus written by the accept kernel, the drafter's input block one kernel, its drafts written over
# it (no block cat), the context rows following the length in-kernel, the features copied once into one buffer,
# the hybrid commit (replay + conv windows) one kernel. Drafter layer 11 -> 10 (q/k/v one GEMM); DFlash2 drafter
# layer 53 -> 16 (the dynamic conv one kernel) and its fixed work 51 -> 27 (the selector walk one kernel).
# Attention's split and merge are one launch (kernels/attention.py: the last split merges): every attention layer
# one fewer; the gated full-attention layer also runs out × sigmoid(gate) in that merge (full 12 -> 9).
# q/k-norm, rope and the K/V write in attention's prologue (h-attnpro, kernels/attention.py `Rope`): every kind with
# an attention layer one fewer (dense, drafter, full, moe, gpt-oss 9 -> 8; full+moe 13 -> 12; DFlash2 drafter 15 -> 14).
CEILINGS = {
    "dense": {"decode": {"dense": 8, "fixed": 8},
              "verify": {"dense": 8, "drafter": 8, "fixed": 19}},
    # linear 24/28 -> 9: the Gated DeltaNet glue in two launches (kernels/gdn_glue.py), was ~17 ops and copies
    "hybrid": {"decode": {"linear": 9, "full": 8, "fixed": 9},
               "verify": {"linear": 9, "full": 8, "drafter": 8, "fixed": 20}},
    # MoE kinds 29 -> 11 (hybrid full+moe 36 -> 15): the pairs' alignment inside the gate_up launch (was 14
    # torch ops), the rank-order combine one launch (was k - 1 adds and a cast), the shared expert's gate and add in it
    # MoE 11 -> 9, hybrid MoE 15 -> 13, gpt-oss 11 -> 9: the router and the top-k in one launch, the combine
    # in the down projection's epilogue (kernels/moe.py)
    "moe": {"decode": {"moe": 8, "fixed": 8},
            "verify": {"moe": 8, "drafter": 8, "fixed": 19}},
    # linear+moe 48/52 -> 15: the Gated DeltaNet glue and the MoE fusions together
    "hybrid-moe": {"decode": {"linear+moe": 13, "full+moe": 12, "fixed": 9},
                   "verify": {"linear+moe": 13, "full+moe": 12, "drafter": 8, "fixed": 20}},
    "gpt-oss": {"decode": {"gpt-oss sliding": 8, "gpt-oss full": 8, "fixed": 8},
                "verify": {"gpt-oss sliding": 8, "gpt-oss full": 8, "drafter": 8, "fixed": 19}},
    "dflash2": {"decode": {"dense": 8, "fixed": 8},
                # fixed 27 -> 20: the selector's top-k, lattice and walk one kernel (kernels/selector.py), was 8 ops
                "verify": {"dense": 8, "dflash2 drafter": 14, "fixed": 20}},
}


def off_ceiling(counts, ceilings: dict) -> list[str]:
    """One line per count that is not its ceiling (a step or kind missing on either side included)."""
    wrong = []
    for step, want in ceilings.items():
        got = {**counts.per_layer.get(step, {}), "fixed": counts.fixed.get(step)}
        for kind in sorted(set(want) | set(got)):
            n, cap = got.get(kind), want.get(kind)
            if n != cap:
                why = ("over its ceiling: a launch was added (fuse it, or raise the ceiling with a reason)"
                       if n is not None and cap is not None and n > cap else
                       "under its ceiling: lower the ceiling to the new count" if n is not None and cap is not None
                       else "not counted" if n is None else "has no ceiling")
                ops_of = counts.ops.get(step, {}).get(kind, {})
                wrong.append(f"{counts.family} {step} {kind}: {n} launches, ceiling {cap}: {why} ({ops_of})")
    return wrong


# ---- the counter ------------------------------------------------------------------------------------------
def test_the_counter_counts_what_a_gpu_would_launch():
    """A hand-written step with a known number of launches: views, metadata, allocations and idle
    `to`/`contiguous` are free; a Triton launch counts once (the interpreter's own copies around it are
    part of it); a copy, a `contiguous` or `reshape` that moves data, and an arithmetic op count."""
    with stand_in(kernels="triton"), torch.inference_mode():
        x, w, out = torch.randn(4, 8), torch.ones(8), torch.empty(4, 8)
        graph = cuda.new_graph()
        with cuda.capturing(graph):
            x.view(2, 16).transpose(0, 1).unsqueeze(0)[0].permute(1, 0).reshape(32)  # views: 0
            x[1:3].squeeze().expand(2, 8).t().detach()  # views: 0
            x.contiguous(), x.to(torch.float32), x.reshape(32), torch.empty(3), torch.empty_like(x)  # 0
            h, _ = ops.rms_norm(x, w, 1e-6)  # one Triton launch: 1
            out.copy_(h)  # a copy: 1
            x.t().contiguous()  # a contiguous that moves data: 1
            x.t().reshape(32)  # a reshape that must copy: 1
            h + 1  # 1
    assert dict(breakdown(graph.ops)) == {"triton:_rms_norm_kernel": 1, "copy_": 1, "contiguous": 1, "reshape": 1,
                                          "add": 1}
    assert launches(graph.ops) == 5
    assert len(graph.ops) > 5  # the views were recorded and left out, not missed


def test_the_ceilings_and_budgets_name_the_same_kinds():
    for name, family in FAMILIES.items():
        kinds = {*family.kinds, family.drafter_kind, "fixed"}
        assert set(CEILINGS[name]["verify"]) == kinds and set(CEILINGS[name]["decode"]) == kinds - {family.drafter_kind}
        assert kinds <= set(BUDGETS)


def test_one_more_launch_in_a_layer_is_caught(monkeypatch):
    """The ceiling check on a dense model whose MLP launches one op more (SwiGLU's output copied): the
    dense layer's decode count goes over its ceiling by one, and nothing else moves."""
    swiglu = ops.swiglu
    monkeypatch.setattr(ops, "swiglu", lambda gate_up: swiglu(gate_up).clone())
    counts = count_family(FAMILIES["dense"], steps_wanted=("decode",))
    cap = CEILINGS["dense"]["decode"]["dense"]
    wrong = off_ceiling(counts, {"decode": CEILINGS["dense"]["decode"]})
    assert len(wrong) == 1 and wrong[0].startswith(f"dense decode dense: {cap + 1} launches, ceiling {cap}: over its ceiling")
    assert "'clone': 1" in wrong[0]  # the op that was added is named


# ---- every family held to its ceiling ------------------------------------------------------------------------
@pytest.mark.slow  # each family is counted twice over (one more layer of each kind): ~40 s
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_family_launches_more_than_today(family):
    counts = count_family(FAMILIES[family])
    wrong = off_ceiling(counts, CEILINGS[family])
    assert not wrong, "\n".join(wrong)


# ---- the fused linear kernels (DFLASH_LINEAR=invariant) ---------------------------------------------------
# Under DFLASH_LINEAR=invariant the dense layer's projections run on the batch-invariant kernel, and the
# post-attention norm (+ residual), gate_up and SwiGLU are one launch (kernels/fused_linear.py): 10 -> 8;
# the input norm (+ residual) and the q/k/v projection one more (Attention.after_norm): 8 -> 7.
# Counted at the tiny widths, where every weight is reduced in one slice; at a released model's widths a
# weight reduced in slices is one launch as well (the last split program merges: kernels/invariant_linear.py),
# so these are a released layer's counts too (tests/test_launches_real_width.py counts it at the real widths).
# The drafter's layer takes the same fusions (norm + q/k/v, norm + gate_up + SwiGLU), and attention's split and
# merge are one launch: dense 6, drafter 6, the budget. q/k-norm, rope and the K/V write in attention's
# prologue (kernels/attention.py `Rope`): dense, drafter 6 -> 5, MoE, gpt-oss 8 -> 7.
INVARIANT_CEILINGS = {"dense": {"decode": {"dense": 5, "fixed": 8},
                                "verify": {"dense": 5, "drafter": 5, "fixed": 19}},
                      # gpt-oss's input norm (fp32 weight, one rounding) fused into its biased q/k/v: 11 -> 10;
                      # the router and the top-k in one launch, the combine in the down epilogue: MoE 10 -> 8,
                      # gpt-oss 10 -> 8
                      "moe": {"decode": {"moe": 7, "fixed": 8},
                              "verify": {"moe": 7, "drafter": 5, "fixed": 19}},
                      "gpt-oss": {"decode": {"gpt-oss sliding": 7, "gpt-oss full": 7, "fixed": 8},
                                  "verify": {"gpt-oss sliding": 7, "gpt-oss full": 7, "drafter": 5, "fixed": 19}},
                      # DFlash2 drafter 14 -> 8: per sublayer norm + the conv's kernel projection, pre-conv + q/k/v
                      # (gate_up + SwiGLU), o (down) + post-conv, one launch each (kernels/fused_linear.py);
                      # dense 6 -> 5, drafter 8 -> 7: q/k-norm, rope and the K/V write in attention's prologue
                      "dflash2": {"decode": {"dense": 5, "fixed": 8},
                                  # fixed 27 -> 20: the selector one kernel (kernels/selector.py)
                                  "verify": {"dense": 5, "dflash2 drafter": 7, "fixed": 20}},
                      # the hybrids: the full layer 8 -> 7 with the rope/cache prologue; the linear layer's in-projection
                      # takes its norm as a prologue (the Gated DeltaNet glue is two launches either way)
                      "hybrid": {"decode": {"linear": 8, "full": 7, "fixed": 9},
                                 "verify": {"linear": 8, "full": 7, "drafter": 5, "fixed": 20}},
                      "hybrid-moe": {"decode": {"linear+moe": 12, "full+moe": 11, "fixed": 9},
                                     "verify": {"linear+moe": 12, "full+moe": 11, "drafter": 5, "fixed": 20}}}


@pytest.mark.slow  # the dense family counted twice over: ~90 s
def test_the_dense_and_drafter_layers_under_the_invariant_linear_fuse_their_norms_and_swiglu(monkeypatch):
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    counts = count_family(FAMILIES["dense"])
    wrong = off_ceiling(counts, INVARIANT_CEILINGS["dense"])
    assert not wrong, "\n".join(wrong)
    for step, kind in (("decode", "dense"), ("verify", "drafter")):
        layer = counts.ops[step][kind]
        assert layer.get("triton:_fused_partial_kernel") == 2, layer  # norm + q/k/v, norm + gate_up + SwiGLU
        assert "triton:_swiglu_kernel" not in layer and "triton:_rms_norm_kernel" not in layer, layer


@pytest.mark.slow  # each family counted twice over: ~40 s
@pytest.mark.parametrize("family", ["moe", "gpt-oss"])
def test_the_moe_families_under_the_invariant_linear_fuse_the_input_norm(monkeypatch, family):
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    counts = count_family(FAMILIES[family])
    wrong = off_ceiling(counts, INVARIANT_CEILINGS[family])
    assert not wrong, "\n".join(wrong)
    for kind, layer in counts.ops["decode"].items():
        if kind != "fixed":
            assert layer.get("triton:_fused_partial_kernel") == 1 and layer.get("triton:_rms_norm_kernel") == 1, layer


@pytest.mark.slow  # each hybrid counted twice over: ~60 s
@pytest.mark.parametrize("family", ["hybrid", "hybrid-moe"])
def test_the_hybrids_under_the_invariant_linear_launch_no_more_than_today(monkeypatch, family):
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    wrong = off_ceiling(count_family(FAMILIES[family]), INVARIANT_CEILINGS[family])
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow  # the DFlash2 pair counted twice over: ~130 s
def test_the_dflash2_drafter_layer_under_the_invariant_linear_runs_its_convs_inside_the_projections(monkeypatch):
    """Per sublayer: norm + the conv's kernel projection, pre-conv + the projection (q/k/v; gate_up + SwiGLU),
    the output projection + post-conv; no norm, conv or plain GEMM launch of its own."""
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    counts = count_family(FAMILIES["dflash2"])
    wrong = off_ceiling(counts, INVARIANT_CEILINGS["dflash2"])
    assert not wrong, "\n".join(wrong)
    layer = counts.ops["verify"]["dflash2 drafter"]
    assert layer.get("triton:_fused_partial_kernel") == 6, layer
    assert not {"triton:_dynamic_conv_kernel", "triton:_rms_norm_kernel", "triton:_partial_kernel"} & set(layer), layer


# ---- tree verification (issue 28): a tree iteration's step ------------------------------------------------------
# One tree iteration at b = 4 (draft, the best-first tree of N nodes, its verify under the ancestor mask, the walk,
# the path's commit) at 8 and 16 nodes, for the families that verify trees (DFlash2 drafters keep their chain).
# Lowered by kernels/tree_build.py and kernels/gated_delta_tree.tree_windows: the build (~56 torch ops per node:
# 536 / 984 launches in all at 8 / 16 nodes), the walk with the packed readback, the mask, and the hybrid's tree
# shape are one launch each, and the hybrid commit gathers its path in its own launch (was 10 ops).
# Fixed work (tiny, both budgets): 509 / 957 -> 37 (dense, MoE, gpt-oss), 549 / 997 -> 39 (the hybrids); what it launches
# beyond a chain verify's 19-20: the K/V path gather (10: cache.gather_rows), the node positions and the path's
# features (3), the drafter's logits without its argmax block (embedding + cat), top-K (2), build, mask, verdict,
# and for the hybrids the tree shape. A tree layer launches what a chain verify layer does.
TREE_STEPS = (tree_step(8), tree_step(16))
# Attention-containing kinds one fewer than at first (9 -> 8, full+moe 13 -> 12): the tree attention's prologue
# norms and ropes q/k and writes the nodes' K/V (ops.rope_tree_attention).
_TREE = {
    "dense": {"dense": 8, "drafter": 8, "fixed": 37},
    "hybrid": {"linear": 9, "full": 8, "drafter": 8, "fixed": 39},
    "moe": {"moe": 8, "drafter": 8, "fixed": 37},
    "hybrid-moe": {"linear+moe": 13, "full+moe": 12, "drafter": 8, "fixed": 39},
    "gpt-oss": {"gpt-oss sliding": 8, "gpt-oss full": 8, "drafter": 8, "fixed": 37},
}
TREE_CEILINGS = {family: {step: dict(kinds) for step in TREE_STEPS} for family, kinds in _TREE.items()}


def test_the_tree_ceilings_name_every_family_that_verifies_trees():
    assert set(TREE_CEILINGS) == {name for name, family in FAMILIES.items() if family.trees}
    for name, steps in TREE_CEILINGS.items():
        family = FAMILIES[name]
        assert set(steps) == set(TREE_STEPS)
        assert all(set(kinds) == {*family.kinds, family.drafter_kind, "fixed"} for kinds in steps.values())


@pytest.mark.slow  # two tree steps captured, kernels interpreted: ~25 s
def test_a_tree_steps_launches_do_not_grow_with_its_budget(tmp_path):
    """The dense tiny pair's tree iteration at 8 and at 32 nodes launches the same kernels (the build, the walk
    and the mask are one launch each at any budget; before, the build alone was ~56 torch ops per node)."""
    family = FAMILIES["dense"]
    t, d = family.write(tmp_path, family.kinds, 1)
    small, large = (breakdown(captured_step(t, d, family.block_size, tree_budget=n)) for n in (8, 32))
    assert small == large, (small, large)
    assert all(small[f"triton:{k}"] == 1 for k in ("_build_kernel", "_verdict_kernel", "_mask_kernel")), small


@pytest.mark.slow  # each family counted twice over, at two budgets: ~60 s
@pytest.mark.parametrize("family", list(TREE_CEILINGS))
def test_no_tree_step_launches_more_than_today(family):
    counts = count_family(FAMILIES[family], TREE_STEPS)
    wrong = off_ceiling(counts, TREE_CEILINGS[family])
    assert not wrong, "\n".join(wrong)
