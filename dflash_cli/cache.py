"""Caches and what the accept step tells them: a static KV cache, preallocated to a maximum length,
with the valid length kept on the device, and the `CommitPlan` every cache commits by.

Tokens at position p live at index p. A forward writes K/V for its tokens at `length ..
length+T-1` and attends over `0 .. length+T-1`; only `commit` makes them part of the sequence, so
a rejected draft is never "removed": its slots are simply overwritten later. Rollback is a pointer
reset, and because the length is a tensor, a captured CUDA graph reads the current value.

Every cache (this one, the hybrid's recurrent state in models/layers/gated_delta.py, the drafter's
context) answers the same `Cache` protocol, which is all the engine relies on. Lengths are stored
with a batch axis, `lengths: [B]` (B = 1 today; `length` is the one row's 0-d view), so that a
batched engine later changes shapes, not the protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class CommitPlan:
    """What the accept step decided, on the device: which rows of the last verify forward join the
    sequence. `count` (a 0-d tensor or an int): how many. `path` ([b] int64 on the device, or None):
    the verify rows of the accepted path in order, for a tree verify whose accepted tokens are not
    rows 0..count-1; None means rows 0..count-1 (a chain, every verify today)."""

    count: Any  # int | torch.Tensor
    path: torch.Tensor | None = None

    @staticmethod
    def of(plan: "CommitPlan | int | torch.Tensor") -> "CommitPlan":
        return plan if isinstance(plan, CommitPlan) else CommitPlan(plan)


@runtime_checkable
class Cache(Protocol):
    """What the engine, the graphs and the memory plan rely on, for every cache."""

    length: torch.Tensor  # 0-d int64: committed tokens (row 0 of `lengths`)

    def positions(self, count: int) -> torch.Tensor: ...
    def prefilled(self, count: int) -> None: ...
    def verify_rows(self, count: int) -> None: ...
    def commit(self, plan: CommitPlan) -> None: ...
    def reusable(self, length: int) -> int: ...
    def rollback(self, length: int | torch.Tensor) -> None: ...
    def keep_prefix(self) -> None: ...
    def snapshot(self) -> Any: ...
    def restore(self, snapshot: Any) -> None: ...
    def nbytes(self) -> int: ...


def new_lengths(device: torch.device) -> torch.Tensor:
    """A cache's committed length: a [1] buffer (the batch axis), handed out as its 0-d row view."""
    return torch.zeros(1, dtype=torch.int64, device=device)[0]


def gather_rows(buffer: torch.Tensor, dim: int, start: torch.Tensor, path: torch.Tensor) -> None:
    """Move rows `start + path[i]` of `buffer` along `dim` to `start + i` (all of path's rows at once,
    gathered before any is written; no host read)."""
    index = start + path
    rows = buffer.index_select(dim, index)
    buffer.index_copy_(dim, start + torch.arange(path.shape[0], device=path.device), rows)


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, kv_heads, capacity, head_dim]
    v: torch.Tensor
    length: torch.Tensor  # 0-d int64, on the cache's device (row 0 of `lengths`)

    @classmethod
    def allocate(
        cls, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> "KVCache":
        shape = (layers, kv_heads, capacity, head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            length=new_lengths(device),
        )

    @property
    def lengths(self) -> torch.Tensor:
        """[B] committed lengths, one per sequence (B = 1)."""
        return self.length.view(1)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def kv(self) -> "KVCache":
        """The attention layers' K/V (a target cache with more state holds one as `kv`)."""
        return self

    def layer(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention layer `slot`'s K and V, each [kv_heads, capacity, head_dim]."""
        return self.k[slot], self.v[slot]

    def prefilled(self, count: int) -> None:
        """A prefill chunk of `count` tokens joined the sequence."""
        self.length.add_(count)

    def verify_rows(self, count: int) -> None:
        """A verify forward of `count` rows starts (their K/V past the length until `commit`)."""

    def positions(self, count: int) -> torch.Tensor:
        """Positions of `count` new tokens appended after the committed ones."""
        return self.length + torch.arange(count, device=self.length.device)

    def commit(self, plan: CommitPlan | int | torch.Tensor) -> None:
        """The plan's rows of the last forward join the sequence: a chain's are in place already (the
        length moves); a path's K/V rows are first gathered into place."""
        plan = CommitPlan.of(plan)
        if plan.path is not None:
            gather_rows(self.k, 2, self.length, plan.path)
            gather_rows(self.v, 2, self.length, plan.path)
        self.length.add_(plan.count)

    def reusable(self, length: int) -> int:
        """The longest prefix of at most `length` tokens this cache can restart from: all of it (rolling
        back is moving the length; later slots are overwritten)."""
        return length

    def rollback(self, length: int | torch.Tensor) -> None:
        self.length.fill_(length)

    def keep_prefix(self) -> None:
        """Nothing to keep: any prefix can be restarted from."""

    def snapshot(self) -> torch.Tensor:
        """What a forward and a commit change, besides slots past the length (which are free)."""
        return self.length.clone()

    def restore(self, snapshot: torch.Tensor) -> None:
        self.length.copy_(snapshot)

    def nbytes(self) -> int:
        """Device bytes this cache holds."""
        return self.k.nbytes + self.v.nbytes


@dataclass
class GroupedKVCache(KVCache):
    """K/V of a model whose attention layers differ in shape (Gemma 4: sliding layers of 256-dim heads,
    global ones of 512 with their own head count): one [layers, kv_heads, capacity, head_dim] pair per
    shape, `k[g]`/`v[g]`, sharing one length; `slots[i]` = (group, row) of attention layer i. Everything
    else (commit, rollback, snapshot) is the plain cache's, applied to every group."""

    slots: tuple[tuple[int, int], ...] = ()

    @classmethod
    def allocate_groups(cls, shapes: list[tuple[int, int]], capacity: int, dtype: torch.dtype,
                        device: torch.device) -> "GroupedKVCache":
        """shapes[i] = (kv_heads, head_dim) of attention layer i; layers of one shape share a group."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            groups.setdefault(shape, []).append(i)
        slots: list[tuple[int, int]] = [(0, 0)] * len(shapes)
        k, v = [], []
        for g, ((heads, dim), layers) in enumerate(groups.items()):
            for row, i in enumerate(layers):
                slots[i] = (g, row)
            k.append(torch.zeros((len(layers), heads, capacity, dim), dtype=dtype, device=device))
            v.append(torch.zeros_like(k[-1]))
        return cls(k=k, v=v, length=new_lengths(device), slots=tuple(slots))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def layer(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, row = self.slots[slot]
        return self.k[g][row], self.v[g][row]

    def commit(self, plan: CommitPlan | int | torch.Tensor) -> None:
        plan = CommitPlan.of(plan)
        if plan.path is not None:
            for k, v in zip(self.k, self.v):
                gather_rows(k, 2, self.length, plan.path)
                gather_rows(v, 2, self.length, plan.path)
        self.length.add_(plan.count)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))
