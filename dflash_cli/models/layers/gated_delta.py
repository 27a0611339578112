"""The Gated DeltaNet mixer (Qwen3.5's linear attention) and its recurrent cache, with exact rollback.

The cache holds, per linear layer, an fp32 recurrent state and the conv's last K-1 inputs, which cannot
be rolled back by moving a pointer. So a verify forward does not write them: it records each token's
conv input and its (k, v, g, beta), and `commit` replays the recorded steps with the rejected ones
masked out (kernels/gated_delta.py), inside the captured step; a plan with a path replays that path's
rows. Between its projections a layer is two launches (kernels/gdn_glue.py): the prologue (conv step,
q/k norms, g and beta, written straight into the record) and the rule with the gated norm as epilogue.
A prefill chunk (`step.commit`) writes them directly. Prefix reuse across turns restarts only
from a snapshot taken during a prefill, never from live state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops
from ...cache import CommitPlan, KVCache
from ..weights import Weight
from .linear import Linear, take_linear
from .norm import GatedRMSNorm


@dataclass(frozen=True)
class GatedDeltaShape:
    heads_k: int  # key heads
    heads_v: int  # value heads (a multiple of key heads)
    dk: int
    dv: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.heads_k * self.dk

    @property
    def value_dim(self) -> int:
        return self.heads_v * self.dv

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def state_bytes(self) -> int:
        return self.heads_v * self.dk * self.dv * 4

    def record_bytes(self, dtype_size: int) -> int:
        """One recorded verify row: its conv input, k, v, g and beta."""
        return self.conv_dim * dtype_size + (self.key_dim + self.value_dim + 2 * self.heads_v) * 4


def gated_delta_weights(p: str, hidden: int, s: GatedDeltaShape) -> list[Weight]:
    """Layer `p`'s linear-attention tensors (p ends with the layer's ".")."""
    a, hv = p + "linear_attn.", s.heads_v
    return [Weight(a + "in_proj_qkv.weight", (s.conv_dim, hidden)),
            Weight(a + "in_proj_z.weight", (s.value_dim, hidden)),
            Weight(a + "in_proj_b.weight", (hv, hidden)), Weight(a + "in_proj_a.weight", (hv, hidden)),
            Weight(a + "conv1d.weight", (s.conv_dim, 1, s.conv_kernel), "conv"),
            Weight(a + "A_log", (hv,), "a_log", dtype="float32"),
            Weight(a + "dt_bias", (hv,), "uniform", dtype="float32"),
            Weight(a + "norm.weight", (s.dv,), "norm", dtype="float32"),
            Weight(a + "out_proj.weight", (hidden, s.value_dim))]


@dataclass
class RecurrentCache:
    """The linear layers' state (stacked over them: one replay kernel commits all layers at once)."""

    state: torch.Tensor  # [linear layers, Hv, dk, dv] fp32: the state after the committed tokens
    conv: torch.Tensor  # [linear layers, K-1, C]: the conv's last K-1 inputs
    rec_x: torch.Tensor  # [linear layers, B, C]: a verify block's conv inputs, for the commit
    rec_k: torch.Tensor  # [linear layers, B, Hk, dk] fp32, l2-normed
    rec_v: torch.Tensor  # [linear layers, B, Hv, dv] fp32
    rec_g: torch.Tensor  # [linear layers, B, Hv] fp32
    rec_beta: torch.Tensor  # [linear layers, B, Hv] fp32
    recorded: int = 0  # rows of the last verify forward

    @classmethod
    def allocate(cls, layers: int, s: GatedDeltaShape, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> "RecurrentCache":
        def zeros(*shape, dtype=dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        f32, n = torch.float32, layers
        return cls(state=zeros(n, s.heads_v, s.dk, s.dv, dtype=f32), conv=zeros(n, s.conv_kernel - 1, s.conv_dim),
                   rec_x=zeros(n, block_size, s.conv_dim), rec_k=zeros(n, block_size, s.heads_k, s.dk, dtype=f32),
                   rec_v=zeros(n, block_size, s.heads_v, s.dv, dtype=f32),
                   rec_g=zeros(n, block_size, s.heads_v, dtype=f32),
                   rec_beta=zeros(n, block_size, s.heads_v, dtype=f32))

    def commit(self, plan: CommitPlan) -> None:
        """Replay the recorded rows of the plan (its path's, gathered first; else 0..count-1) over the
        states of all layers at once, rejected steps masked (fixed shapes), and gather the conv windows."""
        t, path = self.recorded, plan.path
        if path is not None:  # a tree's path (at most its depth + 1 of its nodes): its rows read by index
            path = path[:min(t, path.shape[0])]
        # the replay and the conv windows (a path's rows gathered in the loads): one launch
        ops.gdn_commit(self.state, self.rec_k[:, :t], self.rec_v[:, :t], self.rec_g[:, :t], self.rec_beta[:, :t],
                       self.conv, self.rec_x[:, :t], plan.count, path)

    def reset(self) -> None:
        self.state.zero_()
        self.conv.zero_()

    def nbytes(self) -> int:
        return sum(x.nbytes for x in (self.state, self.conv, self.rec_x, self.rec_k, self.rec_v, self.rec_g,
                                      self.rec_beta))


@dataclass
class HybridCache:
    """Full-attention K/V (static, length on the device) and the linear layers' recurrent state."""

    kv: KVCache  # [full layers, ...]
    rec: RecurrentCache
    prefix: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (position, state, conv) kept by a prefill

    @property
    def length(self) -> torch.Tensor:
        return self.kv.length

    @property
    def lengths(self) -> torch.Tensor:
        return self.kv.lengths

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def state(self) -> torch.Tensor:
        return self.rec.state

    @property
    def conv(self) -> torch.Tensor:
        return self.rec.conv

    def positions(self, count: int) -> torch.Tensor:
        return self.kv.positions(count)

    def prefilled(self, count: int) -> None:
        """A prefill chunk of `count` tokens joined the sequence (the states were written through)."""
        self.kv.commit(count)

    def verify_rows(self, count: int) -> None:
        """A verify forward of `count` rows starts: the linear layers record them, for `commit`."""
        assert count <= self.rec.rec_x.shape[1], "a verify block larger than the cache's record"
        self.rec.recorded = count

    def commit(self, plan: CommitPlan | int | torch.Tensor) -> None:
        """The plan's rows of the last verify forward join the sequence: the linear layers' states are
        replayed over them, the conv windows gathered, the K/V rows put in place and the length moved."""
        plan = CommitPlan.of(plan)
        self.rec.commit(plan)
        self.kv.commit(plan)

    def reusable(self, length: int) -> int:
        """The longest prefix of at most `length` tokens this cache can restart from: its prefix
        snapshot, or nothing (a recurrent state cannot be rolled back to any other point)."""
        return self.prefix[0] if self.prefix is not None and self.prefix[0] <= length else 0

    def rollback(self, length: int) -> None:
        if length == 0:
            self.rec.reset()
        else:
            assert self.prefix is not None and self.prefix[0] == length, "only to the prefix snapshot"
            self.rec.state.copy_(self.prefix[1])
            self.rec.conv.copy_(self.prefix[2])
        self.kv.rollback(length)

    def keep_prefix(self) -> None:
        """Snapshot the state at the current length, for the next prompt that shares this prefix."""
        self.prefix = (int(self.length), self.rec.state.clone(), self.rec.conv.clone())

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.kv.snapshot(), self.rec.state.clone(), self.rec.conv.clone()

    def restore(self, snapshot) -> None:
        length, state, conv = snapshot
        self.kv.restore(length)
        self.rec.state.copy_(state)
        self.rec.conv.copy_(conv)

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.rec.nbytes() + (0 if self.prefix is None else
                                                       self.prefix[1].nbytes + self.prefix[2].nbytes)


@dataclass
class GatedDeltaNet:
    in_proj: Linear  # [qkv | z | b | a] rows: one GEMM
    conv: torch.Tensor  # [C, K]
    a_log: torch.Tensor  # [Hv] fp32
    dt_bias: torch.Tensor  # [Hv] fp32
    norm: GatedRMSNorm  # [dv] fp32, applied as w (not 1 + w)
    out_proj: Linear
    shape: GatedDeltaShape
    slot: int  # this layer's row in the recurrent cache

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, shape: GatedDeltaShape, eps: float, slot: int) -> "GatedDeltaNet":
        a = p + "linear_attn."
        proj = take_linear(w, *(a + f"in_proj_{n}" for n in ("qkv", "z", "b", "a")))
        return cls(proj, w.pop(a + "conv1d.weight")[:, 0], w.pop(a + "A_log"), w.pop(a + "dt_bias"),
                   GatedRMSNorm(w.pop(a + "norm.weight"), eps), take_linear(w, a + "out_proj"), shape, slot)

    def __call__(self, h: torch.Tensor, cache: HybridCache, step) -> torch.Tensor:
        """T tokens from the committed state of this layer: written through on a prefill chunk,
        recorded for the commit on a verify block."""
        if getattr(step, "mask", None) is not None:  # a tree verify: each node from its ancestors
            from .gated_delta_tree import gated_delta_tree

            return gated_delta_tree(self, h, cache, step)
        s, t, j, rec = self.shape, h.shape[0], self.slot, cache.rec
        proj = self.in_proj(h)  # [mixed | z | b | a]
        if step.commit:  # a prefill chunk: nothing to record; the state and the conv window move on
            f32 = dict(dtype=torch.float32, device=h.device)
            k, v = torch.empty(t, s.heads_k, s.dk, **f32), torch.empty(t, s.heads_v, s.dv, **f32)
            g, beta, x = torch.empty(t, s.heads_v, **f32), torch.empty(t, s.heads_v, **f32), None
        else:  # a verify block: written into the record, for `commit` to replay as far as it is accepted
            k, v, g, beta, x = (r[j, :t] for r in (rec.rec_k, rec.rec_v, rec.rec_g, rec.rec_beta, rec.rec_x))
        q = ops.gdn_prologue(proj, rec.conv[j], self.conv, self.a_log, self.dt_bias, s.heads_k, k, v, g, beta, x)
        if step.commit:
            rec.conv[j].copy_(torch.cat((rec.conv[j], proj[:, :s.conv_dim]))[t:])
        z = proj[:, s.conv_dim:s.conv_dim + s.value_dim]
        out = ops.gdn_rule_norm(q, k, v, g, beta, rec.state[j], s.dk**-0.5, z, self.norm.weight, self.norm.eps,
                                step.commit)
        return self.out_proj(out.reshape(t, -1))
