import pytest
import torch

from dflash_cli.kernels.attention import attention, attention_ref

from .conftest import DEVICE, TOL


def _inputs(q_len, hq, hkv, d, capacity, kv_len, dtype):
    q = torch.randn(q_len, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    v = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    k[:, kv_len:] = float("nan")  # slots past the valid length must never be read
    v[:, kv_len:] = float("nan")
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len, hq, hkv, d, capacity, kv_len", [
    (1, 4, 2, 16, 100, 37),      # decode
    (3, 8, 2, 64, 300, 130),     # a short verify block, GQA 4
    (16, 4, 1, 16, 1100, 700),   # B = 16, several splits, a length off every block boundary
    (5, 6, 3, 24, 90, 90),       # odd head size, cache full
    (16, 4, 4, 32, 64, 16),      # the block is the whole context
    (3, 4, 2, 128, 2100, 2001),  # Qwen3/Llama head size, every split busy
    (17, 4, 1, 32, 300, 200),    # 17 tokens × GQA 4 = 68 query rows: two row blocks of 64
    (16, 4, 1, 256, 400, 301),   # Qwen3.5/3.6 head size (its 16-key steps on sm_86/89), a verify block
])
@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (False, 13), (True, 7), (True, 1)])
def test_attention_matches_reference(seed, dtype, q_len, hq, hkv, d, capacity, kv_len, causal, window):
    q, k, v = _inputs(q_len, hq, hkv, d, capacity, kv_len, dtype)
    length = torch.tensor(kv_len, device=DEVICE)
    got = attention(q, k, v, length, causal=causal, scale=d**-0.5, sliding_window=window)
    want = attention_ref(q, k, v, length, causal=causal, scale=d**-0.5, sliding_window=window)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_the_length_is_read_on_the_device(seed, causal):
    """One launch configuration (as a CUDA graph replays it) serves every length: only the value
    in the length tensor changes between calls."""
    q_len, capacity = 4, 600
    q, k, v = _inputs(q_len, 8, 2, 32, capacity, capacity, torch.float32)
    length = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for kv_len in (q_len, 33, 300, 511, capacity):
        length.fill_(kv_len)
        got = attention(q, k, v, length, causal=causal, scale=0.2)
        want = attention_ref(q, k, v, length, causal=causal, scale=0.2)
        torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"seed {seed}, {kv_len}: {m}")


@pytest.mark.parametrize("q_len, hq, hkv, kv_len", [(40, 8, 2, 40), (40, 8, 2, 300), (1, 4, 1, 9), (7, 4, 4, 7)])
def test_the_reference_gpu_mask_is_the_explicit_causal_mask(seed, q_len, hq, hkv, kv_len):
    """On CUDA the reference passes `causal_lower_right` instead of a boolean mask (so SDPA may use
    flash attention for a prefill chunk). Both must mean the same: the queries are the last q_len
    positions, GQA included. Checked here on the CPU, where torch materialises the bias."""
    from torch.nn.attention.bias import causal_lower_right

    d = 16
    q, k, v = _inputs(q_len, hq, hkv, d, kv_len, kv_len, torch.float32)
    want = attention_ref(q, k, v, torch.tensor(kv_len), causal=True, scale=d**-0.5)
    got = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=causal_lower_right(q_len, kv_len), scale=d**-0.5,
        enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("causal, window", [(True, None), (True, 24)])
@pytest.mark.slow
def test_a_prefill_chunk_through_the_kernel(seed, causal, window):
    """The path for chunks SDPA cannot flash (fp32, windows): 100 tokens × GQA 2, several row blocks."""
    q, k, v = _inputs(100, 4, 2, 32, 300, 250, torch.float32)
    length = torch.tensor(250, device=DEVICE)
    got = attention(q, k, v, length, causal=causal, scale=0.2, sliding_window=window)
    want = attention_ref(q, k, v, length, causal=causal, scale=0.2, sliding_window=window)
    torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")


def test_prefill_chunks_take_flash_attention_only_where_sdpa_can():
    """A prefill chunk goes to SDPA only when SDPA can take its flash path (bf16/fp16, causal, no window,
    GQA through the lower-right bias); otherwise (fp32 on CUDA, a window) to the split-K kernel, whose
    memory does not grow with chunk × context as SDPA's math fallback does."""
    from dflash_cli.kernels.attention import _LOWER_RIGHT_GQA
    from dflash_cli.ops import flash_prefill

    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert flash_prefill(bf16, True, None) == _LOWER_RIGHT_GQA
    assert not flash_prefill(fp32, True, None) and not flash_prefill(bf16, True, 128)
    assert not flash_prefill(bf16, False, None)


def _eager_with_sinks(q, k, v, kv_len, causal, window, scale, sinks):
    """transformers' eager gpt-oss attention, written out: the sink is one more logit per head,
    its share of the softmax dropped."""
    n, tq, group = kv_len, q.shape[0], q.shape[1] // k.shape[0]
    kf = k[:, :n].repeat_interleave(group, 0).float()
    vf = v[:, :n].repeat_interleave(group, 0).float()
    s = torch.einsum("thd,hnd->htn", q.float(), kf) * scale
    q_pos, k_pos = torch.arange(n - tq, n)[:, None], torch.arange(n)[None, :]
    visible = (k_pos <= q_pos) if causal else torch.ones(tq, n, dtype=torch.bool)
    if window is not None:
        visible &= q_pos - k_pos < window
    s = s.masked_fill(~visible.to(s.device), float("-inf"))
    full = torch.cat((s, sinks.float()[:, None, None].expand(-1, tq, 1)), dim=-1).softmax(-1)[..., :-1]
    return torch.einsum("htn,hnd->thd", full, vf)


@pytest.mark.parametrize("dtype, causal, window", [
    (torch.float32, True, None), (torch.float32, True, 128), (torch.float32, True, 7), (torch.float32, False, 13),
    (torch.bfloat16, True, 128)])
def test_attention_with_sinks_matches_reference_for_every_split_size(seed, dtype, causal, window):
    """gpt-oss: sinks fold into the merge of the splits (m* = max(m_s, sink), l = Σ l_s e^(m_s - m*) +
    e^(sink - m*)). Split sizes over 520 keys of a 600-key cache: 19 splits of 32 (17 hold keys: two
    merge chunks), 7 of 96 (the seventh none), 5 of 128, 3 of 256, one of 512 or 1024; with a window,
    only the splits it reaches hold visible keys."""
    q_len, hq, hkv, d, capacity, kv_len = 3, 4, 2, 16, 600, 520
    q, k, v = _inputs(q_len, hq, hkv, d, capacity, kv_len, dtype)
    sinks = torch.randn(hq, device=DEVICE) * 2  # some heads' sinks outweigh their keys, some not
    length = torch.tensor(kv_len, device=DEVICE)
    want = attention_ref(q, k, v, length, causal=causal, scale=d**-0.5, sliding_window=window, sinks=sinks)
    eager = _eager_with_sinks(q, k, v, kv_len, causal, window, d**-0.5, sinks)
    torch.testing.assert_close(want.float(), eager, **TOL[dtype], msg=lambda m: f"seed {seed}, reference: {m}")
    for split in (32, 96, 128, 256, 512, 1024):
        got = attention(q, k, v, length, causal=causal, scale=d**-0.5, sliding_window=window, sinks=sinks,
                        split=split)
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}, splits of {split}: {m}")


def test_sinks_change_the_output(seed):
    """A sink only ever takes probability mass: the output is the sink-free one scaled per head by
    sigmoid(lse - sink), never equal to it."""
    q, k, v = _inputs(3, 4, 2, 16, 64, 40, torch.float32)
    length = torch.tensor(40, device=DEVICE)
    sinks = torch.tensor([-1.0, 0.0, 1.0, 3.0], device=DEVICE)
    plain = attention(q, k, v, length, causal=True, scale=0.25)
    with_sinks = attention(q, k, v, length, causal=True, scale=0.25, sinks=sinks)
    ratio = with_sinks / plain
    assert (ratio < 1).all() and (ratio > 0).all(), f"seed {seed}"
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-5)  # one factor per head


@pytest.mark.parametrize("q_len, kv_len", [(40, 40), (64, 150), (33, 200)])
@pytest.mark.slow
def test_a_long_prefill_chunk_with_sinks_runs_through_the_kernel(seed, monkeypatch, q_len, kv_len):
    """SDPA has no sinks: a prefill chunk longer than the split kernel's decode shapes goes through the
    kernel (the reference on a CPU), over a window shorter than the chunk."""
    from dflash_cli import ops

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    q, k, v = _inputs(q_len, 4, 2, 16, kv_len + 8, kv_len, torch.float32)
    sinks = torch.randn(4, device=DEVICE)
    got = ops.attention(q, k, v, kv_len, causal=True, scale=0.25, sliding_window=16, sinks=sinks)
    want = attention_ref(q, k, v, torch.tensor(kv_len), causal=True, scale=0.25, sliding_window=16, sinks=sinks)
    torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")


def test_a_long_fp32_prefill_chunk_on_the_gpu_goes_through_the_split_kernel(seed, monkeypatch):
    """ops.attention's GPU branch for a chunk longer than MAX_KERNEL_Q_LEN that SDPA cannot flash (fp32):
    the split-K kernel, not SDPA, whose math fallback would hold chunk × context scores (run on the CPU
    under the stand-in for torch.cuda, tests/fake_cuda.py)."""
    from dflash_cli import ops

    from ..fake_cuda import stand_in

    q, k, v = _inputs(ops.MAX_KERNEL_Q_LEN + 8, 4, 2, 32, 64, 60, torch.float32)
    length = torch.tensor(60, device=DEVICE)
    chosen, real = [], ops._impl
    monkeypatch.setattr(ops, "_impl", lambda name, triton: (chosen.append((name, triton)), real(name, triton))[1])
    with stand_in(kernels="triton"):
        got = ops.attention(q, k, v, 60, causal=True, scale=0.2)
    assert ("attention", True) in chosen
    want = attention_ref(q, k, v, length, causal=True, scale=0.2)
    torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"seed {seed}: {m}")


# ---- one launch: the split to finish last merges (issue 26) ----------------------------------------------------
ONE_LAUNCH_CASES = [  # (q_len, hq, hkv, d, capacity, kv_len, causal, window, sinks, split)
    (1, 4, 2, 16, 600, 537, True, None, False, None),   # decode over three splits
    (16, 8, 2, 32, 700, 611, True, None, False, 64),     # verify, ten splits of 64: two merge chunks
    (17, 4, 1, 32, 300, 200, True, 40, True, 32),       # two row blocks, a window that skips splits, sinks
    (5, 6, 3, 24, 90, 90, False, None, False, None),    # a drafter block, odd head size
    (3, 4, 2, 256, 400, 301, True, None, True, 64),     # 256-wide heads: 4 merge rows per step
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ONE_LAUNCH_CASES)
def test_one_launch_gives_the_two_launch_bits_and_leaves_its_counters_zero(seed, dtype, case):
    """The merge done by the last split to finish is the two-launch merge, bit for bit; the ticket counters
    are zero again afterwards, so the next launch (or a replayed graph) starts from the same state."""
    from dflash_cli.kernels import attention as attention_mod

    q_len, hq, hkv, d, capacity, kv_len, causal, window, sinks, split = case
    q, k, v = _inputs(q_len, hq, hkv, d, capacity, kv_len, dtype)
    kw = dict(causal=causal, scale=d**-0.5, sliding_window=window, split=split,
              sinks=torch.randn(hq, device=DEVICE) * 2 if sinks else None)
    length = torch.tensor(kv_len, device=DEVICE)
    two = attention(q, k, v, length, one_launch=False, **kw)
    one = attention(q, k, v, length, **kw)
    assert not one.isnan().any()
    assert torch.equal(one, two), f"seed {seed}"
    assert all(int(c.count_nonzero()) == 0 for c in attention_mod._COUNTERS.values())
    assert torch.equal(attention(q, k, v, length, **kw), one), f"seed {seed}: a second launch differs"


def test_attention_is_one_launch(monkeypatch):
    """Decode, verify and draft attention: one kernel launch, whatever the split count."""
    from dflash_cli.kernels import attention as attention_mod

    launched = []
    for name in ("_attn_kernel", "_attn_merge_kernel"):
        kernel = getattr(attention_mod, name)
        monkeypatch.setattr(attention_mod, name, type("Counted", (), {
            "__getitem__": lambda self, grid, name=name, kernel=kernel: (launched.append(name), kernel[grid])[1]})())
    q, k, v = _inputs(4, 4, 2, 16, 600, 550, torch.float32)
    attention(q, k, v, torch.tensor(550), causal=True, scale=0.25)
    assert launched == ["_attn_kernel"]


# ---- the output gate in the merge (Qwen3.5's gated attention) --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len, kv_len, split", [(1, 300, None), (16, 611, 64), (17, 200, 32)])
def test_the_output_gate_in_the_merge_is_the_torch_ops(seed, dtype, q_len, kv_len, split):
    """attention × sigmoid(gate) in the merging program = the kernel's attention, then torch's sigmoid and
    product in the same dtype: bit for bit in bf16 (each rounding where torch rounds), to an ulp of the
    exponential in fp32. The gate is a strided view of the q/(gate)/k/v projection, as the layer passes it."""
    hq, hkv, d = 8, 2, 32
    q, k, v = _inputs(q_len, hq, hkv, d, 700, kv_len, dtype)
    qkv = torch.randn(q_len, 2 * hq * d + 16, dtype=dtype, device=DEVICE) * 3
    gate = qkv[:, hq * d:2 * hq * d].view(q_len, hq, d)
    length = torch.tensor(kv_len, device=DEVICE)
    kw = dict(causal=True, scale=d**-0.5, split=split)
    got = attention(q, k, v, length, gate=gate, **kw)
    want = attention(q, k, v, length, **kw) * torch.sigmoid(gate)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want), f"seed {seed}: {(got != want).sum()} elements differ"
    else:
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7, msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(attention(q, k, v, length, gate=gate, one_launch=False, **kw), got)
    ref = attention_ref(q, k, v, length, causal=True, scale=d**-0.5, gate=gate)
    torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
