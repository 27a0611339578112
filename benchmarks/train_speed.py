"""`dflash train`'s step at a released pair's real shapes, random weights (a script, not a test).

    python benchmarks/train_speed.py [--shape qwen3-4b] [--length 2048] [--batch 4] [--anchors 512] [--steps 10]

The target (frozen, bf16 on CUDA) and a drafter of the released layout (`dflash_cli.synthetic`), the
trainer as `dflash train` runs it (bf16 autocast on CUDA, fp32 master weights and AdamW state) on
random sequences of `--length` tokens. Prints seconds per step, sequence tokens per second (target
features included: they are computed at every step once they no longer fit the feature cache) and
the peak GPU memory beside what `dflash train`'s memory plan expects, then the hours a run of
`--samples` answers × `--epochs` would take at that rate: a projection from the measured step,
labelled so. On a GPU it first prints which of SDPA's CUDA kernels admit the training attention at
these shapes, as the trainer calls it and as it was called before gpu-review-2 F7 (GQA with a bool
mask, which only the math kernel took). `--shape tiny --device cpu` rehearses it.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_cli import cuda  # noqa: E402
from dflash_cli.config import DrafterConfig  # noqa: E402
from dflash_cli.loader import resolve_device  # noqa: E402
from dflash_cli.synthetic import configs, random_pair  # noqa: E402
from dflash_cli.train.loop import Schedule, Trainer, TrainOptions, memory_plan  # noqa: E402
from dflash_cli.train.model import DraftNet  # noqa: E402
from dflash_cli.train.objective import Sequence, additive_mask, anchor_candidates  # noqa: E402

GiB = 2**30


def sdpa_backends(c: DrafterConfig, batch: int, anchors: int, length: int, device: torch.device) -> None:
    """Print which SDPA kernels admit the training attention's call at these shapes (torch's own
    checks, with their reasons), and the one SDPA picks."""
    from torch.backends.cuda import (SDPAParams, can_use_cudnn_attention, can_use_efficient_attention,
                                     can_use_flash_attention)
    from torch.nn.attention import SDPBackend

    names = {b.value: b.name.lower() for b in SDPBackend.__members__.values()}
    rows, keys, d = anchors * c.block_size, length + anchors * c.block_size, c.head_dim
    q = torch.empty(batch, c.num_heads, rows, d, dtype=torch.bfloat16, device=device, requires_grad=True)
    kv = torch.empty(batch, c.num_kv_heads, keys, d, dtype=torch.bfloat16, device=device, requires_grad=True)
    mask = torch.ones(batch, 1, rows, keys, dtype=torch.bool, device=device)
    expanded = kv.repeat_interleave(c.num_heads // c.num_kv_heads, 1)
    calls = {"dflash train (K/V expanded, additive mask)": (q, expanded, expanded, additive_mask(mask, q.dtype), False),
             "before F7 (enable_gqa, bool mask)": (q, kv, kv, mask, True)}
    print(f"SDPA backends for the training attention: q {list(q.shape)}, keys {keys}, bf16")
    for label, (q_, k_, v_, m, gqa) in calls.items():
        params = SDPAParams(q_, k_, v_, m, 0.0, False, gqa)
        chosen = names.get(torch._fused_sdp_choice(q_, k_, v_, m, 0.0, False, enable_gqa=gqa), "?")
        print(f"  {label}: SDPA picks {chosen}")
        for kernel, admits in (("flash", can_use_flash_attention), ("efficient", can_use_efficient_attention),
                               ("cudnn", can_use_cudnn_attention)):
            with warnings.catch_warnings(record=True) as why:
                warnings.simplefilter("always")
                ok = admits(params, debug=True)
            reasons = "; ".join(" ".join(str(w.message).split()) for w in why)
            print(f"    {kernel:9} {'yes' if ok else 'no'}" + (f" ({reasons})" if reasons and not ok else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--length", type=int, default=2048, help="tokens per training sequence")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 untimed)")
    parser.add_argument("--samples", type=int, default=800_000, help="answers in the projected run")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grad-checkpoint", action="store_true")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not cuda.is_available():
        print("benchmarks/train_speed.py: no CUDA GPU here; nothing measured (--device cpu --shape tiny rehearses)")
        return 0
    device = resolve_device(args.device)
    gpu = cuda.is_gpu(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    _, _, drafter_cfg, _ = configs(args.shape)
    target = random_pair(args.shape, dtype, device, args.length + 2 * drafter_cfg.block_size)[0]  # its drafter freed
    base = torch.cuda.memory_allocated(device) if gpu else 0  # the target's weights (GPU-only, like the peak below)
    net = DraftNet(drafter_cfg).to(device)
    net.reset_parameters(seed=0)
    g = torch.Generator().manual_seed(0)
    vocab = target.embed.shape[0]
    seqs = [Sequence(torch.randint(0, vocab, (args.length,), generator=g).tolist(), prompt_len=args.length // 16)
            for _ in range(4 * args.batch)]
    opts = TrainOptions(Schedule(steps=args.steps + 2), batch=args.batch, anchors=args.anchors,
                        grad_checkpoint=args.grad_checkpoint, feature_cache_bytes=0)  # features at every step
    if gpu:
        sdpa_backends(drafter_cfg, args.batch, min(args.anchors, len(anchor_candidates(seqs[0]))), args.length, device)
    trainer = Trainer(net, target, seqs, opts)
    for _ in range(2):  # allocator growth, autotuning
        trainer.step()
    if gpu:
        cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)  # GPU-only, and nothing dflash itself asks for
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    if gpu:
        cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.length / seconds
    print(f"dflash train step · {args.shape} · {device} · {str(dtype).removeprefix('torch.')} · batch {args.batch} × "
          f"{args.length} tokens · {args.anchors} anchors · drafter {drafter_cfg.num_layers} layers, block "
          f"{drafter_cfg.block_size}{' · grad checkpoint' if args.grad_checkpoint else ''}")
    print(f"{seconds:.3f} s per step · {tokens:,.0f} sequence tokens/s (target features included) · "
          f"loss {trainer.progress.loss:.3f}")
    if gpu:
        peak, plan = torch.cuda.max_memory_allocated(device), memory_plan(net, vocab, args.length, opts, 2, gpu)
        print(f"peak GPU memory {peak / GiB:.1f} GiB, {(peak - base) / GiB:.1f} GiB above the target's weights · "
              f"dflash train's memory plan for it: {sum(plan.values()) / GiB:.1f} GiB (drafter + AdamW "
              f"{(plan['weights'] + plan['optimizer']) / GiB:.1f}, activations {plan['activations'] / GiB:.1f})")
    hours = args.samples * args.epochs * args.length / tokens / 3600
    print(f"PROJECTION: {args.samples:,} answers × {args.epochs} epochs of {args.length} tokens at this rate: "
          f"{hours:,.1f} hours on this device (from the measured step; not a training run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
