"""The DFlash training objective: many draft blocks per sequence in one forward, and the loss.

For every anchor position a of a sequence, the drafter sees the block `[x_a, MASK × (B-1)]` at
positions a..a+B-1, exactly as it does when drafting after committing x_0..x_(a-1) with bonus x_a
(DESIGN §1), and is trained to write x_(a+1)..x_(a+B-1). All anchors of a batch run in one forward
through one block-sparse mask: a block's queries see the context K/V of its own sequence's tokens
before a (projected from the target's features by each layer's k/v projections) and the K/V of
their own block, non-causally; never another block. This equals one inference forward per anchor
(tests/test_train_objective.py checks it against dflash_cli/drafter.py).

Keys are [the sequence's context | all its blocks]; the mask lets a query see context positions
before its anchor and its own block's B keys (SpecForge's and speculators' mask, written as one
boolean tensor for torch's fused attention). On a GPU the attention takes it as an additive mask
and K/V expanded to the query heads (`attention`): the one form a fused CUDA kernel accepts.

Loss: cross-entropy at the B-1 masked positions, weighted w_k = exp(-(k-1)/γ) (the paper's Eq. 4,
position k = 1..B-1): an early position's error ends the accepted run, so it costs more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import cuda
from .model import DraftLayer, DraftNet

# Decay γ of the position weights for the released block sizes (SpecForge's recommendation,
# from the paper): 7 for blocks of 16, 5 for 10, 4 for 8. Other sizes: B/2.
_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}


def loss_gamma(block_size: int) -> float:
    return _GAMMA.get(block_size, max(1.0, block_size / 2))


@dataclass
class Sequence:
    """One training example: a prompt and the target's own answer, as token ids."""

    ids: list[int]
    prompt_len: int


@dataclass
class Batch:
    ids: torch.Tensor  # [Q, S] int64, zero-padded
    features: torch.Tensor  # [Q, S, n·H] the target's features (no grad), zero-padded
    anchors: torch.Tensor  # [Q, N] int64 positions (0 where invalid)
    valid: torch.Tensor  # [Q, N, B-1] bool: the label at anchor + k exists
    labels: torch.Tensor  # [Q, N, B-1] int64


def anchor_candidates(seq: Sequence) -> range:
    """Anchors are answer tokens (the first bonus is the first answer token, at prompt_len) with at
    least one token after them to predict; never position 0, which has no context at inference."""
    return range(max(seq.prompt_len, 1), len(seq.ids) - 1)


def sample_anchors(seqs: list[Sequence], count: int, generator: torch.Generator) -> list[list[int]]:
    """Up to `count` distinct anchors per sequence, uniformly at random, sorted."""
    out = []
    for seq in seqs:
        cands = anchor_candidates(seq)
        pick = torch.randperm(len(cands), generator=generator)[:count]
        out.append(sorted(cands[i] for i in pick.tolist()))
    return out


def make_batch(seqs: list[Sequence], features: list[torch.Tensor], anchors: list[list[int]],
               block_size: int) -> Batch:
    """Pad sequences, their features and anchor lists into one batch; labels are ids[a+1..a+B-1]."""
    device = features[0].device
    q, s, n = len(seqs), max(len(x.ids) for x in seqs), max(1, max(len(a) for a in anchors))
    ids = torch.zeros(q, s, dtype=torch.int64)
    feats = torch.zeros(q, s, features[0].shape[-1], dtype=features[0].dtype, device=device)
    pos = torch.zeros(q, n, dtype=torch.int64)
    has_anchor = torch.zeros(q, n, dtype=torch.bool)
    for i, (seq, f, a) in enumerate(zip(seqs, features, anchors)):
        ids[i, : len(seq.ids)] = torch.tensor(seq.ids)
        feats[i, : len(seq.ids)] = f
        pos[i, : len(a)] = torch.tensor(a, dtype=torch.int64)
        has_anchor[i, : len(a)] = True
    lengths = torch.tensor([len(x.ids) for x in seqs])
    label_pos = pos[..., None] + torch.arange(1, block_size)  # [Q, N, B-1]
    valid = has_anchor[..., None] & (label_pos < lengths[:, None, None])
    labels = ids.gather(1, label_pos.clamp(max=s - 1).view(q, -1)).view_as(label_pos)
    return Batch(ids.to(device), feats, pos.to(device), valid.to(device), labels.to(device))


def _rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding. x: [..., heads, D]; cos_sin: [..., D] = [cos | sin]."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[..., None, :half].to(x.dtype), cos_sin[..., None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def block_mask(anchors: torch.Tensor, context: int, block_size: int, window: int | None = None,
               causal: bool = False) -> torch.Tensor:
    """The block-sparse mask, [Q, 1, N·B, S + N·B] (True: visible). Keys are a sequence's S context
    tokens, then every block of it; a query of block n sees context positions < anchor n and the
    B keys of block n, nothing else. A sliding layer (`window`) also hides keys `window` or more
    positions behind the query; a causal one (the newer drafters' sliding layers) hides the block's
    later positions from the earlier ones, as at inference (dflash_cli/drafter.py)."""
    q, n = anchors.shape
    device = anchors.device
    i = torch.arange(block_size, device=device).repeat(n)  # each query's place in its block
    query_pos = anchors.repeat_interleave(block_size, 1) + i  # [Q, N·B]
    keys = torch.arange(context, device=device)
    sees_context = keys < anchors.repeat_interleave(block_size, 1)[..., None]  # [Q, N·B, S]
    if window is not None:
        sees_context = sees_context & (query_pos[..., None] - keys < window)
    block = torch.arange(n * block_size, device=device) // block_size
    own_block = block[:, None] == block[None, :]
    if causal:
        own_block = own_block & (i[None, :] <= i[:, None])
    if window is not None:
        own_block = own_block & (i[:, None] - i[None, :] < window)
    return torch.cat((sees_context, own_block.expand(q, -1, -1)), dim=-1)[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`mask` (block_mask's, bool) as the additive mask the GPU branch of `attention` takes: 0 where
    visible, -inf elsewhere, in the dtype SDPA runs in. The last dimension is allocated padded to a
    multiple of 16 and sliced back: SDPA's memory-efficient path pad-copies a mask whose strides are
    not multiples of 8 (`preprocess_mask` in torch's attention.cpp), at every call, and the copy
    would be kept for each layer's backward."""
    *lead, keys = mask.shape
    out = torch.zeros(*lead, (keys + 15) // 16 * 16, dtype=dtype, device=mask.device)[..., :keys]
    return out.masked_fill_(~mask, float("-inf"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention under the block-sparse mask. q: [Q, Hq, L, D]; k, v: [Q, Hkv, S, D];
    mask: [Q, 1, L, S], bool on a CPU, `additive_mask` on a GPU.

    On a CPU the fused kernel takes GQA and the bool mask as they are (3x faster than computing only
    the context and own-block scores by hand: it never materialises them). On CUDA that call falls
    to SDPA's math kernel, which materialises every score (gpu-review-2 F7: ~21 GB per layer at a
    Qwen3-4B drafter's training shapes): flash refuses any mask, the memory-efficient kernel is
    built without GQA, and math comes before cuDNN. K/V expanded to the query heads (what enable_gqa
    means: repeat_interleave over heads) and a mask in the query's dtype are what the
    memory-efficient kernel takes; q, k and v are cast first so that autocast casts nothing (the
    mask least of all) at every layer."""
    if not cuda.is_gpu(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    assert mask.is_floating_point(), "the GPU branch takes additive_mask's mask"
    groups = q.shape[1] // k.shape[1]
    q, k, v = (t.to(mask.dtype) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=mask, scale=scale)


def _layer(layer: DraftLayer, x: torch.Tensor, ctx_h: torch.Tensor, cs_blk: torch.Tensor,
           cs_ctx: torch.Tensor, mask: torch.Tensor, kv_heads: int, scale: float) -> torch.Tensor:
    """One draft layer over all blocks. x: [Q, N, B, H]; ctx_h: [Q, S, H]; mask: see block_mask."""
    a = layer.self_attn
    q_, n, b, _ = x.shape
    d = a.q_norm.weight.shape[0]
    h = layer.input_layernorm(x)
    q = _rotate(a.q_norm(a.q_proj(h).unflatten(-1, (-1, d))), cs_blk)  # [Q, N, B, Hq, D]
    k_blk = _rotate(a.k_norm(a.k_proj(h).unflatten(-1, (kv_heads, d))), cs_blk)  # [Q, N, B, Hkv, D]
    v_blk = a.v_proj(h).unflatten(-1, (kv_heads, d))
    k_ctx = _rotate(a.k_norm(a.k_proj(ctx_h).unflatten(-1, (kv_heads, d))), cs_ctx)  # [Q, S, Hkv, D]
    v_ctx = a.v_proj(ctx_h).unflatten(-1, (kv_heads, d))
    k = torch.cat((k_ctx, k_blk.flatten(1, 2)), dim=1).transpose(1, 2)  # [Q, Hkv, S + N·B, D]
    v = torch.cat((v_ctx, v_blk.flatten(1, 2)), dim=1).transpose(1, 2)
    out = attention(q.flatten(1, 2).transpose(1, 2), k, v, mask, scale)
    x = x + a.o_proj(out.transpose(1, 2).reshape(q_, n, b, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def block_hidden(net: DraftNet, embed: torch.Tensor, cos_sin: torch.Tensor, batch: Batch,
                 grad_checkpoint: bool = False, embed_scale: float = 1.0) -> torch.Tensor:
    """The drafter's final-normed outputs at block positions 1..B-1: [Q, N, B-1, H]. `embed_scale`: the
    block's embeddings times this, as the target scales its own (Gemma 4: √hidden)."""
    c = net.cfg
    b = c.block_size
    q_, s = batch.ids.shape
    device = batch.ids.device
    ctx_h = net.hidden_norm(net.fc(batch.features))
    block_ids = torch.full((q_, batch.anchors.shape[1], b), c.mask_token_id, dtype=torch.int64, device=device)
    block_ids[..., 0] = batch.ids.gather(1, batch.anchors)
    x = F.embedding(block_ids, embed)
    x = (x * embed_scale if embed_scale != 1.0 else x).to(ctx_h.dtype)
    cs_blk = cos_sin[batch.anchors[..., None] + torch.arange(b, device=device)]
    cs_ctx = cos_sin[:s]
    masks = {kind: block_mask(batch.anchors, s, b, *kind) for kind in set(zip(c.sliding_windows, c.causal))}
    if cuda.is_gpu(device):  # converted once here, shared by every layer, rather than by SDPA per layer
        masks = {kind: additive_mask(m, _attention_dtype(ctx_h)) for kind, m in masks.items()}
    scale = c.head_dim**-0.5
    for layer, kind in zip(net.layers, zip(c.sliding_windows, c.causal)):
        args = (layer, x, ctx_h, cs_blk, cs_ctx, masks[kind], c.num_kv_heads, scale)
        x = checkpoint(_layer, *args, use_reentrant=False) if grad_checkpoint else _layer(*args)
    return net.norm(x[:, :, 1:])


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype SDPA runs in: autocast's where it is on (the RMSNorms' fp32 weights make q and k
    fp32 even then), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _head_loss(h: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor, softcap: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, lm_head).float()
    if softcap is not None:  # the target's head soft-caps its logits (Gemma 4): the drafter's does too
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


@dataclass
class StepResult:
    loss: torch.Tensor  # the weighted loss (differentiable)
    accuracy: float  # share of labels the drafter's argmax gets right
    tau: float  # estimated acceptance length: 1 + the mean run of correct drafts from position 1
    labels: int  # label positions trained on


def block_loss(net: DraftNet, embed: torch.Tensor, lm_head: torch.Tensor, cos_sin: torch.Tensor, batch: Batch,
               *, gamma: float, grad_checkpoint: bool = False, chunk_rows: int = 2048, embed_scale: float = 1.0,
               softcap: float | None = None) -> StepResult:
    """Weighted cross-entropy at the masked positions of every block.

    The lm_head runs in chunks of rows, each recomputed in the backward pass: the logits of all
    blocks at once (anchors × B × vocab) would not fit for a 150k vocabulary."""
    hidden = block_hidden(net, embed, cos_sin, batch, grad_checkpoint, embed_scale)
    k = torch.arange(1, net.cfg.block_size, device=hidden.device, dtype=torch.float32)
    weights = torch.exp(-(k - 1) / gamma).expand(batch.valid.shape) * batch.valid
    rows = batch.valid.nonzero(as_tuple=True)
    h, labels, w = hidden[rows], batch.labels[rows], weights[rows]
    ce, pred = [], []
    for start in range(0, h.shape[0], chunk_rows):
        part = slice(start, start + chunk_rows)
        c, p = checkpoint(_head_loss, h[part], lm_head, labels[part], softcap, use_reentrant=False)
        ce.append(c)
        pred.append(p)
    ce, pred = torch.cat(ce), torch.cat(pred)
    loss = (ce * w).sum() / w.sum().clamp(min=1e-6)
    with torch.no_grad():
        correct = torch.zeros(batch.valid.shape, dtype=torch.bool, device=hidden.device)
        correct[rows] = pred == labels
        run = correct.long().cumprod(-1).sum(-1)  # leading correct drafts per block
        has = batch.valid[..., 0]
        tau = float(run[has].float().mean()) + 1 if has.any() else math.nan
        accuracy = float((pred == labels).float().mean()) if labels.numel() else math.nan
    return StepResult(loss, accuracy, tau, int(labels.numel()))
