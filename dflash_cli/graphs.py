"""CUDA graphs for the engine's fixed-shape step: one replay per speculative iteration.

At batch 1 an iteration is hundreds of tiny kernel launches; replaying them as one captured graph
removes the launch overhead (DESIGN §5). The captured step is the whole device side of an
iteration (draft → verify → accept → drafter context commit), which is graph-safe because every
length and position is read from device tensors. Inputs and outputs are static buffers; the host
reads the packed result through pinned memory, once per iteration.

Sampling parameters are baked into a capture, so a graph is kept per parameter set; the seed is a
device tensor the engine refills per generation, so it never forces a new capture. Capture failures fall back to eager
execution with a message; `DFLASH_CUDA_GRAPHS=0` turns graphs off.
"""
from __future__ import annotations

import os
import sys
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


class StepGraph:
    """A captured `step(bonus) -> (packed, next_bonus)` with static input and output buffers."""

    def __init__(self, step: DeviceStep, bonus: torch.Tensor, caches: list[KVCache]):
        self.bonus = bonus.clone()
        lengths = [c.length.clone() for c in caches]

        def restore() -> None:  # warm-up really runs: undo its commits
            for cache, length in zip(caches, lengths):
                cache.length.copy_(length)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # Triton autotuning and allocator warm-up, outside the capture
                step(self.bonus)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.packed, self.next_bonus = step(self.bonus)
        restore()
        self.host = torch.empty(self.packed.shape, dtype=self.packed.dtype, pin_memory=True)
        self.ready = torch.cuda.Event()

    def __call__(self, bonus: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        self.bonus.copy_(bonus)
        self.graph.replay()
        self.host.copy_(self.packed, non_blocking=True)
        self.ready.record()
        self.ready.synchronize()  # the iteration's one host sync
        return self.host.tolist(), self.next_bonus


class StepGraphs:
    """Graphs keyed by sampling parameters; eager when capture is off or failed."""

    def __init__(self, device: torch.device, caches: list[KVCache]):
        self.enabled = graphs_enabled(device)
        self.caches = caches
        self._graphs: dict[tuple, StepGraph] = {}

    @staticmethod
    def key(params: dict) -> tuple:
        if params["temperature"] == 0.0:
            return (("temperature", 0.0),)  # greedy ignores every other parameter
        return tuple(sorted((k, v) for k, v in params.items() if k != "seed"))

    def get(self, params: dict, make_step: Callable[[dict], DeviceStep], bonus: torch.Tensor) -> StepGraph | None:
        if not self.enabled:
            return None
        key = self.key(params)
        if key not in self._graphs:
            try:
                self._graphs[key] = StepGraph(make_step(params), bonus, self.caches)
            except Exception as e:  # any capture failure: correctness first, run eagerly
                self.enabled = False
                print(f"dflash: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      "running without graphs", file=sys.stderr)
                return None
        return self._graphs[key]
