"""mpq: a sensitivity-driven mixed-precision compiler for PyTorch / Hugging Face models.

    import mpq
    summary = mpq.compile_model(mpq.CompileOptions(model="demo", max_mem="8MB", out="out"))
    model = mpq.load("out/configs/c0-...")
"""

from __future__ import annotations

from typing import Any

from mpq.checkpoint import load
from mpq.errors import MpqError
from mpq.formats import FormatSpec, get_format
from mpq.plan import Plan
from mpq.qlinear import QuantizedLinear

__all__ = ["CompileOptions", "FormatSpec", "MpqError", "Plan", "QuantizedLinear", "compile_model", "get_format", "load"]

_COMPILER = ("CompileOptions", "compile_model")


def __getattr__(name: str) -> Any:
    # The compiler (Optuna, the search, calibration) is imported on first use, so a process that
    # only runs `mpq.load` needs none of it: a serving image without optuna can load a config.
    if name in _COMPILER:
        from mpq import compile as compiler

        return getattr(compiler, name)
    raise AttributeError(f"module 'mpq' has no attribute {name!r}")
