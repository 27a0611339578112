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
