import pytest
import torch

from dflash_cli.kernels.swiglu import swiglu, swiglu_ref

from .conftest import DEVICE, TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (3, 172), (16, 1500), (2, 3, 200)], ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_reference(seed, dtype, shape):
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=DEVICE) * 3
    got, want = swiglu(gate_up), swiglu_ref(gate_up)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
