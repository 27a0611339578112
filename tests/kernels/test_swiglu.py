import pytest
import torch

from dflash_cli.kernels.swiglu import swiglu, swiglu_ref

from .conftest import DEVICE, TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, inter", [(1, 128), (3, 172), (16, 1500)])
def test_swiglu_matches_reference(seed, dtype, rows, inter):
    gate_up = torch.randn(rows, 2 * inter, dtype=dtype, device=DEVICE) * 3
    torch.testing.assert_close(swiglu(gate_up), swiglu_ref(gate_up), **TOL[dtype], msg=lambda m: f"seed {seed}: {m}")
