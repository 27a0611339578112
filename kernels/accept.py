"""Accept/bonus for one speculative iteration, and the sampler it is built on.

Given the target's logits at the B block positions and the block `[bonus, d1 .. d(B-1)]`, pick the
target's token y_i at every position, accept drafts while `d(i+1) == y(i)`, and advance the cache
length by `a + 1`. With a point-mass draft this is exactly lossless at any temperature (DESIGN §1).
Emitted tokens are `y[: a + 1]`: the accepted drafts equal the target's own choices, and `y[a]`
is the new bonus.

Sampling is Gumbel-max with counter-based noise: the noise for the token sampled from logits at
sequence position p is a hash of (seed, p, vocab id). It depends on the position, never on the
iteration, so a seeded speculative run emits exactly the tokens a seeded plain run does (the
target distributions being equal), and the kernel and this reference draw the same sample.
Filters: temperature, then top-k, then top-p on the renormalised top-k distribution, then min-p.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def uniform_noise(seed: int, rows: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32, [len(rows), vocab]: a pure function of (seed, row, vocab id).

    Two keys per row keep rows from colliding as whole permutations of each other.
    """
    key_a = fmix32((rows & M32) ^ (seed & M32))[:, None]
    key_b = fmix32(key_a ^ 0x5BD1E995)
    v = torch.arange(vocab, device=rows.device, dtype=torch.int64)[None, :]
    h = fmix32(fmix32((v + key_a) & M32) ^ key_b)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def filtered_scores(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """logits / T with the tokens removed by top-k, top-p and min-p set to -inf (float32)."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(scores.softmax(-1), dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


def sample_ref(
    logits: torch.Tensor,
    rows: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """One token per row of `logits` [N, V]; `rows` [N] are the sequence positions of the logits.

    temperature == 0 is greedy (first maximal index, as torch.argmax and transformers do).
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    scores = filtered_scores(logits, temperature, top_k, top_p, min_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, rows, logits.shape[-1])))
    return (scores + gumbel).argmax(-1)


def accept_ref(
    logits: torch.Tensor,
    block_ids: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference. logits: [B, V] at positions cache_len .. cache_len+B-1; block_ids: [B].

    Returns (y [B], accepted a: 0-d int64) and advances `cache_len` (0-d int64) by a + 1 in place.
    """
    rows = cache_len + torch.arange(logits.shape[0], device=logits.device)
    y = sample_ref(
        logits, rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    accepted = (block_ids[1:] == y[:-1]).cumprod(0).sum()
    cache_len.add_(accepted + 1)
    return y, accepted
