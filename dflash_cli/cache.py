"""Static KV cache: preallocated to a maximum length, with the valid length kept on the device.

Tokens at position p live at index p. A forward writes K/V for its tokens at `length ..
length+T-1` and attends over `0 .. length+T-1`; only `commit` makes them part of the sequence, so
a rejected draft is never "removed": its slots are simply overwritten later. Rollback is a pointer
reset, and because the length is a tensor, a captured CUDA graph reads the current value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, kv_heads, capacity, head_dim]
    v: torch.Tensor
    length: torch.Tensor  # 0-d int64, on the cache's device

    @classmethod
    def allocate(
        cls, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> "KVCache":
        shape = (layers, kv_heads, capacity, head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            length=torch.zeros((), dtype=torch.int64, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def positions(self, count: int) -> torch.Tensor:
        """Positions of `count` new tokens appended after the committed ones."""
        return self.length + torch.arange(count, device=self.length.device)

    def commit(self, count: int | torch.Tensor) -> None:
        self.length.add_(count)

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
