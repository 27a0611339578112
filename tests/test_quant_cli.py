"""The user's view of quantized targets: `--quantize`, what auto takes and says, `dflash models`' formats,
GGUF refused in one line, doctor's formats."""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import pytest

from dflash_cli import api, catalog, precision, registry
from dflash_cli.cli import main
from dflash_cli.errors import DflashError, UsageError
from dflash_cli.registry import QuantRepo

from .fake_cuda import stand_in
from .hub_server import HubServer  # noqa: F401  (the local Hub fixture's server)
from .test_hub import server  # noqa: F401

GiB = 1 << 30
Q36 = registry.resolve("qwen3.6-27b")


# ---- the decision, a pure function ------------------------------------------------------------

def test_a_pair_that_fits_in_bf16_runs_as_released_and_says_nothing():
    assert precision.choose(Q36, None, 80 * GiB) == precision.Choice("bf16")
    assert precision.choose(Q36, "auto", None) == precision.Choice("bf16")  # the CPU: nothing to decide


def test_a_24gb_card_quantizes_qwen36_27b_to_int4_at_load():
    """No official int4 of Qwen3.6-27B exists and its FP8 (33 GiB) does not fit: int4 at load (22 GiB)."""
    choice = precision.choose(Q36, None, 23 * GiB)
    assert (choice.format, choice.repo, choice.at_load, choice.quantize) == ("int4", None, True, "int4")
    assert choice.note == ("qwen3.6-27b needs 55.3 GiB of GPU memory in bfloat16, 23.0 GiB is free: quantizing "
                           "Qwen/Qwen3.6-27B (a 53.8 GB download) to int4 at load, 21.6 GiB (cached for the next "
                           "load); --quantize none|int8|int4|fp8 overrides")


def test_a_card_the_official_fp8_fits_downloads_it_instead():
    choice = precision.choose(Q36, None, 40 * GiB)
    assert choice.repo.repo == "Qwen/Qwen3.6-27B-FP8" and choice.format == "fp8" and not choice.at_load
    assert "running its fp8 checkpoint Qwen/Qwen3.6-27B-FP8 (a 29.5 GB download), 32.6 GiB;" in choice.note
    assert "--quantize none|int8|int4|fp8 overrides" in choice.note
    cached = precision.choose(Q36, None, 40 * GiB, cached=frozenset({"Qwen/Qwen3.6-27B-FP8"}))
    assert "Qwen/Qwen3.6-27B-FP8 (downloaded), 32.6 GiB" in cached.note


def test_an_official_int4_that_keeps_much_in_bf16_is_sized_by_its_published_size():
    """Qwen3.5-27B-GPTQ-Int4 is 30.3 GB (near its FP8): on a 24 GB card auto quantizes at load instead."""
    pair = registry.resolve("qwen3.5-27b")
    assert catalog.gpu_memory(pair, "int4", pair.official("int4")) > 30 * 10**9
    choice = precision.choose(pair, None, 23 * GiB)
    assert choice.at_load and choice.format == "int4"
    assert precision.choose(pair, None, 31 * GiB).at_load  # neither official fits 31 GiB: int8 at load does not, int4 does


def test_nothing_that_fits_is_one_line_naming_the_smallest():
    with pytest.raises(DflashError, match=r"qwen3\.6-35b-a3b needs 66\.7 GiB .* 12\.0 GiB is free, and even in int4 "
                                          r"it needs 20\.2 GiB: close other GPU programs, or pick a smaller model"):
        precision.choose(registry.resolve("qwen3.6-35b-a3b"), None, 12 * GiB)


def test_an_explicit_format_takes_the_official_checkpoint_or_quantizes_at_load():
    q8 = registry.resolve("qwen3-8b")
    assert precision.choose(q8, "int4", 80 * GiB).repo.repo == "Qwen/Qwen3-8B-AWQ"
    assert precision.choose(q8, "int8", 80 * GiB) == precision.Choice("int8", at_load=True)
    assert precision.choose(q8, "fp8", None).repo.repo == "Qwen/Qwen3-8B-FP8"  # the CPU too: as asked
    assert precision.choose(Q36, "int4", None) == precision.Choice("int4", at_load=True)
    assert precision.choose(Q36, "none", 1 * GiB) == precision.Choice("bf16")  # none: as released, never refused
    assert precision.choose(None, "int8", None) == precision.Choice("int8", at_load=True)  # a --target of one's own
    assert precision.choose(None, "auto", 8 * GiB) == precision.Choice("bf16")


def test_an_explicit_format_that_cannot_fit_names_one_that_does():
    with pytest.raises(DflashError, match=r"--quantize fp8: qwen3\.6-27b needs 32\.6 GiB of GPU memory, 23\.0 GiB is "
                                          r"free: --quantize int4 fits"):
        precision.choose(Q36, "fp8", 23 * GiB)


@pytest.mark.parametrize("value, parsed", [("INT4", "int4"), (" fp8 ", "fp8"), ("bf16", "none"), ("auto", "auto"),
                                           (None, None), ("w8a16", "int8")])
def test_quantize_values(value, parsed):
    assert precision.parse(value) == parsed


def test_a_bad_quantize_value_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--quantize must be one of auto, none, fp8, int8, int4, got 'int3'"):
        precision.parse("int3")


# ---- the commands -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["run", "demo", "-p", "x"], ["chat", "demo"], ["serve", "demo"],
                                     ["bench", "demo"], ["bench", "--synthetic", "tiny"]])
def test_bad_quantize_values_are_one_line_and_exit_2(capsys, command):
    assert main([*command, "--quantize", "q4_k_m"]) == 2
    err = capsys.readouterr().err
    assert err == "Error: --quantize must be one of auto, none, fp8, int8, int4, got 'q4_k_m'\n"


@pytest.mark.parametrize("args", [["run", "Qwen3.6-27B-Q4_K_M.gguf", "-p", "x"], ["chat", "model.GGUF"],
                                  ["serve", "--target", "./unsloth/Qwen3.6-27B-UD-Q4_K_XL.gguf"],
                                  ["bench", "--target", "x.gguf", "--drafter", "z-lab/Qwen3.6-27B-DFlash"]])
def test_a_gguf_model_is_one_line_and_exit_2(capsys, args):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GGUF is not supported yet" in err and "llama.cpp runs DFlash on GGUF" in err
    assert "Traceback" not in err


def test_no_model_is_still_the_resolver_s_one_line(capsys):
    assert main(["run", "-p", "x"]) == 2
    assert capsys.readouterr().err == "Error: name a model (see `dflash models`), or give --target and --drafter\n"


def test_a_directory_of_gguf_files_is_refused_the_same_way(capsys, tmp_path):
    (tmp_path / "Qwen3.6-27B-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert main(["run", "--target", str(tmp_path), "-p", "x", "--no-spec"]) == 2
    assert "GGUF is not supported yet" in capsys.readouterr().err


class Loaded(Exception):
    """Raised by a stand-in open_session, with the options it was given."""


@pytest.fixture
def recorded(monkeypatch):
    """open_session replaced by one that records its options and stops."""
    seen = []

    def open_session(opts, dirs=None):
        seen.append(opts)
        raise Loaded()

    monkeypatch.setattr(api, "open_session", open_session)
    return seen


@pytest.mark.parametrize("command", [["run", "demo", "-p", "Once", "--device", "cpu"], ["chat", "demo"],
                                     ["bench", "demo", "--device", "cpu"],
                                     ["serve", "demo", "--device", "cpu", "--port", "0"]])
def test_quantize_reaches_the_loader(recorded, command):
    """The hand-off: --quantize int8 on any command loads with quantize="int8" (dflash_cli.load's parameter)."""
    with pytest.raises(Loaded):
        main([*command, "--quantize", "int8"])
    assert recorded[-1].quantize == "int8" and recorded[-1].model == "demo"


@pytest.fixture
def small_pair(server, stories_pair, monkeypatch):  # noqa: F811
    """The stories pair served as the registry's qwen3-4b (10 GiB in bf16, 7 in fp8, 5 in int4), with an
    official FP8 checkpoint that is the same stories model under another repo id."""
    t, d = stories_pair
    for repo, path in (("Test/Stories", t), ("Test/Stories-DFlash", d), ("Test/Stories-FP8", t)):
        server.add_dir(repo, path)
    pair = registry.ModelPair("qwen3-4b", "Test/Stories", "Test/Stories-DFlash", 8,
                              quantized=(QuantRepo("Test/Stories-FP8", "fp8", "fp8-block", official=True),))
    monkeypatch.setattr(registry, "_BY_ALIAS", registry._BY_ALIAS | {"qwen3-4b": pair})
    monkeypatch.setattr(registry, "PAIRS", (pair,) + registry.PAIRS[1:])
    return pair


def test_auto_runs_the_official_checkpoint_when_bf16_does_not_fit(small_pair, capsys):
    """On an 8 GiB card the bf16 pair (10 GiB) does not fit and its FP8 (7 GiB) does: the FP8 repo is
    downloaded instead of the target and runs with the pair's drafter; one line says so, with the flag."""
    argv = ["run", "qwen3-4b", "-p", "Once upon a time", "--raw", "-n", "8", "--yes"]
    with stand_in(free=8 * GiB, total=8 * GiB):
        assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith(", there was a little girl")
    line = next(l for l in err.splitlines() if "bfloat16" in l)
    assert line.startswith("dflash: qwen3-4b needs 10.1 GiB of GPU memory in bfloat16, 8.0 GiB is free: running its "
                           "fp8 checkpoint Test/Stories-FP8 (a ")
    assert line.endswith("--quantize none|int8|int4|fp8 overrides")
    from dflash_cli import hub

    assert hub.local_path("Test/Stories-FP8") is not None and hub.local_path("Test/Stories") is None
    with stand_in(free=8 * GiB, total=8 * GiB):  # -q: nothing on stderr but errors
        assert main([*argv, "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_auto_quantizes_at_load_when_no_official_checkpoint_fits(small_pair, recorded, capsys, monkeypatch):
    monkeypatch.setattr(registry, "_BY_ALIAS", registry._BY_ALIAS | {"qwen3-4b": replace(small_pair, quantized=())})
    with stand_in(free=6 * GiB, total=6 * GiB), pytest.raises(Loaded):
        main(["chat", "qwen3-4b", "--yes"])
    assert recorded[-1].quantize == "int4" and recorded[-1].model == "qwen3-4b"
    assert "quantizing Test/Stories (a " in capsys.readouterr().err
    with stand_in(free=6 * GiB, total=6 * GiB), pytest.raises(Loaded):  # --quantize none: as released
        main(["chat", "qwen3-4b", "--yes", "--quantize", "none"])
    assert recorded[-1].quantize is None


@pytest.mark.parametrize("scheme", ["int4", "int8"])  # int8: no kernel yet, its torch reference runs
def test_quantize_at_load_runs_end_to_end(scheme, capsys, tmp_path, monkeypatch):
    """--quantize int4|int8 on the demo: the target is quantized once into the cache, then read from there,
    and the answer is the same both times (quant/cache.py does the work; this is the flag reaching it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = ["run", "demo", "-p", "Once upon a time", "-n", "8", "--device", "cpu", "-q", "--quantize", scheme]
    assert main(argv) == 0
    first = capsys.readouterr().out
    copies = list((tmp_path / "dflash" / "quantized").iterdir())
    assert len(copies) == 1 and scheme in copies[0].name
    assert main(argv) == 0
    assert capsys.readouterr().out == first and list((tmp_path / "dflash" / "quantized").iterdir()) == copies


def test_gpt_oss_is_not_quantized():
    oss = registry.resolve("gpt-oss-120b")
    with pytest.raises(DflashError, match=r"gpt-oss-120b needs 63\.7 GiB .* and dflash does not quantize gpt-oss "
                                          r"targets: close other GPU programs"):
        precision.choose(oss, None, 40 * GiB)
    with pytest.raises(UsageError, match=r"--quantize int4: dflash does not quantize gpt-oss targets \(gpt-oss-20b\)"):
        precision.choose(registry.resolve("gpt-oss-20b"), "int4", None)
    assert catalog._by_format(oss) == {"bf16": catalog.gpu_memory(oss), "fp8": None, "int8": None, "int4": None}


@pytest.mark.parametrize("shape, scheme", [("tiny", "int4"), ("tiny-hybrid", "fp8"), ("tiny-moe", "int8")])
def test_bench_synthetic_runs_a_quantized_target(shape, scheme):
    """The projections are the quantized kinds (every expert too), the plan and the roofline count their
    packed bytes, and the timing runs (on the CPU: the torch references)."""
    import torch

    from dflash_cli import synthetic
    from dflash_cli.quant import Fp8Linear, Int4Linear
    from dflash_cli.quant.int8 import Int8Linear

    kind = {"int4": Int4Linear, "int8": Int8Linear, "fp8": Fp8Linear}[scheme]
    family, cfg, _, _ = synthetic.configs(shape)
    weights = synthetic.random_quantized_weights(family, cfg, scheme, torch.float32, torch.device("cpu"))
    assert weights.quantized and all("proj" in m.rpartition(".")[2] for m in weights.quantized)
    assert weights["model.embed_tokens.weight"].dtype == torch.float32  # kept as it is, as the head (tied or not)
    assert not any(m.startswith(("lm_head", "model.embed_tokens")) for m in weights.quantized)
    target = family.build(cfg, weights, 64)
    kinds = {type(v) for layer in target.layers for v in vars(layer).values()} | \
        {type(v) for layer in target.layers for part in vars(layer).values() for v in getattr(part, "__dict__", {}).values()}
    assert kind in kinds, kinds
    report = synthetic.run_synthetic(shape, device=torch.device("cpu"), dtype=torch.float32, context=32, iters=2,
                                     quantize=scheme)
    assert report.quantize == scheme and report.decode_s > 0
    assert report.weight_bytes < 0.5 * synthetic.weight_bytes(shape, torch.float32)


def test_bench_synthetic_quantize_auto_is_a_usage_error(capsys):
    assert main(["bench", "--synthetic", "tiny", "--quantize", "auto"]) == 2
    assert "--synthetic times the format it is given" in capsys.readouterr().err


def test_serve_hands_off_no_quantize_to_an_engine(capsys):
    assert main(["serve", "--engine", "vllm", "qwen3-8b", "--quantize", "int4", "--dry-run"]) == 2
    assert "--quantize applies to dflash's own engine" in capsys.readouterr().err


# ---- dflash models and doctor --------------------------------------------------------------------

def test_models_shows_each_format_and_what_fits_the_gpu_seen(capsys):
    with stand_in(free=20 * GiB, total=24 * GiB):
        assert main(["models", "--json"]) == 0
        rows = {r["alias"]: r for r in json.loads(capsys.readouterr().out)}
        assert main(["models"]) == 0
        table = capsys.readouterr().out
    q36 = rows["qwen3.6-27b"]
    assert set(q36["gpu_memory_formats"]) == {"bf16", "fp8", "int8", "int4"} and q36["fits"] == ["int4"]
    assert rows["qwen3-8b"]["fits"] == ["bf16", "fp8", "int8", "int4"]
    assert rows["qwen3.6-35b-a3b"]["fits"] == ["int4"] and rows["muse-glimmer-30b"]["fits"] == []
    assert {"repo": "Qwen/Qwen3.6-27B-FP8", "format": "fp8", "layout": "fp8-block", "official": True,
            "verified": True} in q36["quantized"]
    assert re.search(r"│ qwen3\.6-27b +│ 16 │ .* │ 55/33/22 │", table)
    assert "fits this" in table and "(24 GiB)" in table
    assert main(["models", "--json"]) == 0  # no GPU: nothing is said to fit
    assert {r["alias"]: r for r in json.loads(capsys.readouterr().out)}["qwen3-8b"]["fits"] is None


def test_without_torch_the_gpu_is_asked_of_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$1" in --id=1) echo "NVIDIA GeForce RTX 4090, 24564";; *) exit 9;; esac\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert catalog._nvidia_smi() == ("NVIDIA GeForce RTX 4090", 24564 << 20)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert catalog._nvidia_smi() is None  # the tool failed: no GPU claimed
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert catalog._nvidia_smi() is None


def test_doctor_says_how_each_quantized_format_runs(monkeypatch):
    from dflash_cli import doctor, ops

    cpu = doctor.quantized_check(False, True)
    assert cpu.status == "ok" and cpu.detail.startswith("int4, int8, fp8 targets run on the CPU through the torch reference")
    gpu = doctor.quantized_check(True, True)  # every format has its kernel (int8's: kernels/quant_linear.py)
    assert (gpu.status, gpu.detail, gpu.fix) == ("ok", "kernels for int4, int8, fp8", "")
    monkeypatch.setattr(ops, "_MODULES", {k: v for k, v in ops._MODULES.items() if not k.endswith(("int4_linear",
                                                                                                   "int8_linear",
                                                                                                   "fp8_linear"))}
                        | {"int4_linear": "quant_linear", "fp8_linear": "quant_linear"})
    gpu = doctor.quantized_check(True, True)
    assert gpu.status == "warn" and gpu.detail.startswith("kernels for int4, fp8; int8 through the torch reference")
    assert doctor.quantized_check(True, False).fix == "install Triton (see the triton check)"


def test_doctor_names_what_auto_runs_for_a_pair_that_does_not_fit_in_bf16():
    from dflash_cli import doctor

    with stand_in(free=23 * GiB, total=24 * GiB):
        check = doctor._model_check("qwen3.6-27b", True)
    assert "needs ~55.4 GiB of GPU memory in bfloat16, 23.0 GiB free: runs as quantized to int4 at load" in check.detail
    with stand_in(free=40 * GiB, total=40 * GiB):
        check = doctor._model_check("qwen3.6-27b", True)
    assert "runs as its fp8 checkpoint Qwen/Qwen3.6-27B-FP8" in check.detail and check.status == "warn"


def test_the_readme_models_table_is_what_dflash_computes():
    """Each row's GiB in bf16/FP8/int4 are `dflash models`' numbers, and its 24 GB column what auto takes
    with 23 GiB free."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.partition("| pair | bf16 | FP8 | int4 | 24 GB card |")[2].partition("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert len(rows) == len(catalog.GPU_MEMORY)
    for alias, bf16, fp8, int4, card, _ in rows:
        pair = registry.resolve(alias.strip("`"))
        needs = catalog._by_format(pair)
        assert [bf16, fp8, int4] == [f"{needs[f] / GiB:.1f}" if needs[f] else "—" for f in ("bf16", "fp8", "int4")], alias
        try:
            choice = precision.choose(pair, None, 23 * GiB)
        except DflashError:
            assert card == "no", alias
            continue
        assert card.startswith(choice.format) and (choice.repo is None or choice.repo.repo in card), alias


def test_gemma4_and_muse_glimmer_are_offered_quantized_and_a_family_not_tested_so_is_refused_by_name():
    """Gemma 4 and Muse-Glimmer run quantized (config.QUANT_FAMILIES, tests/test_quant_families.py): every
    format is offered, with a size between int4's and bf16's, and the defaults quantize at load. A pair whose
    family is not tested quantized (`tested_quantized=False`) gets no format but bf16, and the refusal names the
    pair, not its kind."""
    for alias in ("gemma-4-12b", "gemma-4-31b", "gemma-4-26b-a4b", "muse-glimmer-30b"):
        pair = registry.resolve(alias)
        needs = catalog._by_format(pair)
        assert pair.quantizable and needs["int4"] < needs["int8"] == needs["fp8"] < needs["bf16"], (alias, needs)
    choice = precision.choose(registry.resolve("gemma-4-26b-a4b"), None, 23 * GiB)
    assert (choice.format, choice.repo, choice.at_load) == ("int4", None, True)
    choice = precision.choose(registry.resolve("muse-glimmer-30b"), "int4", None)
    assert (choice.format, choice.at_load) == ("int4", True)
    untested = replace(registry.resolve("gemma-4-26b-a4b"), tested_quantized=False)
    assert catalog._by_format(untested) == {"bf16": catalog.gpu_memory(untested), "fp8": None, "int8": None,
                                            "int4": None}
    with pytest.raises(DflashError, match=r"dflash does not run gemma-4-26b-a4b quantized yet"):
        precision.choose(untested, None, 23 * GiB)
    with pytest.raises(UsageError, match=r"--quantize int4: dflash does not run muse-glimmer-30b quantized yet"):
        precision.choose(replace(registry.resolve("muse-glimmer-30b"), tested_quantized=False), "int4", None)
