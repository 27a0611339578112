"""SwiGLU activation for the MLP: silu(gate) * up, with gate and up from one fused GEMM."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference: `gate_up[..., :I]` is the gate, `gate_up[..., I:]` the up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
