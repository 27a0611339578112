"""`dflash serve --engine sglang|vllm`: the exact launch command for every kind of pair, the engine
check with its one-line install hint, and the exec itself (into stand-in engines that record how they
were started: SGLang and vLLM need GPUs and gigabytes, neither is installed here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_cli import registry
from dflash_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
PY_DIR = str(Path(sys.executable).parent)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """An empty Hugging Face cache (no drafter config to read: the registry's block sizes apply), no
    network, and `python` on PATH being this interpreter (so commands print as `python -m …`)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", PY_DIR)
    monkeypatch.delenv("DFLASH_API_KEY", raising=False)


def dry_run(capsys, *args) -> str:
    code = main(["serve", *map(str, args), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("\n") == 1 and err == ""
    return out.strip()


def vllm(target, drafter, spec, name, tp=1, extra="", tail=""):
    config = json.dumps({"method": "dflash", "model": drafter, "num_speculative_tokens": spec})
    return (f"vllm serve {target} --speculative-config '{config}' --attention-backend flash_attn "
            f"--max-num-batched-tokens 32768 --tensor-parallel-size {tp}{extra} --served-model-name {name} "
            f"--host 127.0.0.1 --port 8000{tail}")


def sglang(target, drafter, block, name, tp=1, extra="", tail=""):
    return (f"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1 python -m sglang.launch_server --model-path {target} "
            f"--speculative-algorithm DFLASH --speculative-draft-model-path {drafter} "
            f"--speculative-num-draft-tokens {block} --tp-size {tp}{extra} --served-model-name {name} "
            f"--host 127.0.0.1 --port 8000{tail}")


HYBRID = " --mamba-scheduler-strategy extra_buffer"


@pytest.mark.parametrize("alias, kind, expected_vllm, expected_sglang", [
    ("qwen3-8b", "dense", vllm("Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", 15, "qwen3-8b"),
     sglang("Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", 16, "qwen3-8b")),
    ("qwen3.5-27b", "hybrid", vllm("Qwen/Qwen3.5-27B", "z-lab/Qwen3.5-27B-DFlash", 15, "qwen3.5-27b"),
     sglang("Qwen/Qwen3.5-27B", "z-lab/Qwen3.5-27B-DFlash", 16, "qwen3.5-27b", extra=HYBRID)),
    ("qwen3-coder-30b-a3b", "moe",
     vllm("Qwen/Qwen3-Coder-30B-A3B-Instruct", "z-lab/Qwen3-Coder-30B-A3B-DFlash", 15, "qwen3-coder-30b-a3b"),
     sglang("Qwen/Qwen3-Coder-30B-A3B-Instruct", "z-lab/Qwen3-Coder-30B-A3B-DFlash", 16, "qwen3-coder-30b-a3b")),
    ("gpt-oss-20b", "gpt-oss", vllm("openai/gpt-oss-20b", "z-lab/gpt-oss-20b-DFlash", 7, "gpt-oss-20b"),
     sglang("openai/gpt-oss-20b", "z-lab/gpt-oss-20b-DFlash", 8, "gpt-oss-20b")),
    ("qwen3.5-397b-a17b", "hybrid-moe",
     vllm("Qwen/Qwen3.5-397B-A17B", "z-lab/Qwen3.5-397B-A17B-DFlash", 15, "qwen3.5-397b-a17b", tp=8),
     sglang("Qwen/Qwen3.5-397B-A17B", "z-lab/Qwen3.5-397B-A17B-DFlash", 16, "qwen3.5-397b-a17b", tp=8,
            extra=HYBRID)),
    ("kimi-k2.5", "moe",
     vllm("moonshotai/Kimi-K2.5", "z-lab/Kimi-K2.5-DFlash", 7, "kimi-k2.5", tp=8, extra=" --trust-remote-code"),
     sglang("moonshotai/Kimi-K2.5", "z-lab/Kimi-K2.5-DFlash", 8, "kimi-k2.5", tp=8, extra=" --trust-remote-code")),
])
def test_dry_run_prints_the_exact_command_for_every_kind_of_pair(capsys, alias, kind, expected_vllm,
                                                                  expected_sglang):
    pair = registry.resolve(alias)
    assert pair.kind == kind and pair.engine_only == (pair.gpus > 1)
    assert dry_run(capsys, "--engine", "vllm", alias) == expected_vllm
    assert dry_run(capsys, "--engine", "sglang", alias) == expected_sglang


def test_every_registry_pair_has_a_command_for_both_engines(capsys):
    for pair in registry.all_pairs():
        out = dry_run(capsys, "--engine", "sglang", pair.alias)
        assert (HYBRID in out) == pair.kind.startswith("hybrid"), pair.alias
        assert f"--tp-size {pair.gpus} " in out and f"--served-model-name {pair.alias} " in out
        out = dry_run(capsys, "--engine", "vllm", pair.alias)
        assert f'"num_speculative_tokens": {pair.block_size - 1}' in out and f"--tensor-parallel-size {pair.gpus} " in out


def test_flags_pass_through_and_the_key_is_not_printed(capsys):
    out = dry_run(capsys, "--engine", "vllm", "qwen3.5-122b-a10b", "--tp", 2, "--host", "0.0.0.0", "--port", 9000,
                  "--api-key", "hunter2", "--max-context", 32768, "-b", 8)
    assert out == vllm("Qwen/Qwen3.5-122B-A10B", "z-lab/Qwen3.5-122B-A10B-DFlash", 7, "qwen3.5-122b-a10b", tp=2,
                       extra=" --max-model-len 32768").replace("127.0.0.1 --port 8000", "0.0.0.0 --port 9000") + \
        ' --api-key "$DFLASH_API_KEY"'
    out = dry_run(capsys, "--engine", "sglang", "qwen3-8b", "--max-context", 4096, "--port", 30000)
    assert "--context-length 4096" in out and out.endswith("--port 30000")
    assert main(["serve", "--engine", "sglang", "qwen3-8b", "--host", "0.0.0.0", "--dry-run"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_block_size_comes_from_the_drafters_config_when_it_is_on_disk(capsys, tmp_path):
    target, drafter = tmp_path / "My-Target", tmp_path / "my-drafter"
    target.mkdir()
    drafter.mkdir()
    (drafter / "config.json").write_text(json.dumps({"dflash_config": {"block_size": 10}}))
    out = dry_run(capsys, "--engine", "vllm", "--target", target, "--drafter", drafter)
    assert f'"model": "{drafter}", "num_speculative_tokens": 9' in out and "--served-model-name My-Target" in out
    out = dry_run(capsys, "--engine", "sglang", "qwen3-8b", "--drafter", drafter)
    assert "--speculative-num-draft-tokens 10" in out and "--served-model-name qwen3-8b" in out
    assert main(["serve", "--engine", "sglang", "--target", "Org/Model", "--drafter", "org/unknown", "--dry-run"]) == 2
    assert "--block-size" in capsys.readouterr().err
    out = dry_run(capsys, "--engine", "sglang", "--target", "Org/Model", "--drafter", "org/unknown", "-b", 12)
    assert "--speculative-num-draft-tokens 12" in out and "--served-model-name Org/Model" in out


def test_python_is_named_by_its_path_when_another_one_is_first_on_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert f"=1 {sys.executable} -m sglang.launch_server" in dry_run(capsys, "--engine", "sglang", "qwen3-8b")


@pytest.mark.parametrize("args, message", [
    (["--engine", "tgi", "qwen3-8b"], "unknown engine 'tgi'"),
    (["--engine", "vllm", "qwen3-8b", "--device", "cuda"], "--device applies to dflash's own engine"),
    (["--engine", "vllm", "--target", "Org/Model"], "--engine needs a drafter"),
    (["--engine", "vllm", "qwen3-8b", "--target", "Org/Model"], "either a model name"),
    (["qwen3-8b", "--dry-run"], "--tp and --dry-run go with --engine"),
])
def test_misused_flags_are_one_line_usage_errors(capsys, args, message):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_engine_says_what_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `vllm` command anywhere
    assert main(["serve", "--engine", "vllm", "qwen3.5-122b-a10b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("Error: vLLM is not installed (no `vllm` command on PATH): install it with `pip install -U vllm` "
                   "on the GPU machine")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # this interpreter has no sglang either
    assert main(["serve", "--engine", "sglang", "qwen3.5-122b-a10b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: SGLang is not installed for ") and err.endswith(
        "install it with `pip install -U sglang` on the GPU machine")
    assert len(err.splitlines()) == 1


def fake_engine(root: Path, name: str, version: str, knows_dflash: bool) -> dict:
    """A stand-in package (and, for vLLM, its command) that writes how it was started to record.json."""
    site, bin_dir = root / "site", root / "bin"
    pkg = site / name
    marker = pkg / ("srt/speculative/dflash_worker.py" if name == "sglang" else "v1/spec_decode/dflash.py")
    marker.parent.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if knows_dflash:
        marker.write_text("")
    dist = site / f"{name}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = ("import json, os, sys\n"
              f"json.dump({{'argv': sys.argv, 'env': os.environ.get('SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN')}}, "
              f"open({str(root / 'record.json')!r}, 'w'))\n")
    (pkg / "launch_server.py").write_text(record)
    bin_dir.mkdir()
    if name == "vllm":
        script = bin_dir / "vllm"
        script.write_text(f"#!{sys.executable}\n{record}")
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{PY_DIR}", "PYTHONPATH": str(site),
            "HF_HUB_CACHE": str(root / "hf"), "HF_HUB_OFFLINE": "1"}


def serve_process(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dflash_cli.cli", "serve", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_an_engine_that_predates_dflash_is_named_with_its_version(tmp_path):
    env = fake_engine(tmp_path, "vllm", "0.6.0", knows_dflash=False)
    done = serve_process(env, "--engine", "vllm", "qwen3-8b")
    assert done.returncode == 1 and not (tmp_path / "record.json").exists()
    assert done.stderr.strip() == "Error: vLLM 0.6.0 does not know DFlash yet: upgrade it with `pip install -U vllm`"


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_the_engine_is_exec_d_with_the_printed_command(tmp_path, engine):
    env = fake_engine(tmp_path, engine, "0.99.0", knows_dflash=True)
    done = serve_process(env, "--engine", engine, "qwen3.5-122b-a10b", "--port", "8123")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "record.json").read_text())
    shown = done.stderr.strip()
    assert shown.startswith(f"dflash: handing over to {'vLLM' if engine == 'vllm' else 'SGLang'} 0.99.0: ")
    if engine == "vllm":
        assert record["argv"][1:] == ["serve", "Qwen/Qwen3.5-122B-A10B", "--speculative-config", json.dumps(
            {"method": "dflash", "model": "z-lab/Qwen3.5-122B-A10B-DFlash", "num_speculative_tokens": 15}),
            "--attention-backend", "flash_attn", "--max-num-batched-tokens", "32768", "--tensor-parallel-size", "4",
            "--served-model-name", "qwen3.5-122b-a10b", "--host", "127.0.0.1", "--port", "8123"]
    else:
        assert record["env"] == "1"  # the environment variable of the printed command reached the engine
        assert record["argv"][1:] == ["--model-path", "Qwen/Qwen3.5-122B-A10B", "--speculative-algorithm", "DFLASH",
                                      "--speculative-draft-model-path", "z-lab/Qwen3.5-122B-A10B-DFlash",
                                      "--speculative-num-draft-tokens", "16", "--tp-size", "4",
                                      "--mamba-scheduler-strategy", "extra_buffer", "--served-model-name",
                                      "qwen3.5-122b-a10b", "--host", "127.0.0.1", "--port", "8123"]
    assert " ".join(record["argv"][1:4]) in shown


@pytest.mark.parametrize("command", ["run", "chat"])
def test_run_and_chat_point_engine_only_pairs_to_the_hand_off(capsys, command):
    args = [command, "qwen3.5-397b-a17b"] + (["-p", "hi"] if command == "run" else [])
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("Error: qwen3.5-397b-a17b needs 8 GPUs, more than this engine runs on: serve it with "
                   "`dflash serve --engine sglang qwen3.5-397b-a17b` (or --engine vllm)")


def test_engine_only_pairs_are_in_the_registry():
    engine_only = {p.alias: (p.kind, p.gpus) for p in registry.all_pairs() if p.engine_only}
    assert engine_only == {"qwen3.5-122b-a10b": ("hybrid-moe", 4), "qwen3.5-397b-a17b": ("hybrid-moe", 8),
                           "qwen3-coder-next": ("hybrid-moe", 4), "kimi-k2.5": ("moe", 8), "glm-5.1": ("moe", 8)}
    assert all(not p.supported and "dflash serve --engine" in p.note for p in registry.all_pairs() if p.engine_only)
    assert len(registry.aliases()) == len(set(registry.aliases()))
