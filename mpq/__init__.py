"""mpq: a sensitivity-driven mixed-precision compiler for PyTorch / Hugging Face models.

    import mpq
    summary = mpq.compile_model(mpq.CompileOptions(model="demo", max_mem="8MB", out="out"))
    model = mpq.load("out/configs/c0-...")
"""

from mpq.checkpoint import load
from mpq.compile import CompileOptions, compile_model
from mpq.errors import MpqError
from mpq.formats import FormatSpec, get_format
from mpq.plan import Plan
from mpq.qlinear import QuantizedLinear

__all__ = ["CompileOptions", "FormatSpec", "MpqError", "Plan", "QuantizedLinear", "compile_model", "get_format", "load"]
