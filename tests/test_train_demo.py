"""The demo pair ships in the package and runs offline: `dflash run|chat|bench demo`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from dflash_cli import loader, registry
from dflash_cli.bench import builtin_prompts
from dflash_cli.cli import main
from dflash_cli.train.evaluate import measure


def test_the_shipped_drafter_is_small_released_and_accepts_on_held_out_stories():
    target, drafter = registry.demo_dirs()
    files = sorted(p.name for p in drafter.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in drafter.iterdir()) < 1_000_000
    cfg = json.loads((drafter / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["block_size"] == 8
    model = loader.load(target, drafter, device="cpu")
    # Openings it never saw (make_demo_pair.py keeps every training prompt from beginning with one).
    held = [model.tokenizer.encode(p["prompt"]) for p in builtin_prompts(("story",))]
    acc = measure(model.target, model.drafter, held, block_size=8, max_new_tokens=128,
                  stop_token_ids=model.stop_token_ids)
    assert acc.tau >= 3.0, acc.to_json()


def test_run_demo_needs_no_download(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "demo", "-p", "Once upon a time", "-n", "24", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"].startswith(", there was a little girl") and len(result["token_ids"]) == 24
    assert max(result["acceptance_lengths"]) > 1  # the drafter is in use
    assert main(["run", "demo", "-p", "Once upon a time", "-n", "24", "--device", "cpu", "--no-spec", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == result["token_ids"]


def test_bench_demo_runs_the_story_prompts(capsys):
    assert main(["bench", "demo", "--device", "cpu", "-n", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["category"] for r in report["rows"]} == {"story"} and len(report["rows"]) == 8
    assert report["totals"]["all_identical"] and report["block_size"] == 8


def test_chat_demo_in_a_pipe():
    p = subprocess.run([sys.executable, "-m", "dflash_cli.cli", "chat", "demo", "--device", "cpu", "-n", "12", "--plain"],
                       input="Once upon a time\n", capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert ", there was a little girl" in p.stdout and "12 tokens ·" in p.stderr  # stdout: the answers only


def test_demo_has_nothing_to_pull(capsys):
    assert main(["pull", "demo"]) == 2
    err = capsys.readouterr().err
    assert "the demo pair ships with dflash" in err and len(err.strip().splitlines()) == 1


def test_serve_demo_answers_completions_under_its_name():
    from .serving import ServerProcess

    server = ServerProcess("demo", "--device", "cpu", env={"HF_HUB_OFFLINE": "1"})
    try:
        assert server.model == "demo"
        r = server.client().completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=0)
        assert r.choices[0].text.startswith(", there was a little girl") and r.usage.completion_tokens == 12
    finally:
        assert server.stop() in (0, 130)


def test_doctor_demo_passes_without_a_gpu(capsys):
    assert main(["doctor", "demo"]) in (0, 1)  # 1 only if another check (torch, cache) fails on this machine
    out = capsys.readouterr().out
    assert "✓ demo: ships with dflash" in out
