"""Quantize at load on the demo pair (stories260K + its drafter): what each scheme costs in quality and
in acceptance. For fp32 (the checkpoint as shipped), int8, int4 (with the scale search, and plain RTN for
comparison) and fp8, each written by `quant.quantize` and loaded through dflash's quantized path:

- perplexity on held-out stories: continuations of the bench's 8 held-out story openings (none is a
  drafter training prompt), sampled from the fp32 target at T = 1 with fixed seeds, scored by each
  target (so fp32's own figure is the floor; the others say how far quantizing moved the distribution);
- the mean KL divergence of each target's next-token distribution from fp32's on those tokens;
- greedy agreement: the share of the fp32 target's greedy tokens the quantized one reproduces before its
  first divergence, over the 8 openings;
- mean τ of the shipped drafter at T = 0, block 8, on the 8 openings (the drafter stays fp32 and reads
  the target's embedding and head, which are never quantized).

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/quant_quality.py
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from dflash_cli import loader, registry
from dflash_cli.bench import builtin_prompts
from dflash_cli.engine import Engine, Request
from dflash_cli.quant import quantize as qz
from dflash_cli.sampling import SamplingParams
from dflash_cli.train.evaluate import measure

STOPS = frozenset({registry.DEMO_STORY_END})


def openings(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p["prompt"]) for p in builtin_prompts(("story",))]


def generate(target, ids: list[int], n: int, sampling: SamplingParams, stops=STOPS) -> list[int]:
    engine = Engine(target, None, max_context=len(ids) + n + 8)
    out = []
    for step in engine.generate(Request(ids, n, stops, sampling)):
        out += step.tokens
    return out


@torch.no_grad()
def log_probs(target, ids: list[int]) -> torch.Tensor:
    """log p(next token) at every position of `ids`: [T, V]."""
    cache = target.new_cache(len(ids) + 8)
    logits, _ = target.forward(torch.tensor(ids), cache, logits_from=0, commit=True)
    return F.log_softmax(logits.float(), -1)


def held_out(target, tokenizer, per_prompt: int, n: int) -> list[list[int]]:
    """Stories sampled from the fp32 target, seeds 1000.. (the same for every run)."""
    texts = []
    for i, ids in enumerate(openings(tokenizer)):
        for s in range(per_prompt):
            texts.append(ids + generate(target, ids, n, SamplingParams(temperature=1.0, seed=1000 + 37 * i + s)))
    return texts


def scores(target, stories: list[list[int]], reference: list[torch.Tensor] | None):
    nll, kl, count = 0.0, 0.0, 0
    mine = []
    for k, ids in enumerate(stories):
        lp = log_probs(target, ids)[:-1]
        mine.append(lp)
        nll -= lp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        if reference is not None:
            kl += F.kl_div(lp, reference[k], log_target=True, reduction="sum").item()
        count += len(ids) - 1
    return float(torch.tensor(nll / count).exp()), kl / count, mine


def agreement(target, reference: list[list[int]], prompts: list[list[int]], n: int) -> float:
    same = total = 0
    for ids, ref in zip(prompts, reference):
        got = generate(target, ids, n, SamplingParams())
        k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        same, total = same + k, total + len(ref)
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stories", type=int, default=8, help="sampled stories per opening")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per story and per greedy answer")
    args = ap.parse_args()
    torch.manual_seed(0)
    target_dir, drafter_dir = registry.demo_dirs()
    base = loader.load(target_dir, drafter_dir, device="cpu")
    stories = held_out(base.target, base.tokenizer, args.stories, args.tokens)
    prompts = openings(base.tokenizer)
    greedy = [generate(base.target, ids, args.tokens, SamplingParams()) for ids in prompts]
    print(f"{len(stories)} held-out stories, {sum(len(s) for s in stories)} tokens; greedy answers of "
          f"{args.tokens} tokens to {len(prompts)} openings; τ at T=0, block 8")
    print()
    print("| target | projections | weight bytes | perplexity | KL from fp32 (nats/token) | greedy agreement | τ |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, scheme, search in (("fp32", None, True), ("int8", "int8", True), ("fp8", "fp8", True),
                                     ("int4", "int4", True), ("int4 (RTN)", "int4", False)):
            directory = target_dir
            if scheme is not None:
                directory = Path(tmp) / name.replace(" ", "").replace("(", "-").replace(")", "")
                qz.quantize_checkpoint(target_dir, directory, scheme, search=search)
            model = loader.load(directory, drafter_dir, device="cpu")
            ppl, kl, mine = scores(model.target, stories, reference)
            if reference is None:
                reference = mine
            agree = agreement(model.target, greedy, prompts, args.tokens)
            acc = measure(model.target, model.drafter, prompts, block_size=8, max_new_tokens=args.tokens,
                          stop_token_ids=model.stop_token_ids | STOPS)
            size = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
            what = {None: "fp32 (as shipped)", "int8": "int8 per channel", "fp8": "fp8 e4m3 per channel",
                    "int4": "int4 per row (widths 64, 172 < 128)" + (", scale search" if search else ", RTN")}[scheme]
            print(f"| {name} | {what} | {size / 1024:.0f} KiB | {ppl:.3f} | {kl:.4f} | {agree:.1%} | {acc.tau:.2f} |")


if __name__ == "__main__":
    main()
