import pytest
import torch

from dflash_cli.kernels.rmsnorm import rms_norm, rms_norm_ref

from .conftest import DEVICE, TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(1, 64), (5, 96), (16, 200), (3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(seed, dtype, rows, width, with_residual):
    x = torch.randn(rows, width, dtype=dtype, device=DEVICE)
    w = torch.randn(width, dtype=dtype, device=DEVICE)
    res = torch.randn(rows, width, dtype=dtype, device=DEVICE) if with_residual else None
    got, got_res = rms_norm(x, w, 1e-6, res.clone() if with_residual else None)
    want, want_res = rms_norm_ref(x, w, 1e-6, res.clone() if with_residual else None)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
    if with_residual:
        torch.testing.assert_close(got_res, want_res, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
