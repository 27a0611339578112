"""The split-K merge folded into the split kernel (issue 26): a weight reduced in K slices is one launch,
the last program of each output tile to finish adding the slices' partials in slice order. Its output is
the two-launch form's (the partials, then a merge kernel) bit for bit, for the invariant linear kernel,
its fused SwiGLU / RMSNorm variants and the int4 / FP8 kernels; the tile counters are left zeroed, so the
next launch (or a CUDA graph's next replay) starts from a clean slate."""
from __future__ import annotations

import pytest
import torch
from triton.runtime import interpreter

from dflash_cli.kernels import invariant_linear as il
from dflash_cli.kernels.fused_linear import norm_linear, norm_swiglu_linear, swiglu_linear
from dflash_cli.kernels.quant_linear import fp8_linear, int4_linear

from .conftest import DEVICE
from .test_invariant_linear import near_ties
from .test_quant_linear import fp8_layer, int4_layer

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def launched(monkeypatch):
    """The names of the Triton kernels launched (by the interpreter) while a test runs."""
    names, run = [], interpreter.GridExecutor.__call__

    def counted(executor, *args, **kwargs):
        names.append(executor.fn.__name__)
        return run(executor, *args, **kwargs)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)
    return names


def one_and_two(call, launched: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """call(merge) once with the merge folded in and once with its own launch; checks the launch counts
    and that the tickets are zeroed again; returns both outputs."""
    launched.clear()
    folded = call("last")
    assert len(launched) == 1, launched
    assert not il.tickets(torch.device(DEVICE), 1).any(), "the last program of each tile resets its counter"
    launched.clear()
    merged = call("launch")
    assert len(launched) == 2 and "merge" in launched[1], launched
    return folded, merged


def equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(equal(x, y) for x, y in zip(a, b))
    return a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(5, 67, 1031, True), (32, 130, 1031, False), (1, 3, 520, True)],
                         ids=["5x67x1031 bias", "32x130x1031 two row tiles", "1x3x520 bias"])
def test_invariant_linear_one_launch_equals_two(seed, launched, dtype, m, n, k, bias):
    x, w, b = near_ties(n, k, dtype, bias)
    assert il.plan(n, k)[0] > 1
    folded, merged = one_and_two(lambda merge: il.invariant_linear(x[:m], w, b, merge=merge), launched)
    assert equal(folded, merged), f"seed {seed}"


def test_one_slice_is_one_launch_either_way(seed, launched):
    x, w, b = near_ties(5, 333, torch.float32, True)
    assert il.plan(5, 333)[0] == 1
    for merge in il.MERGES:
        launched.clear()
        il.invariant_linear(x[:3], w, b, merge=merge)
        assert launched == ["_partial_kernel"]


def test_the_tickets_are_reused_and_left_zeroed(seed):
    """Calls of different shapes share the device's counters; each leaves them zeroed, and the same
    call again gives the same bits (a replayed graph runs the launch on the counters it left)."""
    x, w, b = near_ties(67, 1031, torch.float32, True)
    first = il.invariant_linear(x[:4], w, b)
    buffer = il.tickets(torch.device(DEVICE), 1)
    il.invariant_linear(x[:20], w[:9], None, n_splits=3)
    assert il.tickets(torch.device(DEVICE), 1) is buffer and not buffer.any()
    assert torch.equal(il.invariant_linear(x[:4], w, b), first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_swiglu_linear_one_launch_equals_two(seed, launched, dtype, bias):
    x, w, b = near_ties(2 * 40, 1031, dtype, bias)
    assert il.plan(2 * 40, 1031)[0] > 1
    folded, merged = one_and_two(lambda merge: swiglu_linear(x[:6], w, b, merge=merge), launched)
    assert equal(folded, merged), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("swiglu", [False, True], ids=["linear", "swiglu"])
def test_norm_linear_one_launch_equals_two(seed, launched, dtype, swiglu):
    x, w, b = near_ties(2 * 40, 1031, dtype, True)
    res = torch.randn(x.shape, device=DEVICE).to(dtype)
    nw = (1 + 0.1 * torch.randn(1031, device=DEVICE)).to(dtype)
    fn = norm_swiglu_linear if swiglu else norm_linear
    folded, merged = one_and_two(lambda merge: fn(x[:7], nw, 1e-6, w, b, res[:7], merge=merge), launched)
    assert folded[1] is not None and equal(folded, merged), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quantized_linear_one_launch_equals_two(seed, launched, dtype, fmt):
    n, k = 67, 1024
    assert il.plan(n, k)[0] > 1
    x = torch.randn(5, k, device=DEVICE).to(dtype)
    if fmt == "int4":
        q = int4_layer(n, k, 128, sym=False, bias=True)
        call = lambda merge: int4_linear(x, q.qweight, q.scales, q.zeros, q.group_size, q.bias,  # noqa: E731
                                         q.input_perm, merge=merge)
    else:
        q = fp8_layer(n, k, "block 128", bias=True)
        call = lambda merge: fp8_linear(x, q.weight, q.scale, q.block, q.bias, merge=merge)  # noqa: E731
    folded, merged = one_and_two(call, launched)
    assert equal(folded, merged), f"seed {seed}"


def test_a_captured_launch_replays_with_its_merge_folded_in(seed):
    """On the stand-in GPU a captured split launch is replayed on new inputs: each replay's output is
    the eager launch's on those inputs, bit for bit (the counters it left zeroed serve the next replay)."""
    from dflash_cli import cuda

    from ..fake_cuda import stand_in

    x, w, b = near_ties(67, 1031, torch.float32, True)
    with stand_in(kernels="triton"), torch.inference_mode():
        rows = x[:3].clone()
        il.invariant_linear(rows, w, b)  # the warm-up allocates the counters, as graphs.capture's does
        graph = cuda.new_graph()
        with cuda.capturing(graph):
            out = il.invariant_linear(rows, w, b)
        for start in (3, 6):
            rows.copy_(x[start:start + 3])
            graph.replay()
            assert torch.equal(out, il.invariant_linear(x[start:start + 3], w, b)), f"seed {seed}"
        assert not il.tickets(rows.device, 1).any()
