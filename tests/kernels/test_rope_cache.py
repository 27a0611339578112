import pytest
import torch

from dflash_cli.kernels.draft_kv import draft_ctx_kv, draft_ctx_kv_ref
from dflash_cli.kernels.rope_cache import qk_norm_rope_cache, qk_norm_rope_cache_ref
from dflash_cli.rope import rope_table

from .conftest import DEVICE, TOL, nan_like

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, hq, hkv, d, rot", [(1, 4, 2, 16, 16), (3, 8, 2, 64, 64), (16, 4, 4, 128, 128),
                                                 (5, 6, 3, 24, 24), (4, 4, 2, 256, 64), (2, 6, 2, 32, 8)])
@pytest.mark.parametrize("qk_norm", [True, False, "1+w"])
def test_norm_rope_and_cache_write(seed, dtype, t, hq, hkv, d, rot, qk_norm):
    """Full and partial rotation (Qwen3.5: 64 of 256 dims), with the Qwen3 q/k norm, the zero-centred
    one (float32 weights), or none (Llama)."""
    capacity = 50
    offset = qk_norm == "1+w"
    cos_sin = rope_table(rot, 10000.0, None if qk_norm else LLAMA3, 64, DEVICE)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=DEVICE)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], -1))  # strided views, as in the model
    norm_dtype = torch.float32 if offset else dtype
    q_norm = torch.randn(d, dtype=norm_dtype, device=DEVICE) if qk_norm else None
    k_norm = torch.randn(d, dtype=norm_dtype, device=DEVICE) if qk_norm else None
    positions = torch.randperm(capacity, device=DEVICE)[:t]  # any positions, not only a contiguous run
    caches = [nan_like((hkv, capacity, d), dtype) for _ in range(4)]
    qkv_before = qkv.clone()
    got = qk_norm_rope_cache(q, k, v, q_norm, k_norm, 1e-6, cos_sin, positions, caches[0], caches[1], offset)
    want = qk_norm_rope_cache_ref(q, k, v, q_norm, k_norm, 1e-6, cos_sin, positions, caches[2], caches[3], offset)
    msg = lambda m: f"seed {seed}: {m}"  # noqa: E731
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=msg)
    torch.testing.assert_close(caches[0][:, positions], caches[2][:, positions], **TOL[dtype], msg=msg)
    assert torch.equal(caches[1][:, positions], caches[3][:, positions]), f"seed {seed}"
    untouched = torch.ones(capacity, dtype=torch.bool, device=DEVICE)
    untouched[positions] = False
    assert caches[0][:, untouched].isnan().all() and caches[1][:, untouched].isnan().all(), f"seed {seed}"
    assert torch.equal(qkv, qkv_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, layers, hkv, d, hidden", [(1, 1, 2, 16, 64), (7, 5, 2, 32, 96), (16, 3, 4, 64, 200),
                                                        (3, 2, 2, 128, 96)])
@pytest.mark.parametrize("given", ["positions", "first"])  # [T] positions, or the 0-d first one (the rest follow)
def test_draft_context_kv(seed, dtype, t, layers, hkv, d, hidden, given):
    capacity = 40
    cos_sin = rope_table(d, 1e6, None, 64, DEVICE)
    ctx = torch.randn(t, hidden, dtype=dtype, device=DEVICE)
    w_kv = torch.randn(layers * 2 * hkv * d, hidden, dtype=dtype, device=DEVICE) / hidden**0.5
    k_norm = torch.randn(layers, d, dtype=dtype, device=DEVICE)
    start = int(torch.randint(0, capacity - t, (1,)))
    positions = torch.arange(start, start + t, device=DEVICE) if given == "positions" else \
        torch.tensor(start, device=DEVICE)
    caches = [nan_like((layers, hkv, capacity, d), dtype) for _ in range(4)]
    draft_ctx_kv(ctx, w_kv, k_norm, 1e-6, cos_sin, positions, caches[0], caches[1])
    draft_ctx_kv_ref(ctx, w_kv, k_norm, 1e-6, cos_sin, positions, caches[2], caches[3])
    written = slice(start, start + t)
    msg = lambda m: f"seed {seed}: {m}"  # noqa: E731
    torch.testing.assert_close(caches[0][:, :, written], caches[2][:, :, written], **TOL[dtype], msg=msg)
    torch.testing.assert_close(caches[1][:, :, written], caches[3][:, :, written], **TOL[dtype], msg=msg)
    for c in caches[:2]:
        assert c[:, :, :start].isnan().all() and c[:, :, start + t:].isnan().all(), f"seed {seed}"
