"""Every call dflash makes into torch.cuda, in one module: device choice, streams, events, graphs,
memory queries, synchronisation, pinned buffers, autocast.

Code that only a GPU runs is untested code: the first review of a GPU run found every CUDA command
dying at load (`set_device` given a device with no index), on a line no CPU test could reach. So
the package asks this module, never torch.cuda, and `is_gpu(device)` is the one test of "the GPU
branch". The tests swap the backend (`use`) for a stand-in, tests/fake_cuda.py, that plays a GPU
on the CPU and checks its arguments the way torch does (indexed devices, events recorded before
they are timed, no host read inside a capture, one capture at a time): then the GPU branches of
load, capture, measure, serve and train all run in CI (docs/cuda-path.md lists them).

The real backend is a thin layer over torch.cuda; tests/test_cuda_path.py runs each of its methods
against torch.cuda functions that check their arguments as the real ones do.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class TorchCuda:
    """torch.cuda itself. `type` is the device type whose tensors live on the GPU."""

    type = "cuda"

    @property
    def version(self) -> str | None:  # the CUDA toolkit torch was built with; None for a CPU build
        return torch.version.cuda

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def set_device(self, device: torch.device | int) -> None:
        torch.cuda.set_device(device)

    def device_name(self, device: torch.device | int) -> str:
        return torch.cuda.get_device_name(device)

    def capability(self, device: torch.device | int) -> tuple[int, int]:
        return torch.cuda.get_device_capability(device)

    def mem_get_info(self, device: torch.device | int) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)

    def synchronize(self, device: torch.device | int | None = None) -> None:
        torch.cuda.synchronize(device)

    def Event(self, enable_timing: bool = False):  # noqa: N802 (torch's name)
        return torch.cuda.Event(enable_timing=enable_timing)

    def Stream(self):  # noqa: N802
        return torch.cuda.Stream()

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def current_stream(self):
        return torch.cuda.current_stream()

    def CUDAGraph(self):  # noqa: N802
        return torch.cuda.CUDAGraph()

    def graph(self, graph, pool=None, stream=None):
        return torch.cuda.graph(graph, pool=pool, stream=stream)

    def graph_pool_handle(self):
        return torch.cuda.graph_pool_handle()

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def autocast(self, dtype: torch.dtype):
        return torch.autocast("cuda", dtype=dtype)


_backend = TorchCuda()


@contextlib.contextmanager
def use(backend) -> Iterator[object]:
    """Run with `backend` in place of torch.cuda (the tests' stand-in), then put the old one back."""
    global _backend
    previous, _backend = _backend, backend
    try:
        yield backend
    finally:
        _backend = previous


def backend():
    return _backend


def is_gpu(device: torch.device) -> bool:
    """Whether tensors on `device` live on the GPU: the one test behind every GPU-only branch."""
    return device.type == _backend.type


def is_available() -> bool:
    return _backend.is_available()


def device_count() -> int:
    return _backend.device_count()


def device(index: int | None = None) -> torch.device:
    """GPU `index` (default: the current one) as a device that names its index, as `set_device`
    and every per-device call need."""
    return torch.device(_backend.type, _backend.current_device() if index is None else index)


def version() -> str | None:
    return _backend.version


def set_device(device: torch.device) -> None:
    """Make `device` current on this thread (Triton launches, captures and events follow it)."""
    _backend.set_device(device)


def device_name(device: torch.device | int) -> str:
    return _backend.device_name(device)


def capability(device: torch.device | int) -> tuple[int, int]:
    """The GPU's compute capability, (9, 0) for sm_90: what a kernel may use there (kernels/pdl.py)."""
    return tuple(_backend.capability(device))


def mem_get_info(device: torch.device | int) -> tuple[int, int]:
    """(free, total) bytes on the GPU."""
    return _backend.mem_get_info(device)


def synchronize(device: torch.device | None = None) -> None:
    _backend.synchronize(device)


def event(timing: bool = False):
    return _backend.Event(enable_timing=timing)


def side_stream():
    return _backend.Stream()


def on_stream(stream):
    """A context in which `stream` is the current stream."""
    return _backend.stream(stream)


def current_stream():
    return _backend.current_stream()


def new_graph():
    return _backend.CUDAGraph()


def capturing(graph, pool=None, stream=None):
    """A context that captures what runs inside it into `graph` (the ops are recorded, not run)."""
    return _backend.graph(graph, pool=pool, stream=stream)


def graph_pool():
    """A memory pool handle that several captures share."""
    return _backend.graph_pool_handle()


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host buffer that results from `device` are copied into: pinned (copied asynchronously)
    where `device` is the GPU."""
    if is_gpu(device):
        return _backend.pinned_empty(shape, dtype)
    return torch.empty(shape, dtype=dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the GPU branch; no change elsewhere."""
    return _backend.autocast(dtype) if is_gpu(device) else contextlib.nullcontext()
