"""Running the engine's device step: as a CUDA graph on the GPU, with the result read back async.

At batch 1 an iteration is hundreds of tiny kernel launches; replaying them as one captured graph
removes the launch overhead (DESIGN §5). The captured step is the whole device side of an
iteration (draft → verify → accept → drafter context commit), which is graph-safe because every
length and position is read from device tensors (tests/test_graph_safety.py).

A runner has two calls: `launch(bonus)` queues one iteration and the copy of its packed result
into pinned host memory, and returns the next bonus (still on the device); `result()` waits for
the oldest launched iteration (the iteration's one host sync) and returns its packed ids. Two
pinned buffers let the engine queue iteration i+1 before it reads iteration i, so the GPU works
while the host streams text.

Sampling values (temperature, top-k, top-p, min-p, seed) are device tensors the engine refills per
generation, so only the sampling `Mode` (greedy, and which filters are on) and the block size select
a graph: one per mode and block size the engine uses (an adaptive engine's few candidates, a pinned
one's single b), captured on first use into one shared memory pool, all on one side stream (each
stream that runs a GEMM keeps a cuBLAS workspace for good: a stream per capture would leak one per
graph). A capture that fails leaves the caches as they were before it (warm-up runs really run, so they are undone whatever happens) and falls back to
eager execution with a message; `DFLASH_CUDA_GRAPHS=0` turns graphs off.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from typing import Callable, Hashable

import torch

from . import cuda, ops

DeviceStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def graphs_enabled(device: torch.device) -> bool:
    """On CUDA through the Triton kernels, unless DFLASH_CUDA_GRAPHS=0. Not with
    DFLASH_KERNELS=torch: the attention reference slices the cache at `int(kv_len)`, a host read
    that a capture would freeze (tests/test_graph_safety.py)."""
    return (cuda.is_gpu(device) and os.environ.get("DFLASH_CUDA_GRAPHS", "1") != "0"
            and ops.kernel_mode() != "torch")


def capture(fn: Callable[[], object], after: Callable[[], None] = lambda: None,
            pool=None, stream=None) -> tuple[object, object]:
    """`fn` captured as a CUDA graph; returns the graph and what `fn` returned during the capture
    (its static outputs). Two warm-up runs on a side stream first keep Triton compilation and
    allocator growth out of the capture; `after` runs after each run, to undo its side effects,
    also when the run raises. `pool`: a memory pool shared with other captures; `stream`: the side
    stream to warm up and capture on (a new one if None)."""
    side = stream if stream is not None else cuda.side_stream()
    side.wait_stream(cuda.current_stream())
    with cuda.on_stream(side):
        for _ in range(2):
            try:
                fn()
            finally:
                after()
    cuda.current_stream().wait_stream(side)
    graph = cuda.new_graph()
    try:
        with cuda.capturing(graph, pool=pool, stream=side):
            out = fn()
    finally:
        after()
    return graph, out


class EagerStep:
    """The step run op by op; its result comes back through two host buffers in turn (pinned, and
    copied asynchronously, on CUDA)."""

    def __init__(self, step: DeviceStep, device: torch.device):
        self.step = step
        self.device = device
        self.gpu = cuda.is_gpu(device)
        self._pending: deque[tuple[torch.Tensor, object]] = deque()  # (host buffer, its ready event or None)
        self._buffers: list[torch.Tensor] = []
        self._events = [cuda.event() for _ in range(2)] if self.gpu else [None, None]
        self._turn = 0

    def run(self, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(bonus)

    def launch(self, bonus: torch.Tensor) -> torch.Tensor:
        assert len(self._pending) < 2, "read a result before launching a third iteration"
        packed, next_bonus = self.run(bonus)
        if not self._buffers:
            self._buffers = [cuda.host_buffer(packed.shape, packed.dtype, self.device) for _ in range(2)]
        host, ready = self._buffers[self._turn], self._events[self._turn]
        self._turn ^= 1
        host.copy_(packed, non_blocking=self.gpu)
        if ready is not None:
            ready.record()
        self._pending.append((host, ready))
        return next_bonus

    def result(self) -> list[int]:
        host, ready = self._pending.popleft()
        if ready is not None:
            ready.synchronize()  # the iteration's one host sync
        return host.tolist()

    def discard(self) -> None:
        """Forget launched iterations nobody will read (a generation that ended or was stopped)."""
        while self._pending:
            _, ready = self._pending.popleft()
            if ready is not None:
                ready.synchronize()  # its pinned buffer may be written again only after this


class StepGraph(EagerStep):
    """The step captured once as a CUDA graph, with static input and output buffers."""

    def __init__(self, step: DeviceStep, bonus: torch.Tensor, caches: list, pool=None, stream=None):
        super().__init__(step, bonus.device)
        self.bonus = bonus.clone()
        saved = [c.snapshot() for c in caches]

        def restore() -> None:  # warm-up and capture really run: undo their commits
            for cache, snap in zip(caches, saved):
                cache.restore(snap)

        try:
            self.graph, (self.packed, self.next_bonus) = capture(lambda: step(self.bonus), restore, pool, stream)
        finally:
            restore()  # a capture that failed midway may have left the caches anywhere

    def run(self, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Stream order makes the static buffers safe: this copy follows the previous replay's
        # readback and the next replay follows this one's.
        self.bonus.copy_(bonus)
        self.graph.replay()
        return self.packed, self.next_bonus


class StepGraphs:
    """One runner per key (the sampling `Mode` and the block size), kept for the engine's life: a
    captured graph, or eager where capture is off or failed. Captures share one memory pool: the
    runners never replay concurrently, so one graph's scratch may reuse another's."""

    def __init__(self, device: torch.device, caches: list):
        self.device = device
        self.enabled = graphs_enabled(device)
        self.caches = caches
        self._runners: dict[Hashable, EagerStep] = {}
        self._pool = None  # made at the first capture, with the one side stream they all use
        self._stream = None

    def get(self, key: Hashable, make_step: Callable[[], DeviceStep], bonus: torch.Tensor) -> EagerStep:
        if key not in self._runners:
            self._runners[key] = self._runner(make_step(), bonus)
        return self._runners[key]

    def discard(self) -> None:
        """Forget every launched iteration nobody will read (a generation that ended or was stopped)."""
        for runner in self._runners.values():
            runner.discard()

    def _runner(self, step: DeviceStep, bonus: torch.Tensor) -> EagerStep:
        if self.enabled:
            try:
                if self._pool is None:
                    self._pool, self._stream = cuda.graph_pool(), cuda.side_stream()
                return StepGraph(step, bonus, self.caches, self._pool, self._stream)
            except Exception as e:  # any capture failure: correctness first, run eagerly
                self.enabled = False
                print(f"dflash: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "running without graphs", file=sys.stderr)
        return EagerStep(step, self.device)
