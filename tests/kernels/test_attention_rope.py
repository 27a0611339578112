"""The attention kernel's prologue (issue 26): q/k-norm, rope and the KV-cache write in the launch that reads them
(`attention(..., rope=Rope(...))`). It must be `qk_norm_rope_cache` then `attention` (the two-launch form) bit for
bit, output and caches, in fp32 and bf16; the torch references to a tolerance; and stay batch-invariant: a row's
output and its K/V rows the same bits alone (a decode step) as inside a block (a verify, a draft)."""
import pytest
import torch

from dflash_cli import ops, tree as trees
from dflash_cli.kernels import rope_cache
from dflash_cli.kernels.attention import SPLIT, Rope, attention, attention_ref
from dflash_cli.kernels.rope_cache import qk_norm_rope_cache, qk_norm_rope_cache_ref
from dflash_cli.rope import rope_table

from .conftest import DEVICE, TOL, nan_like
from .invariance import first_variant_row

YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 64}


def _inputs(t, hq, hkv, d, rot, dtype, norm, length, gated=False, rope_scaling=None):
    """The projection's rows as the layer splits them (strided views), the norms, the rope table, positions
    length.., and a cache whose committed rows are random and whose other rows are NaN."""
    capacity = length + t + 24
    cos_sin = rope_table(rot, 10000.0, rope_scaling, capacity + 8, DEVICE)
    qkv = torch.randn(t, ((2 if gated else 1) * hq + 2 * hkv) * d, dtype=dtype, device=DEVICE)
    parts = qkv.split([hq * d] * (2 if gated else 1) + [hkv * d] * 2, -1)
    q, k, v = (x.view(t, -1, d) for x in (parts[0], *parts[-2:]))
    gate = parts[1].view(t, hq, d) if gated else None
    norm_dtype = torch.float32 if norm == "1+w" else dtype
    q_norm, k_norm = (torch.randn(d, dtype=norm_dtype, device=DEVICE) if norm else None for _ in range(2))
    caches = []
    for _ in range(2):
        c = nan_like((hkv, capacity, d), dtype)
        c[:, :length] = torch.randn(hkv, length, d, dtype=dtype, device=DEVICE)
        caches.append(c)
    rope = Rope(k, v, q_norm, k_norm, 1e-6, cos_sin, torch.arange(length, length + t, device=DEVICE), norm == "1+w")
    return q, rope, caches, gate


def _two_launches(q, rope, caches, kv_len, **kw):
    """qk_norm_rope_cache then attention, on copies of the caches: (out, k cache, v cache)."""
    kc, vc = (c.clone() for c in caches)
    qr = qk_norm_rope_cache(q, rope.k, rope.v, rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin, rope.positions, kc,
                            vc, rope.offset)
    return attention(qr, kc, vc, kv_len, **kw), kc, vc


def _fused(q, rope, caches, kv_len, **kw):
    kc, vc = (c.clone() for c in caches)
    return attention(q, kc, vc, kv_len, rope=rope, **kw), kc, vc


# (tokens, heads, kv heads, head size, rotated dims, q/k norm, committed length, causal, window, sinks, gate, yarn)
CASES = {
    "decode": (1, 4, 2, 16, 16, True, 37, True, None, False, False, False),
    "verify across the split boundary": (5, 8, 2, 64, 64, True, SPLIT - 3, True, None, False, False, False),
    "Llama (no norm), two row blocks": (17, 4, 1, 32, 32, False, 30, True, None, False, False, False),
    "odd head size": (3, 6, 3, 24, 24, True, 9, True, None, False, False, False),
    "Qwen3.5 gated, 64 of 256 rotated, (1 + w)": (4, 4, 2, 256, 64, "1+w", 20, True, None, False, True, False),
    "gpt-oss window sinks yarn": (4, 16, 2, 16, 16, False, SPLIT - 2, True, 5, True, False, True),
    "drafter (bidirectional block)": (16, 8, 2, 32, 32, True, SPLIT - 9, False, None, False, False, False),
    "partial rotary 8 of 32": (2, 6, 2, 32, 8, True, 11, True, None, False, False, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_the_prologue_is_the_two_launch_form_bit_for_bit(seed, dtype, case):
    t, hq, hkv, d, rot, norm, length, causal, window, sinks, gated, yarn = CASES[case]
    q, rope, caches, gate = _inputs(t, hq, hkv, d, rot, dtype, norm, length, gated, YARN if yarn else None)
    kv_len = torch.tensor(length + t, device=DEVICE)
    kw = dict(causal=causal, scale=d**-0.5, sliding_window=window,
              sinks=torch.randn(hq, device=DEVICE) * 2 if sinks else None, gate=gate)
    raw = [x.clone() for x in (q, rope.k, rope.v)]
    got, kc, vc = _fused(q, rope, caches, kv_len, **kw)
    want, kc2, vc2 = _two_launches(q, rope, caches, kv_len, **kw)
    assert torch.equal(got, want), f"seed {seed}: the output differs from the two-launch form"
    assert torch.equal(kc.nan_to_num(), kc2.nan_to_num()), f"seed {seed}: the K cache differs"
    assert torch.equal(vc.nan_to_num(), vc2.nan_to_num()), f"seed {seed}: the V cache differs"
    assert kc[:, length + t:].isnan().all() and vc[:, length + t:].isnan().all(), "a row past the new ones written"
    assert not kc[:, length:length + t].isnan().any() and not vc[:, length:length + t].isnan().any()
    assert all(torch.equal(a, b) for a, b in zip(raw, (q, rope.k, rope.v))), "the projection's rows were changed"
    # and the torch references, to a tolerance
    kr, vr = (c.clone() for c in caches)
    qr = qk_norm_rope_cache_ref(q, rope.k, rope.v, rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin, rope.positions,
                                kr, vr, rope.offset)
    ref = attention_ref(qr, kr, vr, kv_len, **kw)
    torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(kc, kr, equal_nan=True, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_and_its_cache_rows_are_the_same_bits_alone_and_in_a_block(seed, dtype):
    """Rows around the first split boundary: each run alone as a decode step (kv_len = its position + 1) and in
    blocks of 2, 5 and 16 (a verify): the same output bits and the same K/V rows written."""
    rows, hq, hkv, d, length = 16, 8, 2, 16, SPLIT - 8
    q, rope, caches, _ = _inputs(rows, hq, hkv, d, d, dtype, True, length)
    decoded = [c.clone() for c in caches]  # the cache as decoding all 16 rows leaves it (the two-launch form)
    qk_norm_rope_cache(q, rope.k, rope.v, rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin, rope.positions, *decoded)

    def step(start, stop):
        kc, vc = (c.clone() for c in decoded)
        kc[:, length + start:length + stop] = float("nan")  # the launch must write its own rows
        vc[:, length + start:length + stop] = float("nan")
        part = Rope(rope.k[start:stop], rope.v[start:stop], rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin,
                    rope.positions[start:stop])
        out = attention(q[start:stop], kc, vc, torch.tensor(length + stop, device=DEVICE), causal=True,
                        scale=d**-0.5, rope=part)
        new = slice(length + start, length + stop)
        return out, kc[:, new].transpose(0, 1), vc[:, new].transpose(0, 1)

    assert first_variant_row(step, rows, blocks=(2, 5, 16)) is None, f"seed {seed}"
    alone = step(3, 4)
    assert torch.equal(alone[1][0], decoded[0][:, length + 3]), f"seed {seed}: a decode step's K row"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, sinks", [(None, False), (6, True)])
def test_a_tree_verify_is_the_two_launch_form_bit_for_bit(seed, dtype, window, sinks):
    """A tree's nodes rotated at their positions (length + depth, repeated among siblings), written at their rows
    (length + node), across the first split boundary: output and caches as qk_norm_rope_cache(rows=) then the
    tree attention. (That form's nodes are the bits of decoding their paths: tests/kernels/test_attention_tree.py.)"""
    budget, hq, hkv, d, length = 12, 8, 2, 32, SPLIT - 5
    g = torch.Generator().manual_seed(seed)
    tree = trees.build(torch.tensor([1]), torch.randn(5, 6, generator=g), budget)
    assert int(tree.depths.max()) >= 3 and len(set(tree.parents.tolist())) > 2
    q, rope, caches, _ = _inputs(budget, hq, hkv, d, d, dtype, True, length)
    capacity = caches[0].shape[1]
    mask, _ = trees.attention_mask(tree, torch.tensor(length), capacity)
    positions, rows = (length + tree.depths).to(DEVICE), torch.arange(length, length + budget, device=DEVICE)
    rope = Rope(rope.k, rope.v, rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin, positions)
    kv_len = torch.tensor(length + budget, device=DEVICE)
    kw = dict(causal=True, scale=d**-0.5, sliding_window=window,
              sinks=torch.randn(hq, device=DEVICE) if sinks else None, tree=(mask, positions))
    kc, vc = (c.clone() for c in caches)
    got = attention(q, kc, vc, kv_len, rope=rope, **kw)
    kc2, vc2 = (c.clone() for c in caches)
    qr = qk_norm_rope_cache(q, rope.k, rope.v, rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin, positions, kc2, vc2,
                            rows=rows)
    want = attention(qr, kc2, vc2, kv_len, **kw)
    assert torch.equal(got, want), f"seed {seed}"
    assert torch.equal(kc.nan_to_num(), kc2.nan_to_num()) and torch.equal(vc.nan_to_num(), vc2.nan_to_num())
    assert not kc[:, length:length + budget].isnan().any() and kc[:, length + budget:].isnan().all()


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("qk_norm_rope_cache's kernel was launched")


def test_on_the_kernels_a_steps_rows_take_one_launch_and_a_prefill_chunk_two(seed, monkeypatch):
    """ops.rope_attention: a step's rows (up to MAX_KERNEL_Q_LEN) never launch the separate rope/cache kernel on
    the kernel path, and equal the torch path; a prefill chunk runs the two ops, as before."""
    q, rope, caches, _ = _inputs(3, 4, 2, 16, 16, torch.float32, True, 20)
    args = (q, rope.k, rope.v, rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin, rope.positions)
    kw = dict(causal=True, scale=0.25)
    torch_caches = [c.clone() for c in caches]
    want = ops.rope_attention(*args, *torch_caches, torch.tensor(23), **kw)
    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    with monkeypatch.context() as m:
        m.setattr(rope_cache, "_qk_norm_rope_cache_kernel", _NoLaunch())
        got = ops.rope_attention(*args, *caches, torch.tensor(23), **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(caches[0], torch_caches[0], equal_nan=True, **TOL[torch.float32])
    q, rope, caches, _ = _inputs(ops.MAX_KERNEL_Q_LEN + 1, 4, 2, 16, 16, torch.float32, True, 5)
    monkeypatch.setattr(rope_cache, "_qk_norm_rope_cache_kernel", _NoLaunch())
    with pytest.raises(AssertionError, match="was launched"):
        ops.rope_attention(q, rope.k, rope.v, rope.q_norm, rope.k_norm, rope.eps, rope.cos_sin, rope.positions,
                           *caches, 5 + q.shape[0], **kw)
