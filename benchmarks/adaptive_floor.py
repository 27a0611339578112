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
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptive_common import deferral_buffer, held_at, timed_answer  # noqa: E402

from dflash_cli import drafter as drafter_module, loader, registry  # noqa: E402
from dflash_cli.engine import Engine  # noqa: E402
from dflash_cli.prompt import encode_raw  # noqa: E402


class NoCatchUp:
    """The drafter, except that a catch-up drops the deferred tokens instead of writing their K/V."""

    def __init__(self, drafter):
        self.drafter = drafter

    def __getattr__(self, name: str):
        return getattr(self.drafter, name)

    def catch_up(self, cache) -> None:
        cache.pending_count.zero_()


def held_at_one(m: loader.Model, catch_up: bool = True, defer: bool = True, features: bool = True
                ) -> tuple[Engine, Callable[[], None] | None]:
    """The engine at b = 1 with parts switched off (through its public attributes), and what to run
    after each prefill: without `features` the prefill still gives the drafter its context, and the
    iterations collect none."""
    engine = held_at(m, 1)
    if not catch_up:
        engine.drafter = NoCatchUp(m.drafter)
    if not defer:
        engine.draft_cache.defer = lambda feats: None
    if features:
        return engine, None

    def iterations_without_features() -> None:
        engine.feature_layers = ()
    return engine, iterations_without_features


def per_token(arm: tuple[Engine, Callable[[], None] | None], ids: list[int], tokens: int) -> float:
    """CPU seconds per decoded token after the prefill."""
    engine, after_prefill = arm
    if after_prefill is not None:
        engine.feature_layers = engine.drafter.cfg.target_layer_ids  # for the prefill
    answer = timed_answer(engine, ids, tokens, after_prefill)
    return answer.cpu_s / answer.decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--deferred", type=int, default=drafter_module.DEFERRED)
    args = parser.parse_args()
    with deferral_buffer(args.deferred):
        report(args.tokens, args.repeats, args.deferred)


def report(tokens: int, repeats: int, deferred: int) -> None:
    m = loader.load(*registry.demo_dirs(), device="cpu")
    ids = encode_raw(m.tokenizer, "Once upon a time")
    arms = {
        "plain decoding": (Engine(m.target), None),
        "b = 1 (what auto runs while paused)": held_at_one(m),
        "  without the catch-up": held_at_one(m, catch_up=False),
        "  and without deferring": held_at_one(m, catch_up=False, defer=False),
        "  and without the features": held_at_one(m, catch_up=False, defer=False, features=False),
    }
    for arm in arms.values():
        per_token(arm, ids, 32)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved: a busy moment hits every arm alike
        for name, arm in arms.items():
            times[name].append(per_token(arm, ids, tokens))
    plain = statistics.median(times["plain decoding"])
    print(f"demo pair, {tokens} tokens, deferral buffer {deferred}, CPU time per token "
          f"(median of {repeats})")
    for name, t in times.items():
        print(f"{name:<40} {statistics.median(t) * 1e6:7.0f} µs   {plain / statistics.median(t):.3f} of plain")


if __name__ == "__main__":
    main()
