import pytest
import torch

from dflash_cli.kernels.attention import attention, attention_ref

from .conftest import DEVICE, TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len, hq, hkv, d, capacity, kv_len", [
    (1, 4, 2, 16, 100, 37),      # decode
    (3, 8, 2, 64, 300, 130),     # a short verify block, GQA 4
    (16, 4, 1, 16, 1100, 700),   # B = 16, several splits, a length off every block boundary
    (5, 6, 3, 24, 90, 90),       # odd head size, cache full
    (16, 4, 4, 32, 64, 16),      # the block is the whole context
])
@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (False, 13), (True, 7)])
def test_attention_matches_reference(seed, dtype, q_len, hq, hkv, d, capacity, kv_len, causal, window):
    q = torch.randn(q_len, hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    v = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    k[:, kv_len:] = float("nan")  # slots past the valid length must never be read
    v[:, kv_len:] = float("nan")
    length = torch.tensor(kv_len, device=DEVICE)
    got = attention(q, k, v, length, causal=causal, scale=d**-0.5, sliding_window=window)
    want = attention_ref(q, k, v, length, causal=causal, scale=d**-0.5, sliding_window=window)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
