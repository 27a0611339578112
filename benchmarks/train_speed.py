"""`dflash train`'s step at a released pair's real shapes, random weights (a script, not a test).

    python benchmarks/train_speed.py [--shape qwen3-4b] [--length 2048] [--steps 10]

The target (frozen, bf16 on CUDA) and a drafter of the released layout (`dflash_cli.synthetic`), the
trainer as `dflash train` runs it (bf16 autocast on CUDA, fp32 master weights and AdamW state) on
random sequences of `--length` tokens. Prints seconds per step, sequence tokens per second (target
features included: they are computed at every step once they no longer fit the feature cache) and
the peak GPU memory, then the hours a run of `--samples` answers × `--epochs` would take at that
rate: a projection from the measured step, labelled so. `--shape tiny --device cpu` rehearses it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_cli.synthetic import configs, random_pair  # noqa: E402
from dflash_cli.train.loop import Schedule, Trainer, TrainOptions  # noqa: E402
from dflash_cli.train.model import DraftNet  # noqa: E402
from dflash_cli.train.objective import Sequence  # noqa: E402


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
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/train_speed.py: no CUDA GPU here; nothing measured (--device cpu --shape tiny rehearses)")
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, _, drafter_cfg, _ = configs(args.shape)
    target, _ = random_pair(args.shape, dtype, device, args.length + 2 * drafter_cfg.block_size)
    net = DraftNet(drafter_cfg).to(device)
    net.reset_parameters(seed=0)
    g = torch.Generator().manual_seed(0)
    vocab = target.embed.shape[0]
    seqs = [Sequence(torch.randint(0, vocab, (args.length,), generator=g).tolist(), prompt_len=args.length // 16)
            for _ in range(4 * args.batch)]
    opts = TrainOptions(Schedule(steps=args.steps + 2), batch=args.batch, anchors=args.anchors,
                        grad_checkpoint=args.grad_checkpoint, feature_cache_bytes=0)  # features at every step
    trainer = Trainer(net, target, seqs, opts)
    for _ in range(2):  # allocator growth, autotuning
        trainer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.length / seconds
    print(f"dflash train step · {args.shape} · {device} · {str(dtype).removeprefix('torch.')} · batch {args.batch} × "
          f"{args.length} tokens · {args.anchors} anchors · drafter {drafter_cfg.num_layers} layers, block "
          f"{drafter_cfg.block_size}{' · grad checkpoint' if args.grad_checkpoint else ''}")
    print(f"{seconds:.3f} s per step · {tokens:,.0f} sequence tokens/s (target features included) · "
          f"loss {trainer.progress.loss:.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    hours = args.samples * args.epochs * args.length / tokens / 3600
    print(f"PROJECTION: {args.samples:,} answers × {args.epochs} epochs of {args.length} tokens at this rate: "
          f"{hours:,.1f} hours on this device (from the measured step; not a training run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
