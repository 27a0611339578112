"""`dflash completions SHELL`: the completion script, generated from the CLI definition."""
from __future__ import annotations

import typer

from ..errors import UsageError


def completions(shell: str = typer.Argument(..., help="bash, zsh or fish.", metavar="SHELL")) -> None:
    """Print a shell completion script.

    \b
    bash:  mkdir -p ~/.local/share/bash-completion/completions
           dflash completions bash > ~/.local/share/bash-completion/completions/dflash
    zsh:   mkdir -p ~/.zfunc && dflash completions zsh > ~/.zfunc/_dflash
           then, in ~/.zshrc before `compinit`:  fpath=(~/.zfunc $fpath)
    fish:  mkdir -p ~/.config/fish/completions
           dflash completions fish > ~/.config/fish/completions/dflash.fish
    """
    from ..completion import SHELLS, render

    if shell not in SHELLS:
        raise UsageError(f"unknown shell '{shell}' (choose from {', '.join(SHELLS)})")
    typer.echo(render(shell), nl=False)
