"""The mixture-of-experts kernels against their references, and batch invariance: a row's routing and
expert output are bit-identical whether it is alone or inside a block of 2..32 rows (a decode row and a
verify row must never part at a router tie)."""
import pytest
import torch

from dflash_cli.kernels import moe

from .conftest import DEVICE, TOL


def _weights(e, h, i, dtype, g):
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(DEVICE, dtype)
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(DEVICE, dtype)
    router = (torch.randn(e, h, generator=g) * 4 / h**0.5).to(DEVICE, dtype)
    return router, gate_up, down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 8, 16, 32, 37])  # 37: more rows than one expert slot holds (expert by expert)
def test_experts_kernel_matches_the_reference(seed, dtype, t):
    g = torch.Generator().manual_seed(seed)
    router, gate_up, down = _weights(12, 64, 48, dtype, g)
    x = torch.randn(t, 64, generator=g).to(DEVICE, dtype)
    _, weights = moe.route_ref(x, router, 4, True)
    # Distinct experts per row (as top-k gives), expert 0 in every row: an expert hit by all T rows, and
    # with 12 experts and 4 per row, some hit by none.
    idx = torch.stack([torch.cat((torch.zeros(1, dtype=torch.int64), torch.randperm(11, generator=g)[:3] + 1))
                       for _ in range(t)]).to(DEVICE)
    got = moe.experts(x, gate_up, down, idx, weights)
    want = moe.experts_ref(x, gate_up, down, idx, weights)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_kernel_matches_the_reference(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    router, _, _ = _weights(40, 200, 8, dtype, g)  # 40 experts: not a multiple of the block
    x = torch.randn(9, 200, generator=g).to(DEVICE, dtype)
    idx, w = moe.route(x, router, 8, True)
    want_idx, want_w = moe.route_ref(x, router, 8, True)
    assert torch.equal(idx, want_idx), f"seed {seed}"
    torch.testing.assert_close(w, want_w, **TOL[dtype])


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_a_row_routes_and_computes_the_same_alone_or_in_any_block(seed, impl):
    """Bit-identical, not close: the same row alone and at every place inside blocks of 2..32."""
    route, experts = (moe.route_ref, moe.experts_ref) if impl == "reference" else (moe.route, moe.experts)
    g = torch.Generator().manual_seed(seed)
    router, gate_up, down = _weights(16, 64, 32, torch.float32, g)
    rows = torch.randn(32, 64, generator=g).to(DEVICE)
    alone = []
    for r in range(32):
        idx, w = route(rows[r:r + 1], router, 4, True)
        alone.append((idx, w, experts(rows[r:r + 1], gate_up, down, idx, w)))
    for size in (2, 3, 7, 16, 32):
        block = rows[:size]
        idx, w = route(block, router, 4, True)
        out = experts(block, gate_up, down, idx, w)
        for r in range(size):
            assert torch.equal(idx[r:r + 1], alone[r][0]), f"seed {seed}: routing of row {r} in a block of {size}"
            assert torch.equal(w[r:r + 1], alone[r][1]), f"seed {seed}: weights of row {r} in a block of {size}"
            assert torch.equal(out[r:r + 1], alone[r][2]), f"seed {seed}: output of row {r} in a block of {size}"


def test_slots_are_fixed_shape_and_cover_every_pair():
    idx = torch.tensor([[3, 1], [1, 7], [3, 0]], device=DEVICE)
    expert, rows = moe.align_ref(idx, 16)
    assert expert.tolist() == [0, 1, 3, 7, -1, -1]  # touched experts ascending, then unused slots
    assert rows[:4, :2].tolist() == [[5, -1], [1, 2], [0, 4], [3, -1]]  # each expert's pairs in pair order
    assert (rows[:, 2:] == -1).all() and (rows[4:] == -1).all()


@pytest.mark.parametrize("t,k,e", [(1, 4, 12), (3, 2, 16), (8, 4, 12), (16, 8, 128), (32, 8, 128), (32, 4, 32),
                                   (5, 3, 40)])
def test_the_alignment_kernel_builds_the_reference_slot_table(seed, t, k, e):
    """`_align` (inside the gate_up launch) groups the (token, expert) pairs by expert as a stable sort does:
    slot s the s-th touched expert, its rows that expert's pairs in pair order; unused slots -1."""
    g = torch.Generator().manual_seed(seed)
    hot = torch.randint(0, e, (max(1, e // 8),), generator=g)  # a few experts many rows share
    idx = torch.stack([torch.cat((hot[torch.randperm(hot.numel(), generator=g)[:1]],
                                  torch.randperm(e, generator=g)))[:k] for _ in range(t)])
    idx = torch.stack([row if row.unique().numel() == k else torch.randperm(e, generator=g)[:k] for row in idx])
    got = moe.align(idx.to(DEVICE), e)
    want = moe.align_ref(idx, e)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), f"seed {seed}: {idx.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 5, 32, 37])  # 37: expert by expert
def test_the_shared_expert_joins_the_combine_as_the_layer_added_it(seed, dtype, t):
    """Qwen3.5-MoE: y + sigmoid(g) · shared in the combine launch, the torch expression on the kernel's routed
    output, rounded op by op as it: in float32 within the ulp by which the kernel's exp and torch's sigmoid
    part; in bf16 within a rounding (the interpreter casts to bf16 towards zero, a GPU to nearest as torch)."""
    g = torch.Generator().manual_seed(seed)
    router, gate_up, down = _weights(12, 64, 48, dtype, g)
    x = torch.randn(t, 64, generator=g).to(DEVICE, dtype)
    idx, weights = moe.route(x, router, 4, True)
    shared = torch.randn(t, 64, generator=g).to(DEVICE, dtype)
    gate = (torch.randn(t, 1, generator=g) * 3).to(DEVICE, dtype)
    routed = moe.experts(x, gate_up, down, idx, weights)
    got = moe.experts(x, gate_up, down, idx, weights, shared=shared, shared_gate=gate)
    layer = routed + torch.sigmoid(gate) * shared
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(got, layer, **tol, msg=lambda m: f"seed {seed}: {m}")
    want = moe.experts_ref(x, gate_up, down, idx, weights, shared=shared, shared_gate=gate)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


# ---- gpt-oss: router bias and softmax over the top k, expert biases, the clamped SwiGLU, MXFP4 -------------
def _packed(e, rows, k, g, scale):
    """Random MXFP4 weights [e, rows, k]: any byte, group scales around 2^(scale - 127)."""
    blocks = torch.randint(0, 256, (e, rows, k // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(scale - 1, scale + 2, (e, rows, k // 32), generator=g).to(torch.uint8)
    return blocks.to(DEVICE), scales.to(DEVICE)


def _gpt_oss(e, h, i, dtype, g, mxfp4):
    """Weights whose gate/up pre-activations reach well past the clamp (limit 7)."""
    if mxfp4:
        gate_up, gu_scales = _packed(e, 2 * i, h, g, 124)  # |w| up to 6/8: |pre-activation| ~ 20
        down, dn_scales = _packed(e, h, i, g, 119)
        packed = dict(gate_up_scales=gu_scales, down_scales=dn_scales)
    else:
        gate_up = (torch.randn(e, 2 * i, h, generator=g) * 3 / h**0.5).to(DEVICE, dtype)
        down = (torch.randn(e, h, i, generator=g) / i**0.5).to(DEVICE, dtype)
        packed = {}
    biases = dict(gate_up_bias=torch.randn(e, 2 * i, generator=g).to(DEVICE, dtype),
                  down_bias=torch.randn(e, h, generator=g).to(DEVICE, dtype))
    router = (torch.randn(e, h, generator=g) * 4 / h**0.5).to(DEVICE, dtype)
    router_bias = torch.randn(e, generator=g).to(DEVICE, dtype)
    return router, router_bias, gate_up, down, packed | biases | dict(swiglu_limit=7.0, swiglu_alpha=1.702)


def test_mxfp4_dequantisation_decodes_every_nibble_and_scale():
    """Byte i of a group: element 2i in its low nibble, 2i + 1 in its high one; e2m1 values × 2^(s - 127)."""
    nibbles = torch.arange(16)
    blocks = (nibbles[None, :] | (nibbles[:, None] << 4)).to(torch.uint8)  # row r, byte j: low nibble j, high r
    scales = torch.tensor([127, 128, 120, 1] * 4, dtype=torch.uint8)[:, None]  # [rows, G=1]
    got = moe.dequantize_mxfp4(blocks[:, None, :], scales, torch.float32)  # [16 rows, 32]
    table = torch.tensor(moe.E2M1)
    assert table[8].signbit() and not table[0].signbit()  # nibble 8 is -0
    for r in range(16):
        want = torch.stack((table, table[r].expand(16)), dim=-1).flatten() * 2.0 ** (int(scales[r]) - 127)
        assert torch.equal(got[r], want) and torch.equal(got[r].signbit(), want.signbit()), r


@pytest.mark.parametrize("mxfp4", [False, True], ids=["dense", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 8, 10, 16, 32, 37])
def test_gpt_oss_experts_kernel_matches_the_reference(seed, dtype, t, mxfp4):
    g = torch.Generator().manual_seed(seed)
    router, router_bias, gate_up, down, kw = _gpt_oss(12, 64, 32, dtype, g, mxfp4)
    x = torch.randn(t, 64, generator=g).to(DEVICE, dtype)
    _, weights = moe.route_ref(x, router, 4, False, router_bias, softmax_after_topk=True)
    idx = torch.stack([torch.cat((torch.zeros(1, dtype=torch.int64), torch.randperm(11, generator=g)[:3] + 1))
                       for _ in range(t)]).to(DEVICE)
    want = moe.experts_ref(x, gate_up, down, idx, weights, **kw)
    got = moe.experts(x, gate_up, down, idx, weights, **kw)
    # bf16: outputs reach tens, and the epilogue rounds op by op (the interpreter rounds towards zero):
    # the tolerance is relative to the outputs' scale.
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"seed {seed}: {m}")
    # the clamp really bites: some gate pre-activations of the pairs are beyond the limit
    if dtype == torch.float32:
        w = moe.dequantize_mxfp4(gate_up, kw["gate_up_scales"], dtype) if mxfp4 else gate_up
        pre = torch.einsum("th,tkoh->tko", x, w[idx]) + kw["gate_up_bias"][idx]
        assert (pre[..., 0::2] > 7).any() and (pre[..., 1::2].abs() > 7).any()


def test_the_mxfp4_kernel_equals_the_dense_kernel_on_the_dequantised_weights(seed):
    g = torch.Generator().manual_seed(seed)
    router, router_bias, gate_up, down, kw = _gpt_oss(8, 96, 64, torch.float32, g, mxfp4=True)
    x = torch.randn(5, 96, generator=g).to(DEVICE)
    idx, weights = moe.route(x, router, 4, False, router_bias, softmax_after_topk=True)
    packed = moe.experts(x, gate_up, down, idx, weights, **kw)
    dense_kw = {k: v for k, v in kw.items() if not k.endswith("scales")}
    dense = moe.experts(x, moe.dequantize_mxfp4(gate_up, kw["gate_up_scales"], x.dtype),
                        moe.dequantize_mxfp4(down, kw["down_scales"], x.dtype), idx, weights, **dense_kw)
    torch.testing.assert_close(packed, dense, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_router_kernel_matches_the_reference(seed, dtype):
    """Bias added to the logits; the softmax runs over the k selected logits only, which sum to 1."""
    g = torch.Generator().manual_seed(seed)
    router, router_bias, *_ = _gpt_oss(40, 200, 8, dtype, g, mxfp4=False)
    x = torch.randn(9, 200, generator=g).to(DEVICE, dtype)
    idx, w = moe.route(x, router, 4, False, router_bias, softmax_after_topk=True)
    want_idx, want_w = moe.route_ref(x, router, 4, False, router_bias, softmax_after_topk=True)
    assert torch.equal(idx, want_idx), f"seed {seed}"
    torch.testing.assert_close(w, want_w, **TOL[dtype])
    logits = x.float() @ router.float().T + router_bias.float()
    assert torch.equal(idx, logits.to(dtype).topk(4).indices), "top-k of the biased logits"
    torch.testing.assert_close(w.float().sum(-1), torch.ones(9, device=DEVICE), **TOL[dtype])


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_a_gpt_oss_row_routes_and_computes_the_same_alone_or_in_any_block(seed, impl):
    """The batch-invariance test on the gpt-oss paths: router bias, softmax after top-k, MXFP4 experts."""
    route, experts = (moe.route_ref, moe.experts_ref) if impl == "reference" else (moe.route, moe.experts)
    g = torch.Generator().manual_seed(seed)
    router, router_bias, gate_up, down, kw = _gpt_oss(16, 64, 32, torch.float32, g, mxfp4=True)
    rows = torch.randn(32, 64, generator=g).to(DEVICE)
    alone = []
    for r in range(32):
        idx, w = route(rows[r:r + 1], router, 4, False, router_bias, softmax_after_topk=True)
        alone.append((idx, w, experts(rows[r:r + 1], gate_up, down, idx, w, **kw)))
    for size in (2, 7, 32):
        idx, w = route(rows[:size], router, 4, False, router_bias, softmax_after_topk=True)
        out = experts(rows[:size], gate_up, down, idx, w, **kw)
        for r in range(size):
            assert torch.equal(idx[r:r + 1], alone[r][0]), f"seed {seed}: routing of row {r} in a block of {size}"
            assert torch.equal(w[r:r + 1], alone[r][1]), f"seed {seed}: weights of row {r} in a block of {size}"
            assert torch.equal(out[r:r + 1], alone[r][2]), f"seed {seed}: output of row {r} in a block of {size}"


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # float32: the two tests above
@pytest.mark.parametrize("variant", ["renormalised", "plain", "gpt-oss"])
def test_a_row_s_routing_weights_are_the_same_alone_or_in_any_block(seed, dtype, variant):
    """Issue 24: the softmax, top-k and renormalisation run per row in `_top_k_kernel`, so a row's expert
    ids and weights are bit-identical alone and inside blocks of 2..32 (128 experts, top-8: Qwen3-MoE's)."""
    from .invariance import first_variant_row

    g = torch.Generator().manual_seed(seed)
    router = (torch.randn(128, 96, generator=g) * 4 / 96**0.5).to(DEVICE, dtype)
    bias = torch.randn(128, generator=g).to(DEVICE, dtype) if variant == "gpt-oss" else None
    x = torch.randn(32, 96, generator=g).to(DEVICE, dtype)
    kw = dict(bias=bias, softmax_after_topk=True) if variant == "gpt-oss" else {}
    assert first_variant_row(lambda a, b: moe.route(x[a:b], router, 8, variant == "renormalised", **kw)) is None, \
        f"seed {seed}"
    idx, w = moe.route(x, router, 8, variant == "renormalised", **kw)
    want_idx, want_w = moe.route_ref(x, router, 8, variant == "renormalised", **kw)
    # bf16 router logits tie often (128 of them, 8 bits of mantissa): the kernel takes the lowest id among
    # equals where torch.topk takes any, so the experts are compared by their logits, rank by rank.
    logits = moe.router_logits_ref(x, router, bias).to(dtype)
    torch.testing.assert_close(logits.gather(1, idx), logits.gather(1, want_idx), **TOL[dtype])
    assert (idx != want_idx).float().mean() < 0.1 if dtype == torch.bfloat16 else torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e,k", [(40, 4), (128, 8), (200, 6)], ids=["one block", "two blocks", "ragged blocks"])
@pytest.mark.parametrize("variant", ["renormalised", "plain", "gpt-oss"])
def test_routing_in_one_launch_is_the_two_launches_bit_for_bit(seed, dtype, e, k, variant):
    """Issue 26: the router's logits and the top-k in one launch (the last program of a row, by its ticket,
    runs the top-k) give the ids and weights of `_router_kernel` then `_top_k_kernel` bit for bit, and leave
    the row counters at zero (a second call, or a graph's replay, starts from them)."""
    from dflash_cli.kernels.invariant_linear import tickets

    g = torch.Generator().manual_seed(seed)
    router = (torch.randn(e, 96, generator=g) * 4 / 96**0.5).to(DEVICE, dtype)
    bias = torch.randn(e, generator=g).to(DEVICE, dtype) if variant == "gpt-oss" else None
    x = torch.randn(9, 96, generator=g).to(DEVICE, dtype)
    kw = dict(bias=bias, softmax_after_topk=variant == "gpt-oss")
    for _ in range(2):
        idx, w = moe.route(x, router, k, variant == "renormalised", **kw)
        assert not tickets(x.device, 9).any(), "the row counters are left at zero"
        want_idx, want_w = moe.route(x, router, k, variant == "renormalised", launches=2, **kw)
        assert torch.equal(idx, want_idx) and torch.equal(w, want_w), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 5, 32])
@pytest.mark.parametrize("variant", ["qwen3", "shared expert", "gpt-oss mxfp4"])
def test_the_combine_in_the_down_epilogue_is_the_combine_launch_bit_for_bit(seed, dtype, t, variant):
    """Issue 26: the last of a token's k expert programs (by its ticket on the token's counter) sums the k
    outputs in rank order, then (Qwen3.5-MoE) adds the gated shared expert, in the down launch: the bits of
    the separate `_combine_kernel` launch, over H blocks of several programs (H 160: 3 blocks of 64), with the
    counters left at zero."""
    from dflash_cli.kernels.invariant_linear import tickets

    g = torch.Generator().manual_seed(seed)
    e, h, i, k = 12, 160, 64, 4
    kw = {}
    if variant == "gpt-oss mxfp4":
        router, router_bias, gate_up, down, kw = _gpt_oss(e, h, i, dtype, g, mxfp4=True)
        route_kw = dict(bias=router_bias, softmax_after_topk=True)
    else:
        router, gate_up, down = _weights(e, h, i, dtype, g)
        route_kw = {}
    x = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    if variant == "shared expert":
        kw = dict(shared=torch.randn(t, h, generator=g).to(DEVICE, dtype),
                  shared_gate=torch.randn(t, 1, generator=g).to(DEVICE, dtype))
    idx, weights = moe.route(x, router, k, variant != "gpt-oss mxfp4", **route_kw)
    for _ in range(2):
        got = moe.experts(x, gate_up, down, idx, weights, **kw)
        assert not tickets(x.device, 1024).any(), "the counters are left at zero"
        want = moe.experts(x, gate_up, down, idx, weights, launches=3, **kw)
        assert torch.equal(got, want), f"seed {seed}"
    torch.testing.assert_close(got, moe.experts_ref(x, gate_up, down, idx, weights, **kw), **TOL[dtype])
