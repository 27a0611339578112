"""Programmatic dependent launch (kernels/pdl.py): on for an sm_90+ GPU with a Triton that has it, off on
older GPUs, on the CPU and under Triton's interpreter; the capability comes from dflash_cli/cuda.py (the
stand-in GPU plays a Hopper or an Ampere). That the PDL variants compile for sm_90/sm_120 is
tests/kernels/test_compile_kernels.py's."""
from __future__ import annotations

import pytest
import torch
from triton.runtime import interpreter

from dflash_cli import cuda
from dflash_cli.kernels import pdl
from dflash_cli.kernels.invariant_linear import invariant_linear

from ..fake_cuda import stand_in
from .test_invariant_linear import near_ties


def test_this_triton_has_pdl():
    """Triton 3.9 here, 3.6 on the GPU machines: both have gdc_wait and the launch_pdl option (3.4+)."""
    assert pdl.supported()


@pytest.mark.parametrize("capability,wanted", [((9, 0), True), ((12, 0), True), ((8, 9), False), ((8, 0), False)])
def test_pdl_is_wanted_from_sm_90_on(capability, wanted):
    with stand_in(capability=capability):
        gpu = cuda.device(0)
        assert cuda.capability(gpu) == capability
        assert pdl.wanted(gpu) is wanted
        assert not pdl.wanted(torch.device("meta"))  # not a GPU tensor
        assert not pdl.enabled(gpu)  # the interpreter runs these tests: the kernels are not compiled
        assert pdl.launch(gpu) == {"PDL": False}


def test_pdl_is_off_under_the_interpreter_and_with_dflash_pdl_0(monkeypatch):
    monkeypatch.setattr(pdl, "wanted", lambda device: True)
    assert not pdl.enabled(torch.device("cpu"))  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pdl.enabled(torch.device("cpu"))
    monkeypatch.setenv("DFLASH_PDL", "0")
    assert not pdl.enabled(torch.device("cpu"))


def test_a_hopper_launch_asks_for_pdl(monkeypatch):
    """Where it is enabled, a launch passes the PDL constexpr and the launch option (checked on the
    arguments the launcher gives the kernel, as the interpreter cannot run PDL's instructions)."""
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    assert pdl.launch(torch.device("cpu")) == {"PDL": True, "launch_pdl": True}
    seen = {}
    monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                        lambda self, *args, grid, warmup, **kwargs: seen.update(kwargs))
    x, w, b = near_ties(67, 1031, torch.float32, True)
    invariant_linear(x[:2], w, b)
    assert seen["PDL"] is True and seen["launch_pdl"] is True


def test_the_real_backend_reads_the_capability_from_torch(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (9, 0))
    with cuda.use(cuda.TorchCuda()):
        assert cuda.capability(torch.device("cuda", 1)) == (9, 0)
    assert asked == [torch.device("cuda", 1)]
