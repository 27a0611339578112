import pytest
import torch

from dflash_cli.kernels.dynamic_conv import dynamic_conv, dynamic_conv_ref

from .conftest import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("taps, length, hidden, groups", [(2, 8, 64, 4), (1, 3, 16, 16), (3, 5, 48, 3), (4, 1, 8, 1),
                                                          (4, 16, 1100, 4)])
def test_the_kernel_is_the_reference_bit_for_bit(seed, dtype, taps, length, hidden, groups):
    """Every product and sum rounded as the reference's torch ops round them: equal bit for bit, in bf16 too;
    the dynamic part read through one side of the [L, 2, K, G] kernels (a strided view), as the drafter does."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(length, hidden, generator=g).to(dtype).to(DEVICE)
    base = torch.randn(2, taps, hidden, generator=g).to(dtype).to(DEVICE)
    both = torch.randn(length, 2, taps, groups, generator=g).to(dtype).to(DEVICE)
    for side in (0, 1):
        got = dynamic_conv(z, base[side], both[:, side])
        want = dynamic_conv_ref(z, base[side], both[:, side])
        assert got.dtype == want.dtype and torch.equal(got, want), f"seed {seed}, side {side}"


def test_an_identity_base_with_no_dynamic_part_is_the_input():
    z = torch.randn(6, 32, device=DEVICE).to(torch.bfloat16)
    base = torch.zeros(3, 32, device=DEVICE, dtype=torch.bfloat16)
    base[0] = 1
    assert torch.equal(dynamic_conv(z, base, torch.zeros(6, 3, 4, device=DEVICE)), z)


def test_rows_above_the_first_are_zeros():
    """Row t sees rows t, t - 1, ... only: changing row 3 changes no output row before it."""
    z = torch.randn(5, 16, device=DEVICE)
    base, dynamic = torch.randn(3, 16, device=DEVICE), torch.randn(5, 3, 2, device=DEVICE)
    before = dynamic_conv(z, base, dynamic)
    z[3] += 1
    after = dynamic_conv(z, base, dynamic)
    assert torch.equal(before[:3], after[:3]) and not torch.equal(before[3:], after[3:])
