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
    # the verify forward per node count (a hybrid target: none until its tree verify lands, then the same)
    if shape == "tiny" or r["verify_by_nodes"]:
        assert set(r["verify_by_nodes"]) == {"1", "4", "8", "16", "32", "64"} and min(r["verify_by_nodes"].values()) > 0
    assert main(["bench", "tiny", "--synthetic", "--device", "cpu", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "PROJECTION" not in out  # no published τ for the tiny shape, none given
    assert re.search(r"verify by node count .*1: [\d.]+ ms \(1\.00×\).*64: [\d.]+ ms", " ".join(out.split()))


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


def test_bench_repeats_each_case_with_the_arms_interleaved_and_json_keeps_every_run(capsys, stories_pair, monkeypatch):
    import statistics

    from dflash_cli import bench

    order, real = [], bench._generate

    def recorded(engine, model, ids, max_tokens, sampling):
        if len(ids) > 8:  # the bench prompts, not the warm-up
            order.append("auto" if engine.adaptive else "fixed" if engine.speculative else "plain")
        return real(engine, model, ids, max_tokens, sampling)

    monkeypatch.setattr(bench, "_generate", recorded)
    t, d = stories_pair
    assert main(["bench", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-n", "8", "--prompts", "math",
                 "--repeats", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repeats"] == 2 and len(report["rows"]) == 3
    assert order == ["plain", "fixed", "auto"] * 6  # each prompt: the three arms, then again
    for r in report["rows"]:
        for key in ("plain_tps", "dflash_tps", "auto_tps", "plain_e2e_tps", "dflash_e2e_tps", "auto_e2e_tps"):
            assert len(r["runs"][key]) == 2 and r[key] == statistics.median(r["runs"][key]) > 0
    totals = report["totals"]
    assert totals["repeats"] == 2
    for key in ("plain_tps", "dflash_tps", "auto_tps", "speedup", "auto_speedup"):
        s = totals["spread"][key]
        assert len(s["runs"]) == 2 and s["min"] <= s["median"] == totals[key] <= s["max"]
        assert s["min"] == min(s["runs"]) and s["max"] == max(s["runs"])


def test_the_table_shows_medians_of_three_runs_and_their_range_by_default(capsys, stories_pair):
    t, d = stories_pair
    assert main(["bench", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-n", "8", "--prompts", "code"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"medians of 3 runs per prompt \(arms interleaved\); the totals ranged over them: plain "
                     r"[\d.]+–[\d.]+ · B=8 [\d.]+–[\d.]+ · auto [\d.]+–[\d.]+ tok/s · speedup [\d.]+–[\d.]+× · "
                     r"auto [\d.]+–[\d.]+×", out), out


def test_a_noisy_row_is_named_under_the_table():
    from rich.console import Console

    from dflash_cli.bench import BenchReport, BenchRow, render

    def row(plain: list[float]) -> BenchRow:
        runs = {k: [100.0, 100.0, 100.0] for k in ("dflash_tps", "auto_tps", "plain_e2e_tps", "dflash_e2e_tps",
                                                   "auto_e2e_tps")} | {"plain_tps": plain}
        return BenchRow("math", "p", 10, sorted(plain)[1], 100.0, 100.0, 90.0, 90.0, 90.0, 2.0, 2.0, {8: 4}, True,
                        runs=runs)

    report = BenchReport(8, 10, 3, rows=[row([50.0, 52.0, 51.0]), row([40.0, 60.0, 50.0])])
    assert report.rows[0].noise == pytest.approx(1 / 51) and report.rows[1].noise == 0.2
    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    assert "noisy (a speed varied by more than ±10% over the runs): math 2\n" in text
    assert report.totals()["spread"]["plain_tps"]["runs"] == [
        pytest.approx(20 / (10 / 50 + 10 / 40)), pytest.approx(20 / (10 / 52 + 10 / 60)), pytest.approx(20 / (10 / 51 + 10 / 50))]


def test_synthetic_refuses_a_tau_above_the_block_and_names_the_context_when_only_it_does_not_fit(capsys):
    assert main(["bench", "tiny", "--synthetic", "--device", "cpu", "--tau", "9"]) == 2
    assert capsys.readouterr().err == "Error: --tau 9 is more than the block size 8: an iteration commits at most 8 tokens\n"
    assert main(["bench", "tiny", "--synthetic", "--device", "cpu", "--tau", "5", "-b", "4"]) == 2
    assert "--tau 5 is more than the block size 4" in capsys.readouterr().err
    assert main(["bench", "tiny", "--synthetic", "--device", "cpu", "--context", str(10**10)]) == 1
    err = capsys.readouterr().err
    assert "use a shorter --context (about " in err and "try the shape 'tiny'" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_tau_counts_only_the_tokens_an_answer_kept(stories_model):
    """A step cut by the token budget or a stop token accepted only what the answer kept: the acceptance
    lengths sum to the tokens written after the prefill's (the stop token included)."""
    from dflash_cli.engine import Engine, Request
    from dflash_cli.generate import Stats

    m = stories_model
    prompt = m.tokenizer.encode("Once upon a time")
    engine = Engine(m.target, m.drafter, block_size=8)
    for budget in (2, 5, 10, 40):
        stats = Stats()
        for step in engine.generate(Request(prompt, budget)):
            stats.add(step)
        assert stats.generated == budget and sum(stats.acceptance_lengths) == budget - 1, stats.acceptance_lengths
    plain = [t for s in Engine(m.target).generate(Request(prompt, 40)) for t in s.tokens]
    k = next(i for i in range(3, 40) if plain[i] not in plain[:i])
    stats = Stats()
    for step in engine.generate(Request(prompt, 40, frozenset({plain[k]}))):
        stats.add(step)
    assert stats.token_ids == plain[:k] and stats.finish == "stop" and sum(stats.acceptance_lengths) == k


def test_a_pinned_engine_warms_up_so_that_first_call_costs_are_not_prefill(stories_model, monkeypatch):
    from dflash_cli.engine import Engine

    m = stories_model
    for engine in (Engine(m.target), Engine(m.target, m.drafter, block_size=8)):
        assert not engine.graphs.enabled and not engine.adaptive  # a CPU: nothing to capture or measure
        calls = []
        real = engine.generate
        monkeypatch.setattr(engine, "generate", lambda request: calls.append(request) or real(request))
        assert engine.warm_up() is None
        assert len(calls) == 1 and calls[0].max_new_tokens == 2  # one throwaway: prefill and an iteration


def test_bench_with_auto_trees_reports_the_budgets_each_arm_verified(capsys, stories_pair):
    """`bench --tree-budget auto`: both DFlash arms pick the chain or a tree per iteration; each row counts
    the budgets its iterations verified, the report gives a tree iteration's measured cost per budget, and
    the answers are still plain decoding's."""
    t, d = stories_pair
    assert main(["bench", "--target", str(t), "--drafter", str(d), "--device", "cpu", "-n", "12", "--prompts", "chat",
                 "--repeats", "1", "--tree-budget", "auto", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tree_budget"] == "auto" and report["totals"]["all_identical"] and report["totals"]["auto_all_identical"]
    assert set(report["tree_iteration_seconds"]) == {"4", "8", "16", "32"}  # 64: past the kernel's graph-safe rows
    assert set(report["iteration_seconds"]) == {"1", "2", "4", "8"}
    for r in report["rows"]:
        for arm in ("tree_budgets", "auto_tree_budgets"):
            assert sum(r[arm].values()) > 0 and set(map(int, r[arm])) <= {0, 4, 8, 16, 32}
        assert sum(r["auto_tree_budgets"].values()) == sum(r["auto_block_sizes"].values())
