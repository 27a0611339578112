"""The mixture-of-experts MLP as a part the families share (research/moe-gptoss.md §3, hybrid.md §2):
the router, the experts' SwiGLU and Qwen3.5's gated shared expert; their weight tables in both
checkpoint layouts, stacked once at load.

Two layouts are released: per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen3-Coder,
and what transformers' save_pretrained writes) and fused `mlp.experts.gate_up_proj [E, 2I, H]` /
`mlp.experts.down_proj [E, H, I]` without a `.weight` suffix (the Qwen3.5/3.6-35B-A3B release). Both
load into the fused form; the kernels see one layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from .weights import Weight

FUSED, PER_EXPERT = "fused", "per-expert"


def layout_of(names) -> str:
    """The expert layout of a checkpoint, from its tensor names."""
    return FUSED if any(n.endswith("mlp.experts.gate_up_proj") for n in names) else PER_EXPERT


def moe_weights(p: str, hidden: int, n_experts: int, inter: int, layout: str | None,
                shared_inter: int = 0) -> list[Weight]:
    """Layer `p`'s MoE tensors (p ends with "mlp.")."""
    table = [Weight(p + "gate.weight", (n_experts, hidden), gain=4.0)]  # gain: a router that prefers some experts
    if layout == FUSED:
        table += [Weight(p + "experts.gate_up_proj", (n_experts, 2 * inter, hidden)),
                  Weight(p + "experts.down_proj", (n_experts, hidden, inter))]
    else:
        for e in range(n_experts):
            q = f"{p}experts.{e}."
            table += [Weight(q + "gate_proj.weight", (inter, hidden)), Weight(q + "up_proj.weight", (inter, hidden)),
                      Weight(q + "down_proj.weight", (hidden, inter))]
    if shared_inter:
        table += [Weight(p + "shared_expert.gate_proj.weight", (shared_inter, hidden)),
                  Weight(p + "shared_expert.up_proj.weight", (shared_inter, hidden)),
                  Weight(p + "shared_expert.down_proj.weight", (hidden, shared_inter)),
                  Weight(p + "shared_expert_gate.weight", (1, hidden))]
    return table


@dataclass
class MoE:
    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, 2I, H], gate rows first
    down: torch.Tensor  # [E, H, I]
    top_k: int
    renormalize: bool
    shared_gate_up: torch.Tensor | None = None  # Qwen3.5: a dense SwiGLU expert every token takes,
    shared_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None  # [1, H]: ... weighted by sigmoid(x · shared_gate)

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, n_experts: int, top_k: int, renormalize: bool) -> "MoE":
        """Pop layer `p`'s MoE tensors (either layout) from `w` and stack them into the fused form."""
        if p + "experts.gate_up_proj" in w:
            gate_up, down = w.pop(p + "experts.gate_up_proj"), w.pop(p + "experts.down_proj")
        else:
            names = [f"{p}experts.{e}." for e in range(n_experts)]
            gate_up = torch.stack([torch.cat((w.pop(q + "gate_proj.weight"), w.pop(q + "up_proj.weight")))
                                   for q in names])
            down = torch.stack([w.pop(q + "down_proj.weight") for q in names])
        moe = cls(w.pop(p + "gate.weight"), gate_up, down, top_k, renormalize)
        if p + "shared_expert_gate.weight" in w:
            s = p + "shared_expert."
            moe.shared_gate_up = torch.cat((w.pop(s + "gate_proj.weight"), w.pop(s + "up_proj.weight")))
            moe.shared_down, moe.shared_gate = w.pop(s + "down_proj.weight"), w.pop(p + "shared_expert_gate.weight")
        return moe

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = ops.moe_route(x, self.router, self.top_k, self.renormalize)
        y = ops.moe_experts(x, self.gate_up, self.down, idx, weights)
        if self.shared_gate is not None:
            shared = F.linear(ops.swiglu(F.linear(x, self.shared_gate_up)), self.shared_down)
            y = y + torch.sigmoid(F.linear(x, self.shared_gate)) * shared
        return y
