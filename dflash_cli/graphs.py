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

Sampling parameters are baked into a capture, so a graph is kept per parameter set; the seed is a
device tensor the engine refills per generation, so it never forces a new capture. Capture
failures fall back to eager execution with a message; `DFLASH_CUDA_GRAPHS=0` turns graphs off.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from typing import Callable

import torch

from . import ops
from .cache import KVCache

DeviceStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def graphs_enabled(device: torch.device) -> bool:
    """On CUDA through the Triton kernels, unless DFLASH_CUDA_GRAPHS=0. Not with
    DFLASH_KERNELS=torch: the attention reference slices the cache at `int(kv_len)`, a host read
    that a capture would freeze (tests/test_graph_safety.py)."""
    return (device.type == "cuda" and os.environ.get("DFLASH_CUDA_GRAPHS", "1") != "0"
            and ops.kernel_mode() != "torch")


def capture(fn: Callable[[], object], after: Callable[[], None] = lambda: None) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` captured as a CUDA graph; returns the graph and what `fn` returned during the capture
    (its static outputs). Two warm-up runs on a side stream first keep Triton compilation and
    allocator growth out of the capture; `after` runs after each run, to undo its side effects."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
            after()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    after()
    return graph, out


class EagerStep:
    """The step run op by op; its result comes back through two host buffers in turn (pinned, and
    copied asynchronously, on CUDA)."""

    def __init__(self, step: DeviceStep, device: torch.device):
        self.step = step
        self.cuda = device.type == "cuda"
        self._pending: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        self._buffers: list[torch.Tensor] = []
        self._events = [torch.cuda.Event() for _ in range(2)] if self.cuda else [None, None]
        self._turn = 0

    def run(self, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(bonus)

    def launch(self, bonus: torch.Tensor) -> torch.Tensor:
        assert len(self._pending) < 2, "read a result before launching a third iteration"
        packed, next_bonus = self.run(bonus)
        if not self._buffers:
            self._buffers = [torch.empty(packed.shape, dtype=packed.dtype, pin_memory=self.cuda) for _ in range(2)]
        host, ready = self._buffers[self._turn], self._events[self._turn]
        self._turn ^= 1
        host.copy_(packed, non_blocking=self.cuda)
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

    def __init__(self, step: DeviceStep, bonus: torch.Tensor, caches: list[KVCache]):
        super().__init__(step, bonus.device)
        self.bonus = bonus.clone()
        lengths = [c.length.clone() for c in caches]

        def restore() -> None:  # warm-up and capture really run: undo their commits
            for cache, length in zip(caches, lengths):
                cache.length.copy_(length)

        self.graph, (self.packed, self.next_bonus) = capture(lambda: step(self.bonus), restore)

    def run(self, bonus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Stream order makes the static buffers safe: this copy follows the previous replay's
        # readback and the next replay follows this one's.
        self.bonus.copy_(bonus)
        self.graph.replay()
        return self.packed, self.next_bonus


class StepGraphs:
    """One runner per sampling-parameter set, kept for the engine's life: a captured graph, or
    eager where capture is off or failed."""

    def __init__(self, device: torch.device, caches: list[KVCache]):
        self.device = device
        self.enabled = graphs_enabled(device)
        self.caches = caches
        self._runners: dict[tuple, EagerStep] = {}

    @staticmethod
    def key(params: dict) -> tuple:
        if params["temperature"] == 0.0:
            return (("temperature", 0.0),)  # greedy ignores every other parameter
        return tuple(sorted((k, v) for k, v in params.items() if k != "seed"))

    def get(self, params: dict, make_step: Callable[[dict], DeviceStep], bonus: torch.Tensor) -> EagerStep:
        key = self.key(params)
        if key not in self._runners:
            self._runners[key] = self._runner(make_step(params), bonus)
        return self._runners[key]

    def _runner(self, step: DeviceStep, bonus: torch.Tensor) -> EagerStep:
        if self.enabled:
            try:
                return StepGraph(step, bonus, self.caches)
            except Exception as e:  # any capture failure: correctness first, run eagerly
                self.enabled = False
                print(f"dflash: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "running without graphs", file=sys.stderr)
        return EagerStep(step, self.device)
