"""DFlash2's two additions to the v1 drafter (research/dflash2.md §1.3-1.4), as plain device ops.

1. A grouped, dynamic, causal depthwise convolution before and after every attention and MLP sublayer.
   Its time axis is the draft block only (zeros before the anchor row, no context, no state between
   drafts). One projection of the sublayer's input gives the dynamic kernels of both sides:

       d = kernel_projection(x).view(L, 2, K, G)              # G = H / group_size
       conv(z, side)[t, c] = Σ_o (base[side, o, c] + d[t, side, o, c // group_size]) · z[t - o, c]

2. A candidate selector. At each draft row t it rescores the head's top-k tokens with a low-rank
   bigram term and walks a chain from the anchor, left to right (a greedy walk, not Viterbi):

       S_t(a, b) = u_t(b) + ⟨A[a] ⊙ P h_t, B[b]⟩              # A, B: predecessor / successor codebooks
       d_t = argmax_b S_t(d_{t-1}, b),  d_0 = the anchor (the bonus token)

   The walk is an argmax at every temperature, so the draft stays a point mass and the engine's accept
   rule is exactly lossless unchanged. Every shape is fixed (no host reads): it runs inside the
   captured step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops


@dataclass
class DynamicConv:
    base: torch.Tensor  # [2, K, H]: (pre | post side, tap, channel)
    projection: torch.Tensor  # [2·K·G, H]

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The dynamic parts of both sides' kernels, [L, 2, K, G], from the sublayer input x [L, H]."""
        k = self.base.shape[1]
        return ops.dense_linear(x, self.projection).view(x.shape[0], 2, k, -1)

    def apply(self, z: torch.Tensor, side: int, dynamic: torch.Tensor) -> torch.Tensor:
        """conv(z) over the rows of z [L, H] with side 0 (pre) or 1 (post) of `dynamic` [L, 2, K, G]."""
        return dynamic_conv(z, self.base[side], dynamic[:, side])

    # On the fused kernels (ops.fused_linear_applies; kernels/fused_linear.py) a sublayer's norm, kernels, pre-conv,
    # projection and post-conv are three launches around its middle, each equal to the unfused ops above (the
    # norm to the rounding of the normed row, as every fused norm; the convs bit for bit).
    def normed_kernels(self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, residual: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(rms_norm(x [+ residual]), the new residual or None, `kernels` of it) in one launch: the norm in the
        kernel projection's prologue, the normed rows stored as it streams them, for the pre-conv to read."""
        dynamic, residual, h = ops.norm_linear_rows(x, norm_w, eps, self.projection, residual)
        return h, residual, dynamic.view(x.shape[0], 2, self.base.shape[1], -1)

    def project(self, h: torch.Tensor, dynamic: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                swiglu: bool = False) -> torch.Tensor:
        """The sublayer's projection of the pre-conv of h (then SwiGLU): the conv in the projection's loader."""
        return ops.conv_linear(h, self.base[0], dynamic[:, 0], w, b, swiglu)

    def project_out(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dynamic: torch.Tensor
                    ) -> torch.Tensor:
        """The post-conv of the output projection x @ w.T + b: the conv in the projection's merge."""
        return ops.linear_conv(x, w, b, self.base[1], dynamic[:, 1])


def dynamic_conv(z: torch.Tensor, base: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
    """Σ_o (base[o] + dynamic[:, o] per group) · z shifted down by o rows (zeros above row 0); z: [L, H],
    base: [K, H], dynamic: [L, K, G]. In z's dtype, tap by tap, so that an identity base with a zero dynamic
    part is z bit for bit (kernels/dynamic_conv.py: one launch, equal to its reference bit for bit)."""
    return ops.dynamic_conv(z, base, dynamic)


def pre_conv(conv: DynamicConv | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the sublayer's input after the pre-conv, the dynamic kernels); x itself without a conv (v1)."""
    if conv is None:
        return x, None
    dynamic = conv.kernels(x)
    return conv.apply(x, 0, dynamic), dynamic


def post_conv(conv: DynamicConv | None, out: torch.Tensor, dynamic: torch.Tensor | None) -> torch.Tensor:
    """The sublayer's output after the post-conv, whose kernel came from the sublayer's input."""
    return out if conv is None else conv.apply(out, 1, dynamic)


def head_logits(logits: torch.Tensor, multiplier: float, softcap: float | None) -> torch.Tensor:
    """The drafter's view of the target head: logits × output_multiplier, then c·tanh(z / c) when
    final_logit_softcapping c > 0 (both absent on most checkpoints: the logits untouched)."""
    if multiplier != 1.0:
        logits = logits * multiplier
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@dataclass
class CandidateSelector:
    hidden_projection: torch.Tensor  # P [r, H]
    predecessor: torch.Tensor  # A [V, r]
    successor: torch.Tensor  # B [V, r]
    top_k: int
    multiplier: float = 1.0  # the head's output_multiplier and final_logit_softcapping (`head_logits`)
    softcap: float | None = None

    def lattice(self, hidden: torch.Tensor, logits: torch.Tensor,
                anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates [L, k], scores [L, k, k]): S_t(a, b) for the k candidates a of row t - 1 (row 0:
        the anchor, repeated) and the k candidates b of row t. hidden: the normed final rows [L, H];
        logits: the target head's raw logits [L, V]; anchor: [1] id.

        One top-k over the L rows and one batched GEMM. The multiplier and softcap are monotone, so the
        top-k of the raw logits holds the same tokens; they are applied to the k values only, and the
        scores are summed in float32 whatever the model's dtype."""
        values, candidates = logits.topk(self.top_k, dim=-1)  # sorted: the same order every run
        unary = head_logits(values.float(), self.multiplier, self.softcap)
        p = ops.dense_linear(hidden, self.hidden_projection).float()  # [L, r]
        previous = torch.cat((anchor.view(1, 1).expand(1, self.top_k), candidates[:-1]))  # [L, k]
        left = F.embedding(previous, self.predecessor).float() * p[:, None, :]  # A[a] ⊙ P h_t
        right = F.embedding(candidates, self.successor).float()  # B[b]
        return candidates, unary[:, None, :] + left @ right.transpose(1, 2)

    def walk(self, hidden: torch.Tensor, logits: torch.Tensor, anchor: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The L drafted ids (written into `out` [L] when given): from the anchor, at each row the best
        candidate given the one chosen before (argmax: the lowest index on ties). Device ops only; the loop
        is over the fixed L."""
        candidates, scores = self.lattice(hidden, logits, anchor)
        return ops.selector_walk(scores, candidates, out)  # kernels/selector_walk.py: one launch
