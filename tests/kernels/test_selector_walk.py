import pytest
import torch

from dflash_cli.kernels.selector_walk import selector_walk, selector_walk_ref

from .conftest import DEVICE


@pytest.mark.parametrize("rows, k", [(1, 2), (3, 4), (7, 5), (15, 32)])
def test_the_walk_is_the_reference_walk(seed, rows, k):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, k, k, generator=g).to(DEVICE)
    scores[0] = scores[0, :1]  # row 0: every predecessor is the anchor
    candidates = torch.randint(0, 1000, (rows, k), generator=g).to(DEVICE)
    want = selector_walk_ref(scores, candidates)
    assert torch.equal(selector_walk(scores, candidates), want), f"seed {seed}"
    out = torch.full((rows + 1,), -1, dtype=torch.int64, device=DEVICE)
    selector_walk(scores, candidates, out=out[1:])
    assert out[0] == -1 and torch.equal(out[1:], want)


def test_ties_go_to_the_first_candidate_and_the_walk_follows_its_choice():
    scores = torch.zeros(2, 3, 3, device=DEVICE)
    scores[0, :, 1] = scores[0, :, 2] = 1.0  # row 0: candidates 1 and 2 tie: 1 is taken
    scores[1, 1, 0] = 5.0  # after candidate 1, row 1 takes candidate 0 (after 2 it would take another)
    scores[1, 2, 2] = 9.0
    candidates = torch.tensor([[10, 11, 12], [20, 21, 22]], device=DEVICE)
    assert selector_walk(scores, candidates).tolist() == selector_walk_ref(scores, candidates).tolist() == [11, 20]
