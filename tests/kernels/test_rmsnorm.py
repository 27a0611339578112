import pytest
import torch

from dflash_cli.kernels.rmsnorm import rms_norm, rms_norm_ref

from .conftest import DEVICE, TOL
from .invariance import BLOCKS, first_variant_row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (16, 200), (3, 1000), (2, 3, 96), (2, 9000)],
                         ids=lambda s: "x".join(map(str, s)))  # 9000: wider than one block, walked in chunks
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("offset", [False, True], ids=["w", "1+w"])
def test_rms_norm_matches_reference(seed, dtype, shape, with_residual, offset):
    """Both conventions: w times the rounded normalised row (Qwen3, Llama), and the zero-centred (1 + w)
    applied in float32 with one rounding (Qwen3.5, whose norm weights load as float32)."""
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    w = torch.randn(shape[-1], dtype=torch.float32 if offset else dtype, device=DEVICE)
    res = torch.randn(shape, dtype=dtype, device=DEVICE) * 4 if with_residual else None
    x_before = x.clone()
    got, got_res = rms_norm(x, w, 1e-6, res.clone() if with_residual else None, offset)
    want, want_res = rms_norm_ref(x, w, 1e-6, res.clone() if with_residual else None, offset)
    msg = lambda m: f"seed {seed}: {m}"  # noqa: E731
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=msg)
    assert torch.equal(x, x_before)
    if with_residual and (dtype == torch.float32 or DEVICE == "cuda"):
        assert torch.equal(got_res, want_res), f"seed {seed}: the residual sum is rounded as torch rounds it"
    elif with_residual:  # Triton's interpreter rounds float32 -> bfloat16 towards zero, GPUs to nearest
        torch.testing.assert_close(got_res, want_res, **TOL[dtype], msg=msg)
    else:
        assert got_res is None


def test_the_residual_is_updated_in_place_and_returned(seed):
    x, res = torch.randn(3, 96, device=DEVICE), torch.randn(3, 96, device=DEVICE)
    want = res + x
    _, out_res = rms_norm(x, torch.ones(96, device=DEVICE), 1e-6, res)
    assert out_res is res and torch.equal(res, want), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (2, 9000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpt_oss_norm_applies_its_fp32_weight_before_the_one_rounding(seed, dtype, shape, with_residual):
    """gpt-oss keeps its norm weights in float32 and rounds (w · normed) once: not the Qwen3 order."""
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    w = torch.randn(shape[-1], dtype=torch.float32, device=DEVICE)
    res = torch.randn(shape, dtype=dtype, device=DEVICE) * 4 if with_residual else None
    got, _ = rms_norm(x, w, 1e-5, res.clone() if with_residual else None, fp32_weight=True)
    want, _ = rms_norm_ref(x, w, 1e-5, res.clone() if with_residual else None, fp32_weight=True)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    total = (x.float() + res.float()).to(dtype).float() if with_residual else x.float()
    exact = (w * (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5))).to(dtype)
    torch.testing.assert_close(want, exact, rtol=0, atol=0)  # the reference is transformers' GptOssRMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [96, 9000], ids=["one-block", "chunked"])
@pytest.mark.parametrize("variant", ["w", "1+w", "fp32-w", "residual"])
def test_a_row_is_normed_the_same_alone_or_in_any_block(seed, dtype, width, variant):
    """Bit-identical (issue 24): one program per row, its block from the width alone, never the row count."""
    x = torch.randn(32, width, dtype=dtype, device=DEVICE)
    res = torch.randn(32, width, dtype=dtype, device=DEVICE) * 4
    w = torch.randn(width, dtype=torch.float32 if variant in ("1+w", "fp32-w") else dtype, device=DEVICE)
    kw = dict(offset=variant == "1+w", fp32_weight=variant == "fp32-w")

    def step(a, b):
        out, r = rms_norm(x[a:b], w, 1e-6, res[a:b].clone() if variant == "residual" else None, **kw)
        return (out,) if r is None else (out, r)
    assert first_variant_row(step, blocks=(2, 5, 32) if width > 8192 else BLOCKS) is None, f"seed {seed}"
