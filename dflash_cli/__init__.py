"""dflash: lossless block-diffusion speculative decoding for local LLM chat."""

__version__ = "0.1.0"
