"""dflash: lossless block-diffusion speculative decoding for local LLM chat.

`dflash_cli.load(...)` returns a loaded pair with `generate` and `stream` (api.py). It is imported
on first use: `import dflash_cli` stays cheap, since every `dflash` command starts by importing it.
"""

__version__ = "0.1.0"

_API = ("load", "Pair", "Piece", "Result", "ModelOptions", "open_session")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dflash_cli' has no attribute {name!r}")
