"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the
kernel before it on the stream is still running, so its launch latency and prologue hide under that
kernel's tail. The kernel must then wait (`griddepcontrol.wait`) before it touches global memory, and it
lets the kernel after it start early (`griddepcontrol.launch_dependents`).

A kernel opts in with a `PDL: tl.constexpr` parameter, `pdl.wait(PDL)` before its first global load or
store, `pdl.launch_dependents(PDL)` after it, and its launcher passing `**pdl.launch(device)`: PDL=True
with `launch_pdl=True` where `enabled(device)`, PDL=False (and nothing else) elsewhere. The waits are at
the top: a kernel reads its inputs and may reuse shared scratch (invariant_linear's tickets), so nothing
of it may overlap the previous kernel's writes; what overlaps is the launch, not the body.

On where Triton has it (`tl.extra.cuda.gdc_wait` and the `launch_pdl` launch option, Triton ≥ 3.4) and
the device is sm_90 or later (dflash_cli/cuda.py decides the capability, so the stand-in GPU of the tests
can play a Hopper); off under Triton's interpreter and on older GPUs, where the constexpr drops the
instructions from the kernel. DFLASH_PDL=0 turns it off everywhere (no GPU has timed it yet).
"""
from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

from .. import cuda

MIN_CAPABILITY = (9, 0)


@cache
def supported() -> bool:
    """Whether this Triton has the grid-dependency instructions and the `launch_pdl` launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as extra
    except ImportError:
        return False
    return (hasattr(extra, "gdc_wait") and hasattr(extra, "gdc_launch_dependents")
            and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}))


def wanted(device: torch.device) -> bool:
    """Whether a launch on `device` would use PDL on a GPU: a Triton that has it and a GPU of sm_90+."""
    return supported() and cuda.is_gpu(device) and cuda.capability(device) >= MIN_CAPABILITY


def enabled(device: torch.device) -> bool:
    """`wanted`, the kernels compiled for the GPU (not run by Triton's CPU interpreter), and not turned
    off with DFLASH_PDL=0."""
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("DFLASH_PDL", "1") != "0" and wanted(device)


def launch(device: torch.device) -> dict:
    """The launch keywords of a PDL-aware kernel: its PDL constexpr, and the launch option with it."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def wait(PDL: tl.constexpr):
    """Before the kernel's first global access: the previous kernel has finished and its writes are seen."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel on the stream launch now (it waits in its own `wait` for this one to finish)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
