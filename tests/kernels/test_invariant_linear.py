"""The batch-invariant linear kernel: it matches its fp32 reference, and a row's output is bit-identical
whether the row is launched alone or inside a block of 2..32 rows (a decode step against a verify block)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dflash_cli.kernels.invariant_linear import BLOCK_K, invariant_linear, invariant_linear_ref, splits

from .conftest import DEVICE, TOL

MAX_M = 32


def first_variant_row(linear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """(M, i) of the first row i of a launch over x[:M] (M = 1..32) that differs in any bit from row i
    launched alone; None when every row of every M is identical."""
    alone = [linear(x[i:i + 1], w, b)[0] for i in range(MAX_M)]
    for m in range(1, MAX_M + 1):
        block = linear(x[:m], w, b)
        for i in range(m):
            if not torch.equal(block[i], alone[i]):
                return m, i
    return None


def inputs(n: int, k: int, dtype: torch.dtype, w_dtype: torch.dtype, bias: bool):
    x = torch.randn(MAX_M, k, dtype=dtype, device=DEVICE)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(w_dtype)
    b = torch.randn(n, device=DEVICE).to(w_dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (5, 67, 131), (16, 130, 1031), (32, 9, 700), (3, 1, 1)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_invariant_linear_matches_reference(seed, dtype, w_dtype, m, n, k, bias):
    """fp32 tight, bf16 within its rounding; odd N and K exercise the masked tile edges, K = 1031 a
    split-K reduction."""
    x, w, b = inputs(n, k, dtype, w_dtype, bias)
    got, want = invariant_linear(x[:m], w, b), invariant_linear_ref(x[:m], w, b)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda msg: f"seed {seed}: {msg}")


def test_leading_dims_and_empty_rows(seed):
    x, w, b = torch.randn(2, 3, 40, device=DEVICE), torch.randn(7, 40, device=DEVICE), torch.randn(7, device=DEVICE)
    got = invariant_linear(x, w, b)
    assert got.shape == (2, 3, 7)
    torch.testing.assert_close(got, invariant_linear_ref(x, w, b), **TOL[torch.float32])
    assert invariant_linear(x[:0], w, b).shape == (0, 3, 7)


def test_the_split_count_depends_on_the_weight_only():
    assert splits(67, 1031) == 1031 // (4 * BLOCK_K) > 1  # a small N wants many slices: K caps them
    assert splits(4096, 4096) > 1 and splits(151936, 4096) == 1


def near_ties(n: int, k: int, dtype: torch.dtype, bias: bool):
    """Inputs whose outputs are small remainders of large sums (the second half of each row mirrors the
    first with the weight's sign flipped; the last column and the bias are small): like a near-tie of two
    logits, the rounded output then shows the order of the fp32 sum, in bf16 as well as in fp32."""
    x, w, b = inputs(n, k, torch.float32, torch.float32, False)
    h = (k - 1) // 2
    x[:, h:2 * h], w[:, h:2 * h], w[:, -1] = x[:, :h], -w[:, :h], w[:, -1] * 1e-3
    b = torch.randn(n, device=DEVICE) * 1e-3 if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,bias", [(67, 1031, True), (5, 333, False)],
                         ids=["67x1031 split-K bias", "5x333 one slice"])
def test_a_row_is_bit_identical_alone_and_in_any_block(seed, dtype, n, k, bias):
    """Row i of a launch over M rows equals row i launched alone, for M = 1..32 (two row tiles at M > 16),
    in bf16 and fp32, with odd N and K."""
    assert first_variant_row(invariant_linear, *near_ties(n, k, dtype, bias)) is None, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_invariance_check_catches_a_split_chosen_by_m(seed, dtype):
    """The check has teeth: the same kernel with its split count planted to depend on M (as cuBLAS's
    split-K does) is caught, in bf16 too."""
    def by_m(x, w, b):
        return invariant_linear(x, w, b, n_splits=1 if x.shape[0] == 1 else 4)
    assert first_variant_row(by_m, *near_ties(67, 1031, dtype, True)) is not None, f"seed {seed}"


def test_torch_linear_is_not_batch_invariant_here(seed):
    """What the kernel is for: torch's own F.linear (a GEMV at M = 1, a GEMM above) rounds a row
    differently with the row count, in fp32, on this machine's BLAS or cuBLAS."""
    found = [first_variant_row(F.linear, *inputs(n, k, torch.float32, torch.float32, False))
             for n, k in ((67, 1031), (256, 2048))]
    if all(f is None for f in found):
        pytest.skip("torch's F.linear happens to be batch-invariant here (the planted-split test still has teeth)")
    assert any(f is not None for f in found)


def test_dense_linear_takes_the_kernel_for_step_rows_only_when_switched_on(seed, monkeypatch):
    """ops.dense_linear (what the models' Linear seam will call): DFLASH_LINEAR=cublas (the default) is
    F.linear; invariant sends up to 32 rows through the kernel and longer prefill chunks to F.linear."""
    from dflash_cli import ops

    calls = []
    monkeypatch.setattr(ops, "invariant_linear", lambda x, w, b=None: calls.append(x.shape) or F.linear(x, w, b))
    w = torch.randn(8, 16, device=DEVICE)
    monkeypatch.delenv("DFLASH_LINEAR", raising=False)
    for rows in (1, 16, 33):
        ops.dense_linear(torch.randn(rows, 16, device=DEVICE), w)
    assert calls == [] and ops.linear_mode() == "cublas"
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    for shape in ((1, 16), (2, 16, 16), (33, 16)):
        ops.dense_linear(torch.randn(shape, device=DEVICE), w)
    assert calls == [(1, 16), (2, 16, 16)]
    monkeypatch.setenv("DFLASH_LINEAR", "fast")
    with pytest.raises(ValueError, match="DFLASH_LINEAR must be cublas or invariant"):
        ops.dense_linear(torch.randn(1, 16, device=DEVICE), w)


def test_ops_invariant_linear_runs_the_kernel_with_kernels_on(seed, monkeypatch):
    from dflash_cli import ops

    monkeypatch.setenv("DFLASH_KERNELS", "triton")
    x, w, b = near_ties(67, 1031, torch.float32, True)
    assert torch.equal(ops.invariant_linear(x[:3], w, b), invariant_linear(x[:3], w, b))
    monkeypatch.setenv("DFLASH_KERNELS", "torch")
    assert torch.equal(ops.invariant_linear(x[:3], w, b), invariant_linear_ref(x[:3], w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_columns_gives_the_bias(seed, dtype):
    x, w = torch.randn(3, 0, dtype=dtype, device=DEVICE), torch.randn(5, 0, dtype=dtype, device=DEVICE)
    b = torch.randn(5, dtype=dtype, device=DEVICE)
    torch.testing.assert_close(invariant_linear(x, w, b), b.expand(3, 5), rtol=0, atol=0)


def test_a_loaded_model_s_projections_go_through_the_switch(stories_pair, monkeypatch):
    """models/layers/linear.Dense calls ops.dense_linear: with DFLASH_LINEAR=invariant every projection of a
    step (decode M = 1, verify M = b) takes the invariant kernel, a long prefill chunk F.linear; the
    answer is the same as on the default path (both run fp32 references on the CPU)."""
    from dflash_cli import loader, ops
    from dflash_cli.engine import Engine, Request

    m = loader.load(*stories_pair, device="cpu")
    prompt = m.tokenizer.encode("Once upon a time, there was a little girl who liked to play in the big park near")

    def answer() -> list[int]:
        engine = Engine(m.target, m.drafter, block_size=4, max_context=m.max_context)
        return [t for s in engine.generate(Request(prompt * 3, 12)) for t in s.tokens]

    monkeypatch.delenv("DFLASH_LINEAR", raising=False)
    plain = answer()
    rows = []
    kernel = ops.invariant_linear
    monkeypatch.setattr(ops, "invariant_linear", lambda x, w, b=None: rows.append(x.numel() // x.shape[-1])
                        or kernel(x, w, b))
    monkeypatch.setenv("DFLASH_LINEAR", "invariant")
    assert answer() == plain
    assert rows and set(rows) <= set(range(1, ops.MAX_INVARIANT_ROWS + 1)) and 4 in rows  # verify rows (b = 4)
