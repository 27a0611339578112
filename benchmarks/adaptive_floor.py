"""What b = 1 costs above plain decoding, part by part (a script, not a test).

    OMP_NUM_THREADS=1 python benchmarks/adaptive_floor.py [--tokens 200] [--repeats 9] [--deferred N]

While auto pauses drafting, each iteration is plain decoding plus what keeps the drafter ready to
resume: the target's features of the drafter's layers (copied out of the residual stream), their
deferral into the drafter's pending buffer, and a catch-up every DEFERRED tokens that writes their
context K/V. This times plain decoding and the speculative engine held at b = 1 on the demo pair,
then the same engine with each part switched off in turn (which is no longer lossless for the
drafter, and is only for timing), and prints per-token CPU time and each arm over plain.
`--deferred N` tries another size of the deferral buffer (drafter.DEFERRED, 32).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_cli import drafter as drafter_module, engine as engine_module, loader, registry  # noqa: E402
from dflash_cli.adaptive import Pinned  # noqa: E402
from dflash_cli.engine import Engine, Request  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402


def held_at_one(m: loader.Model, catch_up: bool = True, defer: bool = True, features: bool = True) -> Engine:
    engine = Engine(m.target, m.drafter)
    engine.policy = Pinned(1)
    if not catch_up:
        engine._catch_up = lambda bonus: engine.draft_cache.pending_count.zero_()
    if not defer:
        engine.draft_cache.defer = lambda feats: None
    if not features:  # the prefill still gives the drafter its context; the iterations collect none
        layers, prefill = engine.feature_layers, engine._prefill

        def prefill_with_features(prompt, keep_prefix=None):
            engine.feature_layers = layers
            try:
                return prefill(prompt, keep_prefix)
            finally:
                engine.feature_layers = ()
        engine._prefill = prefill_with_features
    return engine


def per_token(engine: Engine, ids: list[int], tokens: int) -> float:
    """CPU seconds per decoded token after the prefill."""
    steps = engine.generate(Request(ids, tokens))
    next(steps)
    start, n = time.thread_time(), 0
    for step in steps:
        n += len(step.tokens)
    return (time.thread_time() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--deferred", type=int, default=drafter_module.DEFERRED)
    args = parser.parse_args()
    drafter_module.DEFERRED = engine_module.DEFERRED = args.deferred  # read when caches are made and at each iteration
    m = loader.load(*registry.demo_dirs(), device="cpu")
    ids = encode_raw(m.tokenizer, "Once upon a time")
    arms = {
        "plain decoding": Engine(m.target),
        "b = 1 (what auto runs while paused)": held_at_one(m),
        "  without the catch-up": held_at_one(m, catch_up=False),
        "  and without deferring": held_at_one(m, catch_up=False, defer=False),
        "  and without the features": held_at_one(m, catch_up=False, defer=False, features=False),
    }
    for engine in arms.values():
        per_token(engine, ids, 32)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):  # interleaved: a busy moment hits every arm alike
        for name, engine in arms.items():
            times[name].append(per_token(engine, ids, args.tokens))
    plain = statistics.median(times["plain decoding"])
    print(f"demo pair, {args.tokens} tokens, deferral buffer {args.deferred}, CPU time per token "
          f"(median of {args.repeats})")
    for name, t in times.items():
        print(f"{name:<40} {statistics.median(t) * 1e6:7.0f} µs   {plain / statistics.median(t):.3f} of plain")


if __name__ == "__main__":
    main()
