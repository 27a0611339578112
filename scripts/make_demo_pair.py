"""Train the demo pair's drafter with `dflash train`: the stories260K target (shipped in
dflash_cli/data/demo) and a block-8 DFlash drafter for it, small enough to ship beside it.

The training prompts come from stories the target writes itself (sampled from <s> at
temperature 1): the first few words of a random sentence of each, varied states to draft from, in
the target's own language. The held-out prompts are the bench's story set
(dflash_cli/data/bench_prompts.json): hand-written openings no training prompt begins with.

Usage:
  python scripts/make_demo_pair.py [--work DIR] [--prompts 1200] [--steps 3000 | --time 15m] [--install]
Run it again after an interruption: it resumes (the prompts, the answers and the training).
--install copies the drafter (config.json, model.safetensors) into
dflash_cli/data/demo/stories260K-dflash. Then: dflash run demo -p "Once upon a time".
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from dflash_cli import loader
from dflash_cli.bench import builtin_prompts
from dflash_cli.engine import Engine, Request
from dflash_cli.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dflash_cli" / "data" / "demo"


def story_openings(count: int, seed: int, held_out: list[str]) -> list[str]:
    """`count` distinct prompts from stories the target samples itself (from <s>, temperature 1):
    each a few words from the start of a random sentence of one, none beginning with a held-out
    prompt. Sentence starts inside a story are as varied as the openings people type."""
    model = loader.load(DEMO / "stories260K", None, device="cpu")
    engine = Engine(model.target, max_context=128)
    rng = random.Random(seed)
    bos = model.tokenizer.bos_token_id
    openings: list[str] = []
    seen = set()
    story = 0
    while len(openings) < count:
        story += 1
        sampling = SamplingParams(temperature=1.0, seed=seed * 100_003 + story)
        ids = [t for s in engine.generate(Request([bos], 100, model.stop_token_ids, sampling)) for t in s.tokens]
        sentences = [x.strip() for x in model.tokenizer.decode(ids).replace("\n", " ").split(". ") if x.strip()]
        for sentence in rng.sample(sentences[:-1], min(3, len(sentences) - 1)):  # the last one is cut short
            words = sentence.split()
            if len(words) < 3:
                continue
            text = " ".join(words[: rng.randint(2, min(len(words), 12))])
            if text in seen or any(text.lower().startswith(h.lower()) for h in held_out):
                continue
            seen.add(text)
            openings.append(text)
    return openings[:count]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("demo-train"), help="working directory")
    ap.add_argument("--prompts", type=int, default=1200, help="training prompts (story openings)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps (dflash train --steps)")
    ap.add_argument("--time", help="train for this long instead of --steps (e.g. 10m)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--install", action="store_true", help="copy the drafter into the package")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    held_out = [p["prompt"] for p in builtin_prompts(("story",))]
    prompts = args.work / "prompts.txt"
    if not prompts.is_file():
        prompts.write_text("\n".join(story_openings(args.prompts, args.seed, held_out)) + "\n")
    evals = args.work / "held-out.txt"
    evals.write_text("\n".join(held_out) + "\n")
    out = args.work / "stories260K-dflash"
    command = [sys.executable, "-m", "dflash_cli.cli", "train", "--target", "demo", "--prompts", str(prompts),
               "--eval-prompts", str(evals), "--out", str(out), "--block-size", "8", "--draft-layers", "3",
               "--target-layer-ids", "0,1,2,3,4", "--max-answer-tokens", "160", "--lr", "1e-2", "--batch", "16",
               "--anchors", "16", "--eval-tokens", "256", "--seed", str(args.seed),
               *(["--time", args.time] if args.time else ["--steps", str(args.steps)])]
    if (out / "train-state" / "settings.json").is_file():
        command.append("--resume")
    print(" ".join(command[1:]), file=sys.stderr)
    proc = subprocess.Popen(command)
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:  # the Ctrl-C reached `dflash train` too: it saves, then exits
            continue
    if code != 0:
        return code
    if args.install:
        dest = DEMO / "stories260K-dflash"
        dest.mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(out / name, dest / name)
        report = json.loads((out / "train-state" / "state.json").read_text())
        print(f"installed in {dest} (step {report['step']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
