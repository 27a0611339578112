"""`python -m dflash_cli`: the same as the `dflash` command."""
from .cli import entry

entry()
