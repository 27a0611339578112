"""Write completions/dflash.{bash,zsh,fish} from the CLI definition (run after changing flags)."""
from pathlib import Path

from dflash_cli.completion import SHELLS, render

OUT = Path(__file__).resolve().parents[1] / "completions"
NAMES = {"bash": "dflash.bash", "zsh": "_dflash", "fish": "dflash.fish"}

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for shell in SHELLS:
        (OUT / NAMES[shell]).write_text(render(shell))
        print(f"wrote {OUT / NAMES[shell]}")
