"""`dflash doctor`: Python, torch, CUDA, Triton, GPU memory, the model cache and Hub login."""
from __future__ import annotations

from typing import Optional

import typer


def doctor(model: Optional[str] = typer.Argument(None, help="Check the GPU memory this model needs.", metavar="MODEL")) -> None:
    """Check the setup: Python, torch, CUDA, Triton, GPU memory, the model cache and Hub login."""
    from ..doctor import render_checks, run_checks

    checks = run_checks(model)
    render_checks(checks)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)
