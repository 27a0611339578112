"""`dflash bench` on CPU with tiny models, and the synthetic mode at a tiny shape."""
from __future__ import annotations

import json
import re

import pytest

from dflash_cli.bench import histogram_line
from dflash_cli.cli import main


def test_bench_compares_plain_fixed_and_auto_with_identical_answers(capsys, stories_pair):
    t, d = stories_pair
    code = main(["bench", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-n", "24",
                 "--prompts", "math,chat", "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 0 and len(report["rows"]) == 6
    assert {r["category"] for r in report["rows"]} == {"math", "chat"}
    for r in report["rows"]:
        assert r["identical"] and r["auto_identical"] and r["plain_tps"] > 0 and r["dflash_tps"] > 0 and r["auto_tps"] > 0
        assert r["plain_e2e_tps"] > 0 and r["auto_e2e_tps"] > 0
        assert sum(r["auto_block_sizes"].values()) > 0 and set(map(int, r["auto_block_sizes"])) <= {1, 2, 4, 8}
    assert sum(report["acceptance_histogram"].values()) > 0
    assert report["totals"]["all_identical"] and report["totals"]["auto_all_identical"]
    # the machine's cost curve: every candidate b measured, break-even τ = cost(b) / cost(1)
    seconds, even = report["iteration_seconds"], report["break_even_tau"]
    assert set(seconds) == set(even) == {"1", "2", "4", "8"} and even["1"] == 1.0
    assert all(even[b] == seconds[b] / seconds["1"] for b in even)
    assert len(report["position_acceptance"]) == 7  # drafts 1..7 of a block of 8
    assert re.search(r"^math: plain [\d.]+ · B=8 [\d.]+ \([\d.]+×, τ [\d.]+\) · auto [\d.]+ \([\d.]+×\) tok/s$",
                     err, re.M)  # on stderr


def test_bench_table(capsys, stories_pair):
    t, d = stories_pair
    assert main(["bench", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-n", "8", "--prompts", "code"]) == 0
    out = capsys.readouterr().out
    assert "dflash bench" in out and "speedup" in out and "auto" in out and "acceptance τ=1…8" in out
    assert "break-even τ on this machine" in out and "b 8: " in out
    assert "acceptance by position at B=8: " in out and "auto chose: b " in out and "with prefill: plain " in out


@pytest.mark.parametrize("shape", ["tiny", "tiny-hybrid"])
def test_synthetic_mode_times_each_step_and_labels_the_projection(capsys, shape):
    assert main(["bench", shape, "--synthetic", "--device", "cpu", "--context", "64", "--tau", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("decode_s", "verify_s", "draft_s", "accept_s", "commit_s", "iteration_s", "step_device_s", "copy_bytes_per_s"):
        assert r[key] > 0
    assert set(r["iteration_by_block"]) == {"1", "2", "4", "8"} and r["break_even_tau"]["1"] == 1.0
    assert r["projected_tps"] == 4 / r["iteration_s"] and "projection" in r
    assert main(["bench", "tiny", "--synthetic", "--device", "cpu", "--context", "64"]) == 0
    assert "PROJECTION" not in capsys.readouterr().out  # no published τ for the tiny shape, none given


def test_bad_bench_input(capsys, stories_pair):
    assert main(["bench", "nope", "--synthetic", "--device", "cpu"]) == 2
    assert "unknown synthetic shape 'nope'" in capsys.readouterr().err
    for tau in ("-2", "0.5", "nan", "inf"):
        assert main(["bench", "tiny", "--synthetic", "--device", "cpu", "--tau", tau]) == 2
        assert capsys.readouterr().err.startswith("Error: --tau must be a number of at least 1")
    t, d = stories_pair
    assert main(["bench", "--target", str(t), "--drafter", str(d), "--prompts", "poetry"]) == 2
    assert "unknown prompt set 'poetry'" in capsys.readouterr().err


def test_histogram_line():
    from collections import Counter

    assert histogram_line(Counter({1: 4, 3: 2, 4: 1}), 4) == "acceptance τ=1…4: █ ▄▂  (7 iterations)"


def test_a_divergence_is_reported_with_its_logit_margin(stories_model):
    """In bf16 plain and speculative answers may part at a near-tie: bench names the first token that
    differs and the target's top-2 logit margin there, computed from plain decoding's context."""
    import torch

    from dflash_cli.bench import first_divergence
    from dflash_cli.engine import Engine, Request

    m = stories_model
    prompt = m.tokenizer.encode("Once upon a time")
    plain = [t for s in Engine(m.target).generate(Request(prompt, 8)) for t in s.tokens]
    other = plain[:3] + [(plain[3] + 1) % 512] + plain[4:]
    got = first_divergence(Engine(m.target), prompt, plain, other)
    logits, _ = m.target.forward(torch.tensor(prompt + plain[:3]), m.target.new_cache(64), logits_from=-1, commit=True)
    top = torch.topk(logits[-1].float(), 2).values
    assert got == {"token": 3, "margin": round(float(top[0] - top[1]), 5)} and got["margin"] > 0


def test_the_same_column_compares_the_pinned_arm_and_an_auto_divergence_is_named(capsys, stories_pair, monkeypatch):
    """In bfloat16 the auto arm's block sizes follow timed costs, so it may part from plain decoding at a
    near-tie on one run and not the next: `same` is the fixed-B arm's verdict (pinned block size, the same
    every run), and an auto divergence is reported beside it (here one is forced)."""
    from dflash_cli import bench

    real = bench._generate

    def auto_parts(engine, model, ids, max_tokens, sampling):
        stats = real(engine, model, ids, max_tokens, sampling)
        if engine.adaptive and len(ids) > 8:  # the bench prompts, not the warm-up
            stats.token_ids[5] = (stats.token_ids[5] + 1) % 512
        return stats

    monkeypatch.setattr(bench, "_generate", auto_parts)
    t, d = stories_pair
    assert main(["bench", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-n", "12", "--prompts", "math"]) == 0
    out = capsys.readouterr().out
    assert "auto parted from plain decoding on 3 of 3 prompts (first at token 5, Δ" in " ".join(out.split())
    assert re.search(r"^ *all .* yes *$", out, re.M)  # the pinned arm: identical
