"""Completion scripts come from the CLI definition, match the committed files, and work."""
from __future__ import annotations

import shutil
import subprocess
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
