import pytest
import torch

from dflash_cli.kernels.embed_block import embed_block, embed_block_ref

from .conftest import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, vocab, hidden", [(2, 50, 16), (8, 300, 96), (16, 1000, 1100)])
def test_the_block_input_is_the_lookup_bit_for_bit(seed, dtype, b, vocab, hidden):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, hidden, generator=g).to(dtype).to(DEVICE)
    bonus = torch.randint(0, vocab, (1,), generator=g).to(DEVICE)
    mask = torch.full((b - 1,), vocab - 1, dtype=torch.int64, device=DEVICE)
    ids, x = embed_block(bonus, mask, table)
    want_ids, want_x = embed_block_ref(bonus, mask, table)
    assert ids.tolist() == want_ids.tolist() == [int(bonus)] + [vocab - 1] * (b - 1), f"seed {seed}"
    assert torch.equal(x, want_x), f"seed {seed}"
