"""The MLPs: SwiGLU, the mixture of experts (router variants as parameters, an optional gated shared
expert), gpt-oss's experts (biases, the clamped SwiGLU, MXFP4 blocks), and Gemma 4's GELU-tanh MLP
with its routed experts. Their weight tables.

Two MoE layouts are released: per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight`
(Qwen3-Coder, and what transformers' save_pretrained writes) and fused `mlp.experts.gate_up_proj
[E, 2I, H]` / `mlp.experts.down_proj [E, H, I]` without a `.weight` suffix (the Qwen3.5/3.6-35B-A3B
release). Both load into the fused form; the kernels see one layout. gpt-oss experts load as released:
`*_blocks` / `*_scales` as raw u8 (dequantised inside the expert kernel), or, for a dequantised export,
transformers' dense parameters ([E, in, out]: transposed once at load into the kernels' [E, out, in]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import ops
from ..weights import Weight
from ...errors import DflashError
from ...quant import Fp8Linear, Int4Linear, Int8Linear
from .linear import Concat, Dense, Linear, quantized_scheme, take_linear, take_one

FUSED, PER_EXPERT = "fused", "per-expert"
MXFP4, DENSE = "mxfp4", "dense"


def mlp_weights(p: str, hidden: int, inter: int) -> list[Weight]:
    """A SwiGLU MLP's tensors (p ends with "mlp.")."""
    return [Weight(p + "gate_proj.weight", (inter, hidden)), Weight(p + "up_proj.weight", (inter, hidden)),
            Weight(p + "down_proj.weight", (hidden, inter))]


@dataclass
class SwiGLU:
    gate_up: Linear  # gate and up projections stacked: one GEMM
    down: Linear

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str) -> "SwiGLU":
        return cls(take_linear(w, p + "gate_proj", p + "up_proj"), take_linear(w, p + "down_proj"))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gate_up, Dense) and ops.fused_linear_applies(h):  # SwiGLU in the GEMM's epilogue
            return self.down(ops.swiglu_linear(h, self.gate_up.weight, self.gate_up.bias))
        return self.down(ops.swiglu(self.gate_up(h)))

    def after_norm(self, norm, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`norm(x, residual)` then this MLP: (out, new residual). On the fused kernels (a plain-style norm,
        a dense gate_up) the norm, the residual add, gate_up and SwiGLU are one launch, whose new residual
        is a new tensor (not `residual` updated in place)."""
        if isinstance(self.gate_up, Dense) and norm.style == "plain" and ops.fused_linear_applies(x):
            h, residual = ops.norm_swiglu_linear(x, norm.weight, norm.eps, self.gate_up.weight, self.gate_up.bias,
                                                 residual)
            return self.down(h), residual
        h, residual = norm(x, residual)
        return self(h), residual


@dataclass
class GeluGLU:
    """gelu_tanh(gate x) ⊙ (up x), then down (Gemma's MLP): the SwiGLU's layout, another activation."""

    gate_up: Linear
    down: Linear

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str) -> "GeluGLU":
        return cls(take_linear(w, p + "gate_proj", p + "up_proj"), take_linear(w, p + "down_proj"))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)


def gemma_expert_weights(p: str, hidden: int, n_experts: int, inter: int) -> list[Weight]:
    """Gemma 4's router (p: the layer's prefix) and fused experts [E, 2I, H] (gate rows first), [E, H, I]."""
    return [Weight(p + "router.proj.weight", (n_experts, hidden), gain=4.0),
            Weight(p + "router.scale", (hidden,), "norm"), Weight(p + "router.per_expert_scale", (n_experts,), "norm"),
            Weight(p + "experts.gate_up_proj", (n_experts, 2 * inter, hidden)),
            Weight(p + "experts.down_proj", (n_experts, hidden, inter))]


GATHER_ROWS = 32  # up to this many tokens gather their experts' weights (one bmm); more loop over experts


@dataclass
class GemmaExperts:
    """Gemma 4's sparse block: the router reads the unscaled RMS-normed residual times `scale` and
    hidden^-0.5, softmaxes all logits in fp32, keeps the top k renormalised, times `per_expert_scale`;
    each chosen expert is a GELU-tanh GLU. A token's sum runs over its experts in rank order, whatever
    the other rows (a verify row equals the decode of the same token). Quantized experts stay packed;
    a step dequantizes (reference dequantizer, activations' dtype) only the experts it runs: one copy per
    (token, rank) up to GATHER_ROWS tokens, one expert at a time beyond; the dequantized twin's GEMMs follow."""

    proj: Linear  # [E, H]
    scale: torch.Tensor  # [H]
    per_expert_scale: torch.Tensor  # [E]
    gate_up: "torch.Tensor | Int4Linear | Fp8Linear | Int8Linear | ExpertList"  # [E, 2I, H] (quantized: as stored)
    down: "torch.Tensor | Int4Linear | Fp8Linear | Int8Linear | ExpertList"  # [E, H, I]
    top_k: int
    eps: float

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, top_k: int, eps: float) -> "GemmaExperts":
        """The router (dense, always) and the experts: fused [E, out, in] stacks (plain or stored quantized) or
        per-expert projections `experts.{e}.{gate,up,down}_proj` (what quantizing at load writes)."""
        if quantized_scheme(w, p + "router.proj") is not None:  # a "proj" the loader reads as a projection
            raise DflashError(f"{p}router.proj is stored quantized, but it is a router, which dflash reads dense: "
                              "use a checkpoint that keeps it in bf16 (its quantization_config's ignore list)")
        proj, scale, per_expert = (take_linear(w, p + "router.proj"), w.pop(p + "router.scale"),
                                   w.pop(p + "router.per_expert_scale"))
        fused = p + "experts.gate_up_proj"
        if fused in w or quantized_scheme(w, fused) is not None:
            gate_up = _experts(take_one(w, fused, dense_key=fused))
            down = _experts(take_one(w, p + "experts.down_proj", dense_key=p + "experts.down_proj"))
        else:
            names = [f"{p}experts.{e}." for e in range(per_expert.shape[0])]
            gate_up = _stack_experts([take_linear(w, q + "gate_proj", q + "up_proj") for q in names], p)
            down = _stack_experts([take_linear(w, q + "down_proj") for q in names], p)
        return cls(proj, scale, per_expert, gate_up, down, top_k, eps)

    def route(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones_like(self.scale, dtype=torch.float32)
        h, _ = ops.rms_norm(residual, ones, self.eps, fp32_weight=True)
        h = h * self.scale * self.scale.shape[0] ** -0.5
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, weights * self.per_expert_scale[idx]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x: the experts' input (normed), residual: what the router reads; both [T, H]."""
        idx, weights = self.route(residual)
        t, k = idx.shape
        if t <= GATHER_ROWS:  # graph-safe: rank by rank, each token's expert matrices gathered
            y = None
            for j in range(k):
                e = idx[:, j]
                gate, up = torch.bmm(_gemma_pick(self.gate_up, e, x.dtype), x[:, :, None])[..., 0].chunk(2, dim=-1)
                out = torch.bmm(_gemma_pick(self.down, e, x.dtype),
                                (F.gelu(gate, approximate="tanh") * up)[:, :, None])[..., 0]
                out = out.float() * weights[:, j, None]  # weighted and summed in fp32, rounded once
                y = out if y is None else y + out
            return y.to(x.dtype)
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in idx.unique().tolist():
            rows, rank = torch.where(idx == e)
            gate, up = (x[rows] @ _gemma_expert(self.gate_up, e, x.dtype).T).chunk(2, dim=-1)
            out = (F.gelu(gate, approximate="tanh") * up) @ _gemma_expert(self.down, e, x.dtype).T
            y.index_add_(0, rows, out.float() * weights[rows, rank, None])
        return y.to(x.dtype)


def _gemma_pick(stack, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [len(e), out, in] matrices of experts `e`: gathered from a dense stack, or (quantized) their
    packed tensors gathered and dequantized by the reference dequantizer in `dtype`: the dequantized twin's
    values, so the same GEMMs follow (a kernel that dequantizes in registers replaces this, as for MoE)."""
    if isinstance(stack, torch.Tensor):
        return stack[e]
    if isinstance(stack, ExpertList):
        return stack.dequantize(dtype)[e]
    return _gather_experts(stack, e).dequantize(dtype)


def _gemma_expert(stack, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert `e`'s dense [out, in] matrix (a quantized stack: that expert alone dequantized, transiently)."""
    if isinstance(stack, torch.Tensor):
        return stack[e]
    if isinstance(stack, ExpertList):
        return dequantize_linear(stack.experts[e], dtype)
    device = (stack.qweight if isinstance(stack, Int4Linear) else stack.weight).device
    return _gather_experts(stack, torch.tensor([e], device=device)).dequantize(dtype)[0]


def moe_layout_of(names) -> str:
    """The expert layout of a checkpoint, from its tensor names."""
    fused = ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_packed")  # dense or fp8; int4 pack-quantized
    return FUSED if any(n.endswith(fused) for n in names) else PER_EXPERT


def moe_weights(p: str, hidden: int, n_experts: int, inter: int, layout: str | None,
                shared_inter: int = 0) -> list[Weight]:
    """Layer `p`'s MoE tensors (p ends with "mlp.")."""
    table = [Weight(p + "gate.weight", (n_experts, hidden), gain=4.0)]  # gain: a router that prefers some experts
    if layout == FUSED:
        table += [Weight(p + "experts.gate_up_proj", (n_experts, 2 * inter, hidden)),
                  Weight(p + "experts.down_proj", (n_experts, hidden, inter))]
    else:
        for e in range(n_experts):
            table += mlp_weights(f"{p}experts.{e}.", hidden, inter)
    if shared_inter:
        table += mlp_weights(p + "shared_expert.", hidden, shared_inter)
        table.append(Weight(p + "shared_expert_gate.weight", (1, hidden)))
    return table


@dataclass
class MoE:
    """Route each token to its top-k experts (softmax over all logits, optionally renormalised; or,
    `softmax_after_topk`, over the top k only), run their SwiGLU, add an optional gated shared expert."""

    router: torch.Tensor  # [E, H] (read by the routing kernel)
    gate_up: "torch.Tensor | Int4Linear | Fp8Linear | ExpertList"  # [E, 2I, H], gate rows first (quantized: as stored)
    down: "torch.Tensor | Int4Linear | Fp8Linear | ExpertList"  # [E, H, I]
    top_k: int
    renormalize: bool
    router_bias: torch.Tensor | None = None
    softmax_after_topk: bool = False
    shared: SwiGLU | None = None  # Qwen3.5: a dense SwiGLU expert every token takes,
    shared_gate: Linear | None = None  # [1, H]: ... weighted by sigmoid(x · shared_gate)

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, n_experts: int, top_k: int, renormalize: bool) -> "MoE":
        """Pop layer `p`'s MoE tensors (either layout) from `w` and stack them into the fused form."""
        fused = p + "experts.gate_up_proj"
        if fused in w or quantized_scheme(w, fused) is not None:
            gate_up = _experts(take_one(w, fused, dense_key=fused))
            down = _experts(take_one(w, p + "experts.down_proj", dense_key=p + "experts.down_proj"))
        else:
            names = [f"{p}experts.{e}." for e in range(n_experts)]
            gate_up = _stack_experts([take_linear(w, q + "gate_proj", q + "up_proj") for q in names], p)
            down = _stack_experts([take_linear(w, q + "down_proj") for q in names], p)
        moe = cls(w.pop(p + "gate.weight"), gate_up, down, top_k, renormalize)
        if p + "shared_expert_gate.weight" in w:
            moe.shared = SwiGLU.take(w, p + "shared_expert.")
            moe.shared_gate = take_linear(w, p + "shared_expert_gate")
        return moe

    def route(self, x: torch.Tensor):
        variant = {} if self.router_bias is None else {"bias": self.router_bias}
        if self.softmax_after_topk:
            variant["softmax_after_topk"] = True
        return ops.moe_route(x, self.router, self.top_k, self.renormalize, **variant)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = self.route(x)
        # the shared expert's gate and add run in the experts' combine (kernels/moe.py: y + sigmoid(g) · s)
        shared = {} if self.shared is None else {"shared": self.shared(x), "shared_gate": self.shared_gate(x)}
        if isinstance(self.gate_up, torch.Tensor):
            return ops.moe_experts(x, self.gate_up, self.down, idx, weights, **shared)
        return quantized_experts(x, self.gate_up, self.down, idx, weights, **shared)


def _experts(lin):
    """A fused [E, out, in] expert stack as MoE holds it: the dense tensor, or the quantized stack."""
    return lin.weight if isinstance(lin, Dense) else lin


@dataclass
class ExpertList:
    """Quantized experts that do not share one layout (GPTQ act-order: a column order per projection), kept
    one by one; `dequantize` gives the dense [E, out, in] stack."""

    experts: list

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([dequantize_linear(e, dtype) for e in self.experts])


def dequantize_linear(lin, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [out, in] of any Linear kind, by its reference dequantizer."""
    if isinstance(lin, Dense):
        return lin.weight.to(dtype)
    if isinstance(lin, Concat):
        return torch.cat([dequantize_linear(p, dtype) for p in lin.parts])
    return lin.dequantize(dtype)


def _stack_experts(per_expert: list, p: str):
    """Per-expert projections (each gate/up already stacked by rows) as one [E, out, in] stack."""
    kinds = {type(e) for e in per_expert}
    if Dense in kinds:
        if len(kinds) > 1:
            raise DflashError(f"{p}experts are stored partly quantized, partly not: dflash runs one kind per layer")
        return torch.stack([e.weight for e in per_expert])
    if len(kinds) == 1 and kinds <= {Int4Linear, Fp8Linear, Int8Linear}:
        try:
            return kinds.pop().stack_experts(per_expert)
        except DflashError:  # different act-order permutations or FP8 blocks
            pass
    return ExpertList(per_expert)


def _gather_experts(stack, pairs: torch.Tensor):
    """The experts `pairs` of a quantized stack, still packed (one copy per pair)."""
    return stack.take_experts(pairs)


def quantized_experts(x: torch.Tensor, gate_up, down, idx: torch.Tensor, weights: torch.Tensor,
                      **shared) -> torch.Tensor:
    """The experts of a quantized MoE layer, by the torch path for now: the weights this step needs are
    dequantized (with the reference dequantizer, in the activations' dtype) and handed to ops.moe_experts,
    so the result is bit for bit the dequantized twin's. Fewer (token, expert) pairs than experts (decode,
    a verify block): one dequantized copy per pair, routed one to one; else every expert once. Neither
    reads back to the host (a CUDA graph may capture it). Experts without one shared layout (`ExpertList`:
    GPTQ act-order gives each projection its own column order) are all dequantized, every step. A kernel
    that dequantizes in registers replaces this (the quantized-targets issue); until then a step costs
    min(T·k, E) experts' dense weights per layer, transiently."""
    t, k = idx.shape
    if isinstance(gate_up, ExpertList) or isinstance(down, ExpertList):  # every expert, one by one
        return ops.moe_experts(x, gate_up.dequantize(x.dtype), down.dequantize(x.dtype), idx, weights, **shared)
    experts = (gate_up.qweight if isinstance(gate_up, Int4Linear) else gate_up.weight).shape[0]
    if t * k < experts:
        pairs = idx.reshape(-1)
        one_each = torch.arange(t * k, device=idx.device, dtype=idx.dtype).view(t, k)
        return ops.moe_experts(x, _gather_experts(gate_up, pairs).dequantize(x.dtype),
                               _gather_experts(down, pairs).dequantize(x.dtype), one_each, weights, **shared)
    return ops.moe_experts(x, gate_up.dequantize(x.dtype), down.dequantize(x.dtype), idx, weights, **shared)


def gpt_oss_layout_of(names) -> str:
    """MXFP4 when the checkpoint holds packed experts, else transformers' dense parameters."""
    return MXFP4 if any(n.endswith("mlp.experts.gate_up_proj_blocks") for n in names) else DENSE


def gpt_oss_expert_weights(p: str, hidden: int, n_experts: int, inter: int, layout: str) -> list[Weight]:
    """Layer `p`'s router and experts (p ends with "mlp.")."""
    e, h, i, x = n_experts, hidden, inter, p + "experts."
    table = [Weight(p + "router.weight", (e, h), gain=4.0), Weight(p + "router.bias", (e,), "normal", 0.5)]
    biases = [Weight(x + "gate_up_proj_bias", (e, 2 * i), "normal", 0.1),
              Weight(x + "down_proj_bias", (e, h), "normal", 0.1)]
    if layout == MXFP4:  # nn.Linear orientation [E, out, in], `in` cut into groups of 32 (16 bytes)
        return table + [Weight(x + "gate_up_proj_blocks", (e, 2 * i, h // 32, 16), "mxfp4_blocks", dtype="raw"),
                        Weight(x + "gate_up_proj_scales", (e, 2 * i, h // 32), "mxfp4_scales", dtype="raw"),
                        Weight(x + "down_proj_blocks", (e, h, i // 32, 16), "mxfp4_blocks", dtype="raw"),
                        Weight(x + "down_proj_scales", (e, h, i // 32), "mxfp4_scales", dtype="raw")] + biases
    return table + [Weight(x + "gate_up_proj", (e, h, 2 * i), "linear_in"),  # transformers' [E, in, out]
                    Weight(x + "down_proj", (e, i, h), "linear_in")] + biases


@dataclass
class GptOssExperts:
    """gpt-oss's MLP: a router with a bias whose softmax runs over the top-k logits only, then the
    clamped SwiGLU of experts with biases; gate_up [E, 2I, H] with gate/up rows interleaved and down
    [E, H, I] (or their MXFP4 blocks, with scales)."""

    router: MoE  # the routing half (its expert tensors are this class's)
    gate_up_bias: torch.Tensor
    down_bias: torch.Tensor
    gate_up_scales: torch.Tensor | None
    down_scales: torch.Tensor | None
    limit: float
    alpha: float

    @property
    def gate_up(self) -> torch.Tensor:
        return self.router.gate_up

    @property
    def down(self) -> torch.Tensor:
        return self.router.down

    @classmethod
    def take(cls, w: dict[str, torch.Tensor], p: str, top_k: int, limit: float, alpha: float) -> "GptOssExperts":
        e = p + "experts."
        if e + "gate_up_proj_blocks" in w:
            gate_up, gu_scales = w.pop(e + "gate_up_proj_blocks"), w.pop(e + "gate_up_proj_scales")
            down, dn_scales = w.pop(e + "down_proj_blocks"), w.pop(e + "down_proj_scales")
        else:  # transformers' [E, in, out]: once into the kernels' [E, out, in]
            gate_up = w.pop(e + "gate_up_proj").transpose(1, 2).contiguous()
            down = w.pop(e + "down_proj").transpose(1, 2).contiguous()
            gu_scales = dn_scales = None
        router = MoE(w.pop(p + "router.weight"), gate_up, down, top_k, False, w.pop(p + "router.bias"),
                     softmax_after_topk=True)
        return cls(router, w.pop(e + "gate_up_proj_bias"), w.pop(e + "down_proj_bias"), gu_scales, dn_scales,
                   limit, alpha)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = self.router.route(x)
        return ops.moe_experts(x, self.gate_up, self.down, idx, weights, gate_up_bias=self.gate_up_bias,
                               down_bias=self.down_bias, gate_up_scales=self.gate_up_scales,
                               down_scales=self.down_scales, swiglu_limit=self.limit, swiglu_alpha=self.alpha)
