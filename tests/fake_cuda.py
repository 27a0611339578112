"""A GPU on the CPU: a stand-in for torch.cuda (the backend of dflash_cli.cuda) under which the
package's GPU branches run in CI, checked the way torch and the CUDA runtime check them.

- **Devices.** The CPU plays the GPUs: `device(i)` is `cpu:i`, and `is_gpu` is true of the CPU.
  A call that needs a device index (`set_device`) refuses a device without one, through torch's own
  `_get_device_index` (the first GPU run died there: gpu-review-2 F1); an index past the card count
  is an invalid ordinal. The current device is per thread, as in the CUDA runtime.
- **Events and streams.** An event is timed only if both ends were made with timing on and
  recorded, and the end one has completed (synchronised): cudaErrorNotReady otherwise. Streams and
  pool handles are counted, so a test can see that captures reuse them (F9).
- **Graphs.** A capture records every aten op and every Triton launch that the code inside it runs,
  without running anything twice, and `replay()` runs that recording again on the very same tensors,
  writing into the same outputs: what a CUDA graph does. Whatever the host decided during the capture
  (a Python int, a branch, a shape) is frozen into the recording, as on a GPU. Inside a capture a
  host read (`item`, `tolist`, a data-dependent shape), an upload of host data (`torch.tensor(...)`),
  a synchronisation, or a CUDA call from another thread (torch's default "global" capture mode) raises.
- **Memory.** `mem_get_info` reports a small card (`free`, `total`), so the memory planner's GPU
  branch runs and copy sizes stay small.

On the GPU branch `ops` picks the Triton kernels, which run here in Triton's interpreter
(TRITON_INTERPRET=1, tests/conftest.py): faithful, and slow (a tiny model's warm-up takes minutes).
`stand_in(kernels="reference")` runs the kernels' torch references in their place, so the glue
around them (load, capture, lookahead, measure, serve, train) runs in seconds; the attention reference
is swapped for the same attention masked on the device, since the reference slices the cache at
`int(kv_len)`, a host read a capture refuses. tests/test_conformance.py captures and
replays the real kernels.
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# Ops that make the host wait for the device, or whose output shape depends on device values.
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.equal.default, aten.is_nonzero.default, aten.unique_consecutive.default,
              aten._unique2.default}
MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
UPLOADS = {aten.lift_fresh.default}  # torch.tensor(python data): a pageable host-to-device copy
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
               aten.new_empty.default, aten.new_empty_strided.default}
# Tensor methods that read values back without passing the dispatcher (an inference tensor's
# `tolist`, say); on a GPU each is a device-to-host copy and a sync.
READ_METHODS = ("tolist", "numpy", "item", "__int__", "__float__", "__bool__", "__index__")


class CaptureError(RuntimeError):
    """What the CUDA runtime reports as cudaErrorStreamCaptureUnsupported / Invalidated."""


class FakeCuda:
    type = "cpu"
    version = "13.0 (fake)"

    def __init__(self, count: int = 1, free: int = 768 << 20, total: int = 1 << 30,
                 capability: tuple[int, int] = (8, 0)):
        self.count, self.free, self.total, self._capability = count, free, total, capability
        self._local = threading.local()
        self._capture: Recording | None = None  # the capture in progress, and its thread
        self.default_stream = FakeStream(self, counted=False)
        self.streams_made = 0
        self.pools_made = 0
        self.captures = 0
        self.replays = 0
        self.set_device_calls: list[tuple[str, int]] = []  # (thread name, index)
        self.pinned: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
        self.unrecorded_waits = 0  # synchronize() on an event never recorded: legal, but a wait on nothing

    # ---- devices -----------------------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        self._not_during_capture_elsewhere()
        return getattr(self._local, "device", 0)

    def index_of(self, device, optional: bool) -> int:
        """torch.cuda._utils._get_device_index for this card, with `cpu` in the role of `cuda`."""
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type != self.type:
                raise ValueError(f"Expected a cuda device, but got: {device}")
            if device.index is None and optional:
                return self.current_device()
            as_cuda = torch.device("cuda", device.index) if device.index is not None else torch.device("cuda")
            index = torch.cuda._utils._get_device_index(as_cuda, optional=False)
        elif device is None and optional:
            return self.current_device()
        else:
            index = torch.cuda._utils._get_device_index(device, optional=False)  # ints pass, the rest raises
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def set_device(self, device) -> None:
        self._not_during_capture_elsewhere()
        index = self.index_of(device, optional=False)
        self._local.device = index
        self.set_device_calls.append((threading.current_thread().name, index))

    def device_name(self, device) -> str:
        self.index_of(device, optional=True)
        return "Fake GPU (the CPU)"

    def capability(self, device) -> tuple[int, int]:
        self.index_of(device, optional=True)
        return self._capability

    def mem_get_info(self, device) -> tuple[int, int]:
        self._no_sync("mem_get_info")
        self.index_of(device, optional=True)
        return self.free, self.total

    def synchronize(self, device=None) -> None:
        self._no_sync("synchronize")
        self.index_of(device, optional=True)
        FakeEvent.complete_all()

    # ---- streams, events ----------------------------------------------------------------------
    def Stream(self):  # noqa: N802
        self._not_during_capture_elsewhere()
        return FakeStream(self)

    def current_stream(self):
        return getattr(self._local, "stream", self.default_stream)

    @contextlib.contextmanager
    def stream(self, stream):
        if stream is not None and not isinstance(stream, FakeStream):
            raise TypeError(f"expected a torch.cuda.Stream, got {type(stream).__name__}")
        previous = self.current_stream()
        self._local.stream = stream or previous
        try:
            yield
        finally:
            self._local.stream = previous

    def Event(self, enable_timing: bool = False):  # noqa: N802
        return FakeEvent(self, enable_timing)

    # ---- graphs ---------------------------------------------------------------------------------
    def CUDAGraph(self):  # noqa: N802
        return FakeGraph(self)

    def graph_pool_handle(self):
        self.pools_made += 1
        return ("pool", self.pools_made)

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        if not isinstance(graph, FakeGraph):
            raise TypeError("expected a torch.cuda.CUDAGraph")
        if graph.ops is not None:
            raise RuntimeError("this CUDAGraph was already captured")
        if pool is not None and not (isinstance(pool, tuple) and pool[0] == "pool" and 0 < pool[1] <= self.pools_made):
            raise TypeError(f"pool must come from graph_pool_handle() or another graph's pool(), not {pool!r}")
        if self._capture is not None:
            raise CaptureError("a capture is already in progress (captures do not nest)")
        self.synchronize()  # as torch.cuda.graph does before it begins
        recording = Recording(self)
        with self.stream(stream or FakeStream(self, counted=False)):
            self._capture = recording
            try:
                with recording:
                    yield
            finally:
                self._capture = None
        graph.ops, graph.pool = recording.ops, pool
        self.captures += 1

    # ---- memory ---------------------------------------------------------------------------------
    def pinned_empty(self, shape, dtype) -> torch.Tensor:
        self._not_during_capture_elsewhere()
        t = torch.empty(shape, dtype=dtype)
        self.pinned.add(t)
        return t

    def autocast(self, dtype: torch.dtype):
        return torch.autocast("cpu", dtype=dtype)

    # ---- the rules -------------------------------------------------------------------------------
    def _not_during_capture_elsewhere(self) -> None:
        """torch.cuda.graph's default capture_error_mode "global": while one thread captures, CUDA
        calls from any other thread are errors."""
        capture = self._capture
        if capture is not None and capture.thread is not threading.current_thread():
            raise CaptureError(f"a CUDA call from thread {threading.current_thread().name!r} while "
                               f"{capture.thread.name!r} captures a graph (capture_error_mode 'global')")

    def _no_sync(self, what: str) -> None:
        self._not_during_capture_elsewhere()
        if self._capture is not None:
            raise CaptureError(f"{what} inside a CUDA graph capture: operation not permitted when stream is capturing")


class FakeStream:
    def __init__(self, gpu: FakeCuda, counted: bool = True):
        self.gpu = gpu
        if counted:
            gpu.streams_made += 1

    def wait_stream(self, other) -> None:
        if not isinstance(other, FakeStream):
            raise TypeError(f"expected a torch.cuda.Stream, got {type(other).__name__}")
        self.gpu._not_during_capture_elsewhere()

    def wait_event(self, event) -> None:
        if not isinstance(event, FakeEvent):
            raise TypeError(f"expected a torch.cuda.Event, got {type(event).__name__}")

    def synchronize(self) -> None:
        self.gpu._no_sync("Stream.synchronize")
        FakeEvent.complete_all()


class FakeEvent:
    _live: weakref.WeakSet[FakeEvent] = weakref.WeakSet()

    def __init__(self, gpu: FakeCuda, enable_timing: bool):
        self.gpu, self.enable_timing = gpu, enable_timing
        self.recorded_at: float | None = None
        self.completed = False
        FakeEvent._live.add(self)

    @classmethod
    def complete_all(cls) -> None:
        """A synchronisation: everything recorded so far has run (on the CPU it ran as it was queued)."""
        for event in list(cls._live):
            if event.recorded_at is not None:
                event.completed = True

    def record(self, stream=None) -> None:
        if stream is not None and not isinstance(stream, FakeStream):
            raise TypeError(f"expected a torch.cuda.Stream, got {type(stream).__name__}")
        self.gpu._no_sync("Event.record")  # the package never records inside a capture; a GPU would make it a graph node
        self.recorded_at, self.completed = time.perf_counter(), False

    def synchronize(self) -> None:
        self.gpu._no_sync("Event.synchronize")
        if self.recorded_at is None:
            self.gpu.unrecorded_waits += 1
            return
        self.completed = True

    def query(self) -> bool:
        self.gpu._no_sync("Event.query")
        if self.recorded_at is not None:
            self.completed = True
        return True

    def elapsed_time(self, end: FakeEvent) -> float:
        self.gpu._no_sync("Event.elapsed_time")
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self.recorded_at is None or end.recorded_at is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if not end.completed:
            raise RuntimeError("CUDA error: device not ready (the end event has not completed: synchronize first)")
        return (end.recorded_at - self.recorded_at) * 1e3


class FakeGraph:
    def __init__(self, gpu: FakeCuda):
        self.gpu = gpu
        self.ops: list | None = None
        self.pool = None
        self.replays = 0

    def replay(self) -> None:
        self.gpu._not_during_capture_elsewhere()
        if self.ops is None:
            raise RuntimeError("replay() of a CUDAGraph that was never captured")
        with torch.inference_mode():
            for op in self.ops:
                op.replay()
        self.replays += 1
        self.gpu.replays += 1


class AtenOp:
    def __init__(self, func, args, kwargs, out):
        self.func, self.args, self.kwargs, self.out = func, args, kwargs, out

    def replay(self) -> None:
        fresh = self.func(*self.args, **self.kwargs)
        for kept, new in zip(tree_leaves(self.out), tree_leaves(fresh)):
            # An op that wrote in place or returned a view already acted on the captured memory; an op
            # that made a new tensor writes it into the one it made during the capture, which the
            # recorded ops after it read.
            if isinstance(kept, torch.Tensor) and kept.untyped_storage().data_ptr() != new.untyped_storage().data_ptr():
                kept.copy_(new)


class Launch:
    def __init__(self, run, executor, args, kwargs):
        self.run, self.executor, self.args, self.kwargs = run, executor, args, kwargs

    def replay(self) -> None:
        self.run(self.executor, *self.args, **self.kwargs)


class Recording(TorchDispatchMode):
    """What one capture records: aten ops and (interpreted) Triton launches, in order, on its thread."""

    def __init__(self, gpu: FakeCuda):
        super().__init__()
        self.gpu = gpu
        self.thread = threading.current_thread()
        self.ops: list[AtenOp | Launch] = []
        self._launching = False
        self._saved: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._launching:  # the interpreter's own copies around a launch: part of the launch
            return func(*args, **kwargs)
        if func in HOST_READS or (func in MASK_INDEXING and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            raise CaptureError(f"{func} reads device values back to the host inside a CUDA graph capture")
        if func in UPLOADS:
            raise CaptureError("torch.tensor(host data) inside a CUDA graph capture: a pageable host-to-device "
                               "copy, which a capture does not permit (make the tensor before capturing)")
        out = func(*args, **kwargs)
        if func not in ALLOCATIONS:  # a graph's allocations are static: nothing to run again
            self.ops.append(AtenOp(func, args, kwargs, out))
        return out

    def __enter__(self):
        from triton.runtime import interpreter

        self._saved = {name: getattr(torch.Tensor, name) for name in READ_METHODS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._read(name, method))
        self._grid_call = interpreter.GridExecutor.__call__
        recording, launch = self, self._grid_call

        def recorded_launch(executor, *args, **kwargs):
            if threading.current_thread() is not recording.thread:
                return launch(executor, *args, **kwargs)
            recording._launching = True
            try:
                launch(executor, *args, **kwargs)
            finally:
                recording._launching = False
            recording.ops.append(Launch(launch, executor, args, kwargs))

        interpreter.GridExecutor.__call__ = recorded_launch
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime import interpreter

        interpreter.GridExecutor.__call__ = self._grid_call
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _read(self, name, method):
        recording = self

        def read(tensor, *args, **kwargs):
            if threading.current_thread() is recording.thread and not recording._launching:
                raise CaptureError(f"Tensor.{name} inside a CUDA graph capture reads device values back to the host")
            return method(tensor, *args, **kwargs)
        return read


def attention_masked_on_device(q, k_cache, v_cache, kv_len, *, causal, scale, sliding_window=None, sinks=None,
                               gate=None):
    """`attention_ref` without its host read: every cache slot, masked by positions on the device
    (gpt-oss's sinks: one more logit per head, its share of the softmax dropped; Qwen3.5's output gate)."""
    out = _masked_on_device(q, k_cache, v_cache, kv_len, causal, scale, sliding_window, sinks)
    return out if gate is None else out * torch.sigmoid(gate)


def _masked_on_device(q, k_cache, v_cache, kv_len, causal, scale, sliding_window, sinks):
    tq, capacity = q.shape[0], k_cache.shape[1]
    q_pos = kv_len - tq + torch.arange(tq, device=q.device)[:, None]
    k_pos = torch.arange(capacity, device=q.device)[None, :]
    mask = k_pos < kv_len
    if causal:
        mask = mask & (k_pos <= q_pos)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    if sinks is not None:
        group = q.shape[1] // k_cache.shape[0]
        k, v = (c.repeat_interleave(group, 0).float() for c in (k_cache, v_cache))
        s = torch.einsum("thd,hnd->htn", q.float(), k) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.cat((s, sinks.float()[:, None, None].expand(-1, tq, 1)), dim=-1).softmax(-1)[..., :-1]
        return torch.einsum("htn,hnd->thd", p, v).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_cache[None], v_cache[None], attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


@contextlib.contextmanager
def stand_in(kernels: str = "reference", **card):
    """The package's GPU branches on this CPU, with a `FakeCuda(**card)` as torch.cuda; `kernels`:
    "reference" (the torch references in place of the Triton kernels) or "triton" (interpreted)."""
    from dflash_cli import cuda, ops

    assert kernels in ("reference", "triton")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("DFLASH_KERNELS", raising=False)
        patch.delenv("DFLASH_CUDA_GRAPHS", raising=False)
        if kernels == "reference":
            patch.setattr(ops, "_pick", lambda name, device: ops._impl(name, False))
            patch.setattr(ops, "attention", attention_masked_on_device)
        with cuda.use(FakeCuda(**card)) as gpu:
            yield gpu
