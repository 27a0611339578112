import pytest
import torch

from dflash_cli.dflash2 import head_logits
from dflash_cli.kernels import selector as sel
from dflash_cli.kernels.invariant_linear import tickets
from dflash_cli.kernels.selector import selector, selector_ref, selector_walk_ref, top_k_ref, tree_sum, unary_ref

from .conftest import DEVICE


def _inputs(seed, rows, vocab, rank, dtype, scale=1.0, levels=None):
    """(p, logits, anchor, A, B); `levels`: logits drawn from that many values (ties everywhere)."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        logits = torch.randint(0, levels, (rows, vocab), generator=g).float() * scale
    else:
        logits = torch.randn(rows, vocab, generator=g) * scale
    p, a, b = (torch.randn(n, rank, generator=g) for n in (rows, vocab, vocab))
    anchor = torch.randint(0, vocab, (1,), generator=g)
    return [t.to(DEVICE, dtype) for t in (p, logits)] + [anchor.to(DEVICE)] + [t.to(DEVICE, dtype) for t in (a, b)]


CASES = [  # rows, vocab, rank, top_k, multiplier, softcap
    (1, 16, 2, 16, 1.0, None),  # one row: the anchor's only; k = V
    (3, 50, 16, 4, 1.0, None),
    (7, 9000, 24, 16, 0.19611613513818404, 20.0),  # Muse-Glimmer's head: three vocab blocks, rank not a power of 2
    (15, 700, 16, 5, 1.0, 30.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab, rank, k, multiplier, softcap", CASES)
def test_the_kernel_drafts_the_references_ids(seed, dtype, rows, vocab, rank, k, multiplier, softcap):
    args = _inputs(seed, rows, vocab, rank, dtype, scale=40.0 if softcap else 1.0)  # the softcap saturates
    want = selector_ref(*args, k, multiplier, softcap)
    assert torch.equal(selector(*args, k, multiplier, softcap), want), f"seed {seed}"
    out = torch.full((rows + 1,), -1, dtype=torch.int64, device=DEVICE)  # the drafter's block: [bonus, drafts]
    selector(*args, k, multiplier, softcap, out=out[1:])
    assert out[0] == -1 and torch.equal(out[1:], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_in_the_logits_and_the_walk_go_to_the_lowest_id(seed, dtype, monkeypatch):
    """Logits from 3 values: every block's and every row's top-k cut through ties (blocks of 16 logits, so
    the merge sees them too); zero codebooks leave the unary alone, so the walk's argmax ties as well."""
    monkeypatch.setattr(sel, "BLOCK_V", 16)
    p, logits, anchor, a, b = _inputs(seed, 5, 100, 8, dtype, levels=3)
    for codebooks in ((a, b), (a, torch.zeros_like(b))):
        want = selector_ref(p, logits, anchor, *codebooks, 6)
        assert torch.equal(selector(p, logits, anchor, *codebooks, 6), want), f"seed {seed}"
    # all ties: each row's draft is the lowest id holding the row's largest logit
    assert want.tolist() == [int((row == row.max()).nonzero()[0]) for row in logits]


def test_top_k_is_torch_topk_on_distinct_values_and_takes_the_lowest_ids_among_equals(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 300, generator=g)
    values, ids = top_k_ref(logits, 7)
    want = logits.topk(7)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)
    tied = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    assert top_k_ref(tied, 4)[1].tolist() == [[1, 3, 2, 4]]


def test_the_anchor_picks_row_zeros_draft():
    """Row 0's predecessor is the anchor: its A row decides between two candidates the head ties."""
    logits = torch.zeros(2, 8, device=DEVICE)
    logits[0, 5] = logits[0, 6] = 1.0
    p = torch.ones(2, 2, device=DEVICE)
    a, b = torch.zeros(8, 2, device=DEVICE), torch.zeros(8, 2, device=DEVICE)
    b[6, 0] = 1.0  # candidate 6 scores A[anchor, 0]
    a[3, 0], a[4, 0] = 1.0, -1.0
    for anchor, first in ((3, 6), (4, 5), (0, 5)):  # +1: 6; -1: 5; 0: the tie, the lower id
        anchor = torch.tensor([anchor], device=DEVICE)
        assert selector(p, logits, anchor, a, b, 2)[0] == first == selector_ref(p, logits, anchor, a, b, 2)[0]


def test_a_rows_draft_does_not_depend_on_the_rows_after_it(seed):
    """The top-k of a row and the walk up to it are the same in a block of 1..L rows."""
    p, logits, anchor, a, b = _inputs(seed, 9, 300, 16, torch.float32)
    full = selector(p, logits, anchor, a, b, 8)
    for rows in (1, 4, 8):
        assert torch.equal(selector(p[:rows], logits[:rows], anchor, a, b, 8), full[:rows]), (seed, rows)


def test_the_counters_are_zero_after_a_launch_so_a_replay_walks_again(seed):
    """A CUDA graph replays the launch with the counters it leaves: the rows' and the step's tickets must be
    reset by their last program, or the second run's merges and walk never happen (its ids stay poisoned)."""
    args = _inputs(seed, 4, 200, 8, torch.float32)
    want = selector_ref(*args, 4)
    for _ in range(2):
        out = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
        selector(*args, 4, out=out)
        assert torch.equal(out, want)
        assert not tickets(args[1].device, 5)[:5].any()


def test_the_softcap_is_the_fp64_tanh_rounded_once_within_an_ulp_of_the_fp32_one(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10000, generator=g) * 50
    got, fp32 = unary_ref(x, 0.5, 20.0), head_logits(x, 0.5, 20.0)
    assert torch.allclose(got, fp32, rtol=3e-7, atol=0)
    assert torch.equal(unary_ref(x, 0.5, None), x * 0.5) and torch.equal(unary_ref(x, 1.0, None), x)


def test_the_tree_sum_adds_adjacent_pairs_first():
    x = torch.tensor([1e8, 1.0, -1e8, 1.0, 3.0])  # ((1e8 + 1) + (-1e8 + 1)) + ((3 + 0) + 0) in fp32
    assert tree_sum(x).item() == 3.0 and torch.allclose(tree_sum(torch.arange(16.0)), torch.tensor(120.0))


def test_the_walk_follows_its_own_choice():
    scores = torch.zeros(2, 3, 3)
    scores[0, :, 1] = scores[0, :, 2] = 1.0  # row 0: candidates 1 and 2 tie: 1 is taken
    scores[1, 1, 0] = 5.0  # after candidate 1, row 1 takes candidate 0 (after 2 it would take another)
    scores[1, 2, 2] = 9.0
    candidates = torch.tensor([[10, 11, 12], [20, 21, 22]])
    assert selector_walk_ref(scores, candidates).tolist() == [11, 20]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_drafters_selector_walks_its_own_lattice(seed, kernels, monkeypatch):
    """CandidateSelector.walk (P h, then ops.selector) drafts what the greedy walk over its full lattice does."""
    from dflash_cli.dflash2 import CandidateSelector

    monkeypatch.setenv("DFLASH_KERNELS", kernels)
    g = torch.Generator().manual_seed(seed)
    hidden, proj = torch.randn(6, 32, generator=g), torch.randn(8, 32, generator=g)
    _, logits, anchor, a, b = _inputs(seed, 6, 300, 8, torch.float32, scale=30.0)
    s = CandidateSelector(proj.to(DEVICE), a, b, 5, 0.5, 10.0)
    candidates, scores = s.lattice(hidden.to(DEVICE), logits, anchor)
    assert torch.equal(s.walk(hidden.to(DEVICE), logits, anchor), selector_walk_ref(scores, candidates)), f"seed {seed}"
