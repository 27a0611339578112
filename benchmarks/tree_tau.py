"""Tree verification (DDTree) against the chain on the demo pair: mean τ (tokens committed per target pass)
and CPU decode speed at tree budgets 0 (the chain), 8, 16, 32 and 64, on the held-out story prompts, greedy
and sampled; each answer checked equal to the chain's (greedy) or plain decoding's (sampled, same seed).

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/tree_tau.py [--tokens 128]
  ... tree_tau.py --target T --drafter D   # another pair, on the tests' fitting prompts (tests/conftest.py
                                           # HYBRID_PROMPTS: what the tests' fitted tiny drafters learnt)

Prints the table docs/benchmarks.md records.
"""
from __future__ import annotations

import argparse
import time

import torch

from dflash_cli import loader, registry
from dflash_cli.bench import builtin_prompts
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

BUDGETS = (0, 8, 16, 32, 64)


def answer(engine: Engine, ids: list[int], tokens: int, sampling: SamplingParams,
           stops) -> tuple[list[int], list[int], float]:
    """(token ids, τ per iteration, decode seconds)."""
    out, taus, seconds = [], [], 0.0
    for step in engine.generate(Request(ids, tokens, stops, sampling)):
        out += step.tokens
        if not step.prefill:
            taus.append(step.acceptance_length)
            seconds += step.seconds
    return out, taus, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--target")
    ap.add_argument("--drafter")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.target:
        from tests.conftest import HYBRID_PROMPTS

        model = loader.load(args.target, args.drafter, device="cpu", dtype="float32")
        prompts, stops = HYBRID_PROMPTS, frozenset()
        print(f"{args.target} + {args.drafter}, the {len(prompts)} fitting prompts, {args.tokens} tokens each, "
              "CPU fp32, one thread")
    else:
        model = loader.load(*registry.demo_dirs(), device="cpu", dtype="float32")
        prompts = [model.tokenizer.encode(p["prompt"]) for p in builtin_prompts(("story",))]
        stops = model.stop_token_ids
        print(f"demo pair (stories260K + block-8 drafter), {len(prompts)} held-out story prompts, "
              f"{args.tokens} tokens each, CPU fp32, one thread")
    print("| sampling | tree budget | mean τ | decode tok/s | answers equal |")
    print("|---|---|---|---|---|")
    for name, sampling in (("greedy", SamplingParams()), ("T = 1, seed 0", SamplingParams(temperature=1.0, seed=0))):
        plain = Engine(model.target)
        want = [answer(plain, ids, args.tokens, sampling, stops)[0] for ids in prompts]
        for budget in BUDGETS:
            engine = Engine(model.target, model.drafter, block_size=model.drafter.cfg.block_size, tree_budget=budget)
            answer(engine, prompts[0], 8, sampling, stops)  # first calls pay one-time costs
            tokens = iterations = 0
            seconds, equal = 0.0, True
            for ids, reference in zip(prompts, want):
                got, taus, secs = answer(engine, ids, args.tokens, sampling, stops)
                equal &= got == reference
                tokens, iterations, seconds = tokens + sum(taus), iterations + len(taus), seconds + secs
            label = "0 (chain)" if budget == 0 else str(budget)
            same = "yes" if equal else "NO"
            print(f"| {name} | {label} | {tokens / iterations:.2f} | {tokens / seconds:.0f} | {same} |")


if __name__ == "__main__":
    main()
