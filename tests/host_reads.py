"""A dispatch mode that records every way a piece of code makes the host wait for the device."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.equal.default, aten.is_nonzero.default}
MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostReads(TorchDispatchMode):
    """Records every op that would make the host wait for the device. On the CPU some reads skip
    the dispatcher (`tolist`, `int()` of an inference tensor; on CUDA each is a device-to-host
    copy), so the Python methods are watched too."""

    METHODS = ("tolist", "numpy", "cpu", "item", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self._methods = {name: getattr(torch.Tensor, name) for name in self.METHODS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or (func in MASK_INDEXING and any(
                i is not None and i.dtype == torch.bool for i in args[1])):  # a shape that depends on values
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, self._watch(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _watch(self, name, method):
        def watched(tensor, *args, **kwargs):
            self.seen.append(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return watched
