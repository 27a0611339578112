"""Batch invariance of the attention kernel: a query row's output is the same bits whether it is
computed alone, as a decode step (kv_len = p + 1), or inside a verify block of b queries (kv_len =
p0 + b), or inside a drafter's non-causal block. This is what lets speculative decoding equal plain
decoding bit for bit in bf16 (issue 24). Comparisons are torch.equal, never a tolerance; correctness
against the reference is tests/kernels/test_attention.py's job.

The blocks sit across the kernel's first split boundary (position SPLIT), so a row's keys span two
splits and its block holds rows on both sides; the windowed cases put the windows' starts across
that boundary too, so a decode step skips a split its verify block still has to visit."""
import pytest
import torch

from dflash_cli.kernels import attention as attention_mod
from dflash_cli.kernels.attention import SPLIT, attention

from .conftest import DEVICE

CAPACITY = SPLIT + 200


def _cache(hq, hkv, d, dtype, capacity=CAPACITY):
    q = torch.randn(capacity, hq, d, dtype=dtype, device=DEVICE)  # the query of every position
    k = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    v = torch.randn(hkv, capacity, d, dtype=dtype, device=DEVICE)
    return q, k, v


def _decode(q, k, v, p, kw, split=None):
    """Position p alone, as plain decoding computes it: kv_len = p + 1, and the slots after p hold
    nothing yet (NaN: never read)."""
    k, v = k.clone(), v.clone()
    k[:, p + 1:] = float("nan")
    v[:, p + 1:] = float("nan")
    return attention(q[p:p + 1], k, v, torch.tensor(p + 1, device=DEVICE), split=split, **kw)[0]


def _verify(q, k, v, p0, b, kw, split=None):
    """Positions p0 .. p0 + b - 1 as one verify block: kv_len = p0 + b."""
    return attention(q[p0:p0 + b], k, v, torch.tensor(p0 + b, device=DEVICE), split=split, **kw)


def _mismatches(q, k, v, center, blocks, positions, kw, split_of=None):
    """(block size, position) of every row checked whose verify output differs from its decode output.
    Block b starts at center - b // 2; rows at `positions` are compared."""
    decoded, bad = {}, []
    for b in blocks:
        p0 = center - b // 2
        split = split_of(p0 + b) if split_of else None
        block = _verify(q, k, v, p0, b, kw, split)
        for i in range(b):
            p = p0 + i
            if p not in positions:
                continue
            if p not in decoded:
                decoded[p] = _decode(q, k, v, p, kw, split_of(p + 1) if split_of else None)
            if not torch.equal(block[i], decoded[p]):
                bad.append((b, p))
    return bad


# (heads, kv heads, head size, causal, window, sinks, where the blocks centre)
CASES = {
    "gqa4": (8, 2, 32, True, None, False, SPLIT),
    # window 20 around SPLIT + 4: the windows' starts run from SPLIT - 31 to SPLIT, across key tiles and
    # up to the split boundary; the row at SPLIT + 19 sees nothing of the first split (its decode step
    # skips that split, its verify block of 32 visits it for the rows before it)
    "window": (8, 2, 32, True, 20, False, SPLIT + 4),
    "sinks gqa8 window": (16, 2, 16, True, 20, True, SPLIT + 4),  # gpt-oss: GQA 8, sinks, a window
    "sinks full": (8, 2, 32, True, None, True, SPLIT),
}
FAST = dict(blocks=(2, 3, 8, 32), positions=(*range(-4, 4), 15))  # from the centre; 15: block 32's last
FULL = dict(blocks=tuple(range(2, 33)), positions=range(-16, 16))


def _check(seed, dtype, case, blocks, positions):
    hq, hkv, d, causal, window, sinks, center = CASES[case]
    q, k, v = _cache(hq, hkv, d, dtype)
    kw = dict(causal=causal, scale=d**-0.5, sliding_window=window,
              sinks=torch.randn(hq, device=DEVICE) * 2 if sinks else None)
    positions = {center + p for p in positions}
    bad = _mismatches(q, k, v, center, blocks, positions, kw)
    assert not bad, f"seed {seed}: (block size, position) whose verify row differs from its decode: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa4", "window", "sinks gqa8 window"])
def test_a_verify_row_is_bit_identical_to_its_decode_step(seed, dtype, case):
    """Blocks of 2, 3, 8 and 32 (32 × GQA 8 = four row blocks): the eight rows around the centre and
    block 32's last row."""
    _check(seed, dtype, case, **FAST)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_every_row_of_every_block_size_is_bit_identical_to_its_decode_step(seed, dtype, case):
    """Every block size from 2 to 32, every row of each."""
    _check(seed, dtype, case, **FULL)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_256_wide_head_verify_row_is_bit_identical_to_its_decode_step(seed, dtype):
    """Qwen3.5's heads of 256 (its 16-key tiles), GQA 6."""
    q, k, v = _cache(6, 1, 256, dtype)
    kw = dict(causal=True, scale=256**-0.5)
    bad = _mismatches(q, k, v, SPLIT, (2, 5, 16, 32), set(range(SPLIT - 16, SPLIT + 16)), kw)
    assert not bad, f"seed {seed}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_drafter_row_is_bit_identical_alone_and_in_its_block(seed, dtype):
    """causal=False (the drafter's block sees all the context and itself): a query's output over the
    same kv_len is the same bits alone as in blocks of 2..32."""
    q, k, v = _cache(8, 2, 32, dtype)
    n = SPLIT + 16
    kw = dict(causal=False, scale=32**-0.5)
    length = torch.tensor(n, device=DEVICE)
    rows = q[n - 32:n]
    alone = [attention(rows[i:i + 1], k, v, length, **kw)[0] for i in (0, 15, 30, 31)]
    for b in (2, 7, 16, 32):
        block = attention(rows[32 - b:], k, v, length, **kw)
        for j, i in enumerate((0, 15, 30, 31)):
            if i >= 32 - b:
                assert torch.equal(block[i - (32 - b)], alone[j]), f"seed {seed}: block {b}, row {i}"


def _splits_from_kv_len(kv_len: int) -> int:
    """The old kernel's slices: kv_len cut into 4 splits (its `n_splits` then), a multiple of its
    32-key tiles, at least 128 keys. It cut them so wherever the context outgrew 128 keys × its split
    count (beyond 4k tokens at Qwen3-8B's 8 kv heads)."""
    return max(128, -(-(-(-kv_len // 4)) // 32) * 32)


def test_splits_cut_from_kv_len_break_the_invariance(seed):
    """The check above has teeth: the same kernel with its split size taken from kv_len, as the old
    kernel cut its splits, gives a verify row other bits than its decode step (fp32, no window), here
    around kv_len = 640, where that size steps from 160 to 192 keys."""
    q, k, v = _cache(8, 2, 32, torch.float32, capacity=700)
    kw = dict(causal=True, scale=32**-0.5)
    assert _splits_from_kv_len(640) != _splits_from_kv_len(641)
    bad = _mismatches(q, k, v, 640, (2, 8), set(range(636, 644)), kw, split_of=_splits_from_kv_len)
    assert bad, f"seed {seed}: every row matched, so the invariance test could not tell this kernel apart"
    assert not _mismatches(q, k, v, 640, (2, 8), set(range(636, 644)), kw), f"seed {seed}"


def test_one_launch_configuration_serves_every_query_count(monkeypatch):
    """Whatever the number of queries (1..32), the kernels are launched with the same compile-time
    parameters and launch options (block sizes, split size, warps, stages): only the grid and the
    runtime ints change. A BLOCK_M or split count picked from q_len would show here."""
    configs = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                configs.setdefault(self.name, set()).add(tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            return launch

    monkeypatch.setattr(attention_mod, "_attn_kernel", Recorder("split"))
    monkeypatch.setattr(attention_mod, "_attn_merge_kernel", Recorder("merge"))
    for dtype in (torch.float32, torch.bfloat16):
        configs.clear()
        k = torch.zeros(8, 4096, 128, dtype=dtype, device=DEVICE)
        for q_len in range(1, attention_mod.MAX_INVARIANT_Q_LEN + 1):
            for causal, window in ((True, None), (True, 128), (False, None)):
                q = torch.zeros(q_len, 32, 128, dtype=dtype, device=DEVICE)
                attention(q, k, k, torch.tensor(q_len + 5, device=DEVICE), causal=causal, scale=0.1,
                          sliding_window=window)
        assert len(configs["split"]) == 3, configs["split"]  # one per pattern (causal, window, drafter)
        assert "merge" not in configs, configs["merge"]  # the last split merges: no second launch


def test_the_invariant_query_count_is_the_dispatchers():
    """ops sends up to MAX_KERNEL_Q_LEN queries to the kernel, which keeps its invariant split size
    up to MAX_INVARIANT_Q_LEN: the two must be the same number."""
    from dflash_cli import ops

    assert attention_mod.MAX_INVARIANT_Q_LEN == ops.MAX_KERNEL_Q_LEN
    assert attention_mod.split_size(ops.MAX_KERNEL_Q_LEN, 40960, 8, 4) == SPLIT
