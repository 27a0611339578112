"""The training loop: AdamW with warm-up and cosine decay, checkpoints that survive a crash or a
Ctrl-C, and an exact resume.

Everything random is keyed by the step (which sequences form a batch, which anchors are drawn),
so a resumed run takes the very steps the uninterrupted run would have taken. Checkpoints hold
only tensors (safetensors) and small JSON, never pickles:
  OUT/model.safetensors                  the drafter, released names, loadable at any time
  OUT/train-state/optimizer.safetensors  fp32 master weights and AdamW moments; its metadata
                                         (step, elapsed seconds) says which step they belong to
Each file is written to a temporary name and renamed over the old one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import cuda
from ..rope import rope_table
from .data import target_features
from .model import DraftNet, save_weights, write_atomic
from .objective import Sequence, StepResult, block_loss, make_batch, sample_anchors

STATE_DIR = "train-state"
OPTIMIZER = "optimizer.safetensors"


@dataclass(frozen=True)
class Schedule:
    """Length of the run in steps, or in seconds of training (then the learning rate follows the
    clock: warm-up over the first 4% of the time, cosine decay to zero by the end)."""

    steps: int | None = None
    seconds: float | None = None
    lr: float = 6e-4
    warmup: float = 0.04

    def progress(self, step: int, elapsed: float) -> float:
        if self.steps is not None:
            return step / self.steps
        return elapsed / self.seconds

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1.0

    def lr_at(self, progress: float) -> float:
        if progress < self.warmup:
            return self.lr * max(progress / self.warmup, 0.01)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - self.warmup) / (1 - self.warmup))))


@dataclass(frozen=True)
class TrainOptions:
    schedule: Schedule
    batch: int = 4  # sequences per step
    anchors: int = 512  # draft blocks per sequence
    gamma: float = 7.0  # decay of the position weights
    grad_clip: float = 1.0
    seed: int = 0
    grad_checkpoint: bool = False
    # The target is frozen, so a sequence's features never change: keep them all when they fit in
    # this many bytes (small targets, small data), else compute them again at every step.
    feature_cache_bytes: int = 1 << 30


@dataclass
class Progress:
    step: int = 0
    elapsed: float = 0.0  # seconds spent in training steps (excludes loading, evaluation, saving)
    loss: float = math.nan
    accuracy: float = math.nan
    tau: float = math.nan  # estimated from the training batch: leading correct drafts + 1
    tokens_per_second: float = 0.0  # sequence tokens through the trainer per second
    lr: float = 0.0


class Trainer:
    def __init__(self, net: DraftNet, target, sequences: list[Sequence], opts: TrainOptions):
        if not sequences:
            raise ValueError("no training sequences")
        self.net, self.target, self.seqs, self.opts = net, target, sequences, opts
        self.device = target.device
        self.embed, self.lm_head = target.embed, target.lm_head  # the target's, frozen
        longest = max(len(s.ids) for s in sequences) + net.cfg.block_size
        c = net.cfg
        self.cos_sin = rope_table(c.head_dim, c.rope_theta, c.rope_scaling, longest, self.device)
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=opts.schedule.lr, weight_decay=0.0)
        self.progress = Progress()
        self._orders: dict[int, list[int]] = {}
        width = len(c.target_layer_ids) * c.hidden_size * target.embed.element_size()
        cached = sum(len(s.ids) for s in sequences) * width <= opts.feature_cache_bytes
        self._features: dict[int, torch.Tensor] | None = {} if cached else None
        # bf16 autocast on a GPU (master weights and optimizer state stay fp32); fp32 on a CPU.
        self.autocast = cuda.autocast(self.device, torch.bfloat16)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.opts.seed * 7919 + epoch)
            self._orders = {epoch: torch.randperm(len(self.seqs), generator=g).tolist()}
        return self._orders[epoch]

    def batch_indices(self, step: int) -> list[int]:
        """Sequences of step `step`: consecutive slices of a fresh shuffle per epoch."""
        q, n = min(self.opts.batch, len(self.seqs)), len(self.seqs)
        return [self._order(j // n)[j % n] for j in range(step * q, step * q + q)]

    def loss_of(self, step: int) -> StepResult:
        """The loss of step `step`'s batch (features from the target, computed now, without grad)."""
        indices = self.batch_indices(step)
        seqs = [self.seqs[i] for i in indices]
        g = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + step + 1)
        anchors = sample_anchors(seqs, self.opts.anchors, g)
        features = [self.features(i) for i in indices]
        batch = make_batch(seqs, features, anchors, self.net.cfg.block_size)
        with self.autocast:
            head = self.net.cfg.for_target(self.target.embed_scale, self.target.cfg.logit_softcap)
            return block_loss(self.net, self.embed, self.lm_head, self.cos_sin, batch, gamma=self.opts.gamma,
                              grad_checkpoint=self.opts.grad_checkpoint, embed_scale=head.input_embedding_scale,
                              softcap=head.final_logit_softcapping)

    def features(self, index: int) -> torch.Tensor:
        if self._features is not None and index in self._features:
            return self._features[index]
        f = target_features(self.target, torch.tensor(self.seqs[index].ids), self.net.cfg.target_layer_ids)
        if self._features is not None:
            self._features[index] = f
        return f

    def step(self) -> StepResult:
        p = self.progress
        start = time.perf_counter()
        lr = self.opts.schedule.lr_at(self.opts.schedule.progress(p.step, p.elapsed))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        result = self.loss_of(p.step)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.opts.grad_clip)
        self.optimizer.step()
        seconds = time.perf_counter() - start
        tokens = sum(len(self.seqs[i].ids) for i in self.batch_indices(p.step))
        p.step, p.elapsed, p.lr = p.step + 1, p.elapsed + seconds, lr
        p.loss, p.accuracy, p.tau = float(result.loss.detach()), result.accuracy, result.tau
        p.tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        return result

    def run(self, should_stop: Callable[[], bool], on_step: Callable[[Progress], None] | None = None,
            checkpoint_due: Callable[[Progress], bool] | None = None,
            on_checkpoint: Callable[[Progress], None] | None = None) -> bool:
        """Train until the schedule ends (True) or `should_stop()` says so between steps (False)."""
        sched = self.opts.schedule
        while not sched.done(self.progress.step, self.progress.elapsed):
            if should_stop():
                return False
            self.step()
            if on_step:
                on_step(self.progress)
            if (checkpoint_due and on_checkpoint and checkpoint_due(self.progress)
                    and not sched.done(self.progress.step, self.progress.elapsed)):
                on_checkpoint(self.progress)
        return True

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self, out_dir: Path, export_dtype: torch.dtype) -> None:
        """Optimizer state first, then the drafter: each file is stamped with its step."""
        stamp = {"step": str(self.progress.step), "elapsed": repr(self.progress.elapsed)}
        state_dir = out_dir / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, p in self.net.named_parameters():
            tensors[f"param/{name}"] = p.detach().float().cpu().contiguous()
            st = self.optimizer.state.get(p)
            if st:
                tensors[f"exp_avg/{name}"] = st["exp_avg"].detach().float().cpu().contiguous()
                tensors[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().float().cpu().contiguous()
                stamp["adam_step"] = str(int(st["step"]))
        write_atomic(state_dir / OPTIMIZER, lambda path: save_file(tensors, str(path), metadata=stamp))
        save_weights(out_dir, self.net, export_dtype, {"step": stamp["step"]})

    def load(self, out_dir: Path) -> None:
        """Restore master weights, AdamW moments, step and elapsed time from a checkpoint."""
        path = out_dir / STATE_DIR / OPTIMIZER
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            with torch.no_grad():
                for name, p in self.net.named_parameters():
                    p.copy_(f.get_tensor(f"param/{name}").to(p.device, p.dtype))
                    if f"exp_avg/{name}" in names:
                        self.optimizer.state[p] = {
                            "step": torch.tensor(float(meta["adam_step"])),
                            "exp_avg": f.get_tensor(f"exp_avg/{name}").to(p.device),
                            "exp_avg_sq": f.get_tensor(f"exp_avg_sq/{name}").to(p.device),
                        }
        self.progress.step = int(meta.get("step", 0))
        self.progress.elapsed = float(meta.get("elapsed", 0.0))


def has_checkpoint(out_dir: Path) -> bool:
    return (out_dir / STATE_DIR / OPTIMIZER).is_file()


MiB = 1024**2


def memory_plan(net: DraftNet, vocab: int, longest: int, opts: TrainOptions, dtype_bytes: int,
                gpu: bool) -> dict[str, int]:
    """Bytes the trainer will need beyond the target: weights, AdamW state and, an estimate, what
    one step keeps for its backward pass (`activation_parts`)."""
    params = sum(p.numel() for p in net.parameters())
    kept = activation_parts(net, vocab, longest, opts, dtype_bytes, gpu)
    return {"weights": params * 4, "optimizer": params * 12, "activations": sum(kept.values())}


def activation_parts(net: DraftNet, vocab: int, longest: int, opts: TrainOptions, dtype_bytes: int,
                     gpu: bool) -> dict[str, int]:
    """What one step keeps for its backward pass, by part, as autograd keeps it on each branch of
    objective.attention (tests/test_train_attention.py measures it): each layer's activations over
    all blocks and the context's keys, the keys and values attention keeps, the block-sparse masks,
    one chunk of lm_head logits, and the features.

    On a GPU (bf16 autocast, dtype_bytes 2) the residual stream and the norms' inputs stay fp32
    (the norms' weights are fp32), each projection keeps its own bf16 copy of its input, attention
    keeps K/V expanded to the query heads, and one additive mask per layer kind is shared by all
    layers; autocast's bf16 copies of the weights live as long. On a CPU (fp32) attention keeps K/V
    at the KV heads, and its own fp32 copy of the bool mask at every layer. Neither keeps a score
    matrix where a fused kernel takes the call: on a CPU always, on CUDA the memory-efficient
    kernel when the head size is a multiple of 16 bytes; else SDPA's math kernel keeps the softmax."""
    c = net.cfg
    f, a = 4, dtype_bytes  # fp32, and the dtype the projections and attention run in
    h, i, heads = c.hidden_size, c.intermediate_size, c.num_heads
    hq, hkv = heads * c.head_dim, c.num_kv_heads * c.head_dim
    q, n, b, s = opts.batch, min(opts.anchors, longest), c.block_size, longest
    rows, context, keys = q * n * b, q * s, s + n * b  # queries (block tokens), context tokens, keys per sequence
    inputs = 5 if gpu else 2  # copies of the normed residual: one per projection under autocast, else one per norm
    per_layer = (rows * (4 * f * h + inputs * a * h + (f + 3 * a) * hq + (f + a) * hkv + 4 * a * i + f * heads)
                 + context * ((f + a) * hkv + (2 * a * h if gpu else 0)))
    live = 1 if opts.grad_checkpoint else c.num_layers  # layers whose activations are held at once
    parts = {"layers": per_layer * live}
    if opts.grad_checkpoint:
        parts["layers"] += c.num_layers * rows * h * f  # each layer's input, kept (fp32 on both branches)
    parts["keys and values"] = live * (context + rows) * 2 * a * (hq if gpu else hkv)
    kinds = len(set(zip(c.sliding_windows, c.causal)))
    if gpu:
        parts["masks"] = kinds * rows * ((keys + 15) // 16 * 16) * a  # objective.additive_mask, padded
        parts["weight copies"] = sum(p.numel() for p in net.parameters()) * a
        if c.head_dim * a % 16:
            parts["scores"] = live * heads * rows * keys * a
    else:
        parts["masks"] = (kinds + live * f) * rows * keys
    parts["head"] = min(rows, 2048) * vocab * 4 * 3
    parts["features"] = q * s * len(c.target_layer_ids) * h * dtype_bytes * 3
    return parts
