"""pull, models, rm, doctor, model resolution and batch prompts, through the command line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_cli import registry
from dflash_cli.cli import main

from .hub_server import HubServer
from .test_hub import server  # noqa: F401  (the local Hub fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub_pair(server, stories_pair, monkeypatch):  # noqa: F811
    """The stories pair served as the registry's qwen3-4b, so aliases work end to end."""
    t, d = stories_pair
    server.add_dir("Test/Stories", t)
    server.add_dir("Test/Stories-DFlash", d)
    pair = registry.ModelPair("qwen3-4b", "Test/Stories", "Test/Stories-DFlash", 8)
    monkeypatch.setattr(registry, "_BY_ALIAS", registry._BY_ALIAS | {"qwen3-4b": pair})
    monkeypatch.setattr(registry, "PAIRS", (pair,) + registry.PAIRS[1:])
    return pair


def test_pull_then_run_by_alias(capsys, hub_pair):
    assert main(["pull", "qwen3-4b"]) == 0
    capsys.readouterr()
    assert main(["run", "qwen3-4b", "-p", "Once upon a time", "--raw", "-n", "8", "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().out.startswith(", there was a little girl")


def test_missing_model_in_a_script_says_how_to_pull(capsys, hub_pair):
    assert main(["run", "qwen3-4b", "-p", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err == "Error: qwen3-4b is not downloaded: run `dflash pull qwen3-4b`, or pass --yes to download it now\n"


def test_yes_pulls_missing_models(capsys, hub_pair):
    assert main(["run", "qwen3-4b", "-p", "The cat", "--raw", "-n", "4", "--device", "cpu", "--yes", "-q"]) == 0


def test_models_lists_downloaded_pairs(capsys, hub_pair):
    main(["models", "--json"])
    rows = {r["alias"]: r for r in json.loads(capsys.readouterr().out)}
    assert not rows["qwen3-4b"]["downloaded"] and not rows["glm-5.3-flash"]["supported"]
    # what each pair needs on a GPU: bf16 weights (Qwen3-8B 16.4 GB + its drafter) and a 4K cache
    assert 18 * 2**30 < rows["qwen3-8b"]["gpu_memory"] < 19 * 2**30 and rows["glm-5.3-flash"]["gpu_memory"] is None
    assert rows["gpt-oss-20b"]["gpu_memory"] < rows["qwen3-8b"]["gpu_memory"]  # MXFP4 experts: 12.8 GiB of weights
    main(["pull", "qwen3-4b"])
    capsys.readouterr()
    main(["models", "--json"])
    row = {r["alias"]: r for r in json.loads(capsys.readouterr().out)}["qwen3-4b"]
    assert row["downloaded"] and row["size_on_disk"] > 100_000
    assert main(["models"]) == 0 and "ready" in capsys.readouterr().out


def test_rm_needs_confirmation_in_scripts_and_removes_with_yes(capsys, hub_pair):
    main(["pull", "qwen3-4b"])
    assert main(["rm", "qwen3-4b"]) == 2
    assert "pass --yes to confirm" in capsys.readouterr().err
    assert main(["rm", "qwen3-4b", "--yes"]) == 0
    assert "removed Test/Stories-DFlash" in capsys.readouterr().err
    main(["models", "--json"])
    assert not next(r for r in json.loads(capsys.readouterr().out) if r["alias"] == "qwen3-4b")["downloaded"]


def test_unsupported_and_unknown_models(capsys, server):  # noqa: F811
    assert main(["run", "glm-5.3-flash", "-p", "x"]) == 1
    assert "not supported by this version yet (GLM-5.3-Flash target architecture" in capsys.readouterr().err
    assert main(["chat", "qwen-8b"]) == 2
    assert "did you mean 'qwen3-8b'" in capsys.readouterr().err


def test_doctor_exits_1_when_a_check_fails(capsys):
    assert main(["doctor", "nosuch"]) == 1
    assert "✗ nosuch: unknown model 'nosuch'" in capsys.readouterr().out


def test_doctor_reports_each_check(capsys):
    import torch

    code = main(["doctor", "qwen3-8b"])
    out = capsys.readouterr().out
    assert code == (0 if torch.cuda.is_available() else 1)  # no GPU here: qwen3-8b cannot run, a failed check
    for name in ("python", "torch", "cuda", "triton", "cache", "hub login", "qwen3-8b"):
        assert name in out
    # Qwen3-8B in bf16 (16.4 GB) + its 1B-parameter drafter + cache and workspace: 18.6 GiB at 4K context
    assert "needs ~19 GiB of GPU memory (4K context)" in out


def test_jsonl_prompt_file_gives_one_result_per_line(capsys, stories_pair, tmp_path):
    t, d = stories_pair
    f = tmp_path / "batch.jsonl"
    f.write_text(json.dumps("Once upon a time") + "\n\n" + json.dumps([{"role": "user", "content": "The cat"}]) + "\n")
    assert main(["run", "--target", str(t), "--drafter", str(d), "--device", "cpu", "--prompt-file", str(f),
                 "-n", "6", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(json.loads(x)["generated_tokens"] == 6 for x in lines)
    f.write_text('"fine"\n{"role": "user"}\n')
    assert main(["run", "--target", str(t), "--prompt-file", str(f)]) == 2
    assert f"{f}:2: expected a string or a list of messages" in capsys.readouterr().err


def test_version_and_help():
    p = subprocess.run([sys.executable, "-m", "dflash_cli.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={"NO_COLOR": "1", "COLUMNS": "100", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and "chat" in p.stdout and "\x1b[" not in p.stdout
    assert main(["--version"]) == 0


def pair_bytes(pair) -> int:
    return sum(f.stat().st_size for d in pair for f in d.iterdir() if f.is_file())


def test_a_pair_is_asked_about_once_with_its_size(hub_pair, stories_pair, monkeypatch, capsys):
    import torch

    from dflash_cli.errors import DflashError
    from dflash_cli.hub import format_size
    from dflash_cli.resolve import resolve_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    asked = []
    with pytest.raises(DflashError, match=r"qwen3-4b is not downloaded \(run `dflash pull qwen3-4b`\)"):
        resolve_model("qwen3-4b", None, None, confirm=lambda q: asked.append(q) or False)
    assert asked == [f"qwen3-4b is not downloaded (Test/Stories and Test/Stories-DFlash: "
                     f"{format_size(pair_bytes(stories_pair))}). Download it now?"]
    warning = capsys.readouterr().err
    assert warning.startswith("Warning: there is no CUDA GPU here: qwen3-4b would run on the CPU, very slowly")
    t, d = resolve_model("qwen3-4b", None, None, confirm=lambda q: asked.append(q) or True)
    assert len(asked) == 2 and (t / "config.json").is_file() and (d / "config.json").is_file()
    assert resolve_model("qwen3-4b", None, None, confirm=lambda q: asked.append(q) or True) == (t, d)
    assert len(asked) == 2  # nothing is asked about what is already here
    assert resolve_model("qwen3-4b", None, None, no_spec=True)[1] is None


def test_no_gpu_warning_only_without_a_gpu(monkeypatch):
    import torch

    from dflash_cli import registry
    from dflash_cli.resolve import no_gpu_warning

    pair = registry.resolve("qwen3-8b")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "qwen3-8b would run on the CPU, very slowly (it needs ~19 GiB of GPU memory)" in no_gpu_warning(pair)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert no_gpu_warning(pair) is None


def test_a_terminal_user_is_asked_before_a_download(hub_pair, monkeypatch):
    from dflash_cli import resolve

    questions = []
    monkeypatch.setattr(resolve, "interactive", lambda: True)
    monkeypatch.setattr(resolve, "ask", lambda q: questions.append(q) or True)
    t, _ = resolve.resolve_model("qwen3-4b", None, None)
    assert len(questions) == 1 and questions[0].startswith("qwen3-4b is not downloaded (Test/Stories and ")
    assert (t / "config.json").is_file()


def test_a_declined_rm_exits_1_and_keeps_the_files(hub_pair, monkeypatch, capsys):
    from dflash_cli import resolve

    main(["pull", "qwen3-4b"])
    monkeypatch.setattr(resolve, "interactive", lambda: True)
    monkeypatch.setattr(resolve, "ask", lambda q: False)
    assert main(["rm", "qwen3-4b"]) == 1
    main(["models", "--json"])
    assert next(r for r in json.loads(capsys.readouterr().out) if r["alias"] == "qwen3-4b")["downloaded"]


def test_ctrl_d_at_a_question_ends_its_line(monkeypatch, capsys):
    import io

    from dflash_cli.resolve import ask

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert not ask("Download it now?")
    assert capsys.readouterr().err == "Download it now? [y/N] \n"


@pytest.mark.parametrize("args", [["pull", "a/b/c"], ["pull", "bad name/x"], ["rm", "x/y/z"],
                                  ["run", "--target", "bad name/x", "-p", "hi", "--yes"]])
def test_invalid_hub_ids_are_usage_errors(capsys, server, args):  # noqa: F811
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a Hub repo id" in err and not server.requests


def test_a_typo_in_a_local_path_is_not_a_hub_id(capsys, server, stories_pair, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--target", "demo/storiez", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --target demo/storiez: no such directory in demo/") and err.count("\n") == 1


def test_help_shows_no_type_placeholders():
    from dflash_cli.cli import command

    shown = {}
    for name in ("", *command().commands):
        p = subprocess.run([sys.executable, "-m", "dflash_cli.cli", *([name] if name else []), "--help"], cwd=ROOT,
                           capture_output=True, text=True, env={"NO_COLOR": "1", "COLUMNS": "120", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0
        shown[name] = p.stdout
    for name, text in shown.items():
        assert not re.search(r"<\w[\w ]*>", text), (name, text)  # typer's <bool>, <str>, <list[str]>, <int range>
    assert re.search(r"--max-tokens +-n +N ", shown["run"]) and re.search(r"--stop +TEXT ", shown["run"])
    assert re.search(r"│ --raw +Send", shown["run"])  # a flag shows no value


def test_models_lists_the_demo_and_the_multi_gpu_pairs_as_runnable(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["alias"]: r for r in json.loads(capsys.readouterr().out)}
    demo = rows["demo"]
    assert demo["supported"] and demo["downloaded"] and 0 < demo["size_on_disk"] < 5e6
    assert rows["qwen3.5-122b-a10b"]["engine_only"] and rows["qwen3.5-122b-a10b"]["gpus"] == 4
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"│ demo +│ +8 │ ready \(CPU\)", table)
    assert re.search(r"│ kimi-k2\.5 +│ +8 │ serve --engine \(8 GPUs\)", table) and "not yet (needs" not in table


def test_the_models_table_gpu_memory_is_what_doctor_computes():
    """In every format (bf16, fp8, int8, int4) and the target's bf16 weights, within 2%: the table shows whole GiB."""
    from dflash_cli.catalog import _MEASURED, measured

    now = measured()
    assert set(_MEASURED) == set(now)
    for alias, needs in now.items():
        for stored, need in zip(_MEASURED[alias], needs, strict=True):
            assert abs(stored - need) <= 0.02 * need, \
                f"{alias}: regenerate catalog._MEASURED (python -c 'from dflash_cli.catalog import measured; print(measured())')"


def test_models_starts_without_importing_torch():
    code = "import sys; from dflash_cli.cli import main; main(['models', '--json']); print('torch' in sys.modules, file=sys.stderr)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr.strip().splitlines()[-1] == "False", p.stderr
