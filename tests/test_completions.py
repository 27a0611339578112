"""Completion scripts come from the CLI definition, match the committed files, and work."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_cli.cli import main
from dflash_cli.completion import SHELLS, render

ROOT = Path(__file__).resolve().parents[1]
FILES = {"bash": "dflash.bash", "zsh": "_dflash", "fish": "dflash.fish"}


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_scripts_match_the_cli(shell):
    committed = (ROOT / "completions" / FILES[shell]).read_text()
    assert committed == render(shell), "run `python scripts/gen_completions.py` after changing the CLI"


def test_completions_command_prints_the_script(capsys):
    assert main(["completions", "fish"]) == 0
    assert capsys.readouterr().out == render("fish")
    assert main(["completions", "tcsh"]) == 2


def _bash_complete(line: str) -> list[str]:
    script = f"""source {ROOT / 'completions' / 'dflash.bash'}
COMP_WORDS=({line}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
[[ "{line}" == *" " ]] && COMP_WORDS+=("") && COMP_CWORD=${{#COMP_WORDS[@]}}-1
_dflash; printf '%s\\n' "${{COMPREPLY[@]}}" """
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()


def test_bash_completes_commands_flags_and_aliases():
    assert _bash_complete("dflash ch") == ["chat"]
    assert _bash_complete("dflash run --temp") == ["--temperature"]
    assert "--show-drafts" in _bash_complete("dflash chat --")
    assert _bash_complete("dflash chat qwen3-8") == ["qwen3-8b"]
    assert _bash_complete("dflash completions f") == ["fish"]
    assert _bash_complete("dflash run qwen3.6-27b --quantize ") == ["auto", "none", "fp8", "int8", "int4"]
    assert _bash_complete("dflash serve --quantize in") == ["int8", "int4"]


@pytest.mark.parametrize("shell, flag", [("zsh", "-n"), ("fish", "-n")])
def test_scripts_parse_in_their_shell(shell, flag):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    subprocess.run([shell, flag, str(ROOT / "completions" / FILES[shell])], check=True)


def test_fish_completes_flags_and_aliases():
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed")
    out = subprocess.run(["fish", "-c", f"source {ROOT / 'completions' / 'dflash.fish'}; "
                          "complete -C 'dflash chat --temp'; complete -C 'dflash run qwen3-8'"],
                         capture_output=True, text=True, check=True).stdout
    assert "--temperature" in out and "qwen3-8b" in out


def readme_install_lines() -> list[str]:
    section = (ROOT / "README.md").read_text().partition("## Shell completions")[2]
    block = section.partition("```bash\n")[2].partition("```")[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_install_lines_work_on_a_fresh_account(tmp_path):
    """The README's lines, run as written in an empty home directory, with `dflash` being this checkout."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    shim = bin_dir / "dflash"
    shim.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m dflash_cli.cli "$@"\n')
    shim.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    lines = readme_install_lines()
    subprocess.run(["bash", "-ec", "\n".join(lines)], env=env, check=True)
    installed = {"bash": home / ".local/share/bash-completion/completions/dflash", "zsh": home / ".zfunc/_dflash",
                 "fish": home / ".config/fish/completions/dflash.fish"}
    for shell, path in installed.items():
        assert path.read_text() == render(shell)
    if shutil.which("zsh"):  # the fpath line the README asks for makes zsh find it
        (home / ".zshrc").write_text("fpath=(~/.zfunc $fpath)\nautoload -Uz compinit && compinit -u\n")
        out = subprocess.run(["zsh", "-ic", "print -r -- $_comps[dflash]"], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == "_dflash", out.stderr
    if shutil.which("fish"):  # fish loads ~/.config/fish/completions by itself
        out = subprocess.run(["fish", "-c", "complete -C 'dflash ch'"], env=env, capture_output=True, text=True)
        assert out.stdout.startswith("chat")
    help_text = subprocess.run([sys.executable, "-m", "dflash_cli.cli", "completions", "--help"], cwd=ROOT,
                               env={**env, "COLUMNS": "200", "NO_COLOR": "1"}, capture_output=True, text=True).stdout
    for line in lines:
        assert line in help_text  # `dflash completions --help` gives the same lines
