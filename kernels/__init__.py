"""mpq.kernels: the matmul kernels behind QuantizedLinear.

- reference: dequantise to float32 and multiply (the ground truth every kernel is tested against)
- cpu: torch's weight-only CPU kernels (int8 per channel, int4 group-wise) with bf16 activations
Triton kernels for CUDA are imported lazily, so a CPU-only install imports mpq without triton.
"""

if __name__ == "kernels":
    # This folder ships as mpq.kernels, but Python started in the repository root (python -m pytest,
    # python -m mpq.cli) finds it as a top-level `kernels` too, ahead of Hugging Face's `kernels`
    # package, which transformers (>= 5.25) and bitsandbytes import. Hand that import over to the
    # installed package: a module may put another in its place in sys.modules while it is imported.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        # Not installed: leave no module in the place (None in sys.modules: later imports raise
        # ModuleNotFoundError, find_spec answers None). The import that found this folder gets
        # None rather than an error, since transformers before 5.25 probes for the package by
        # find_spec, then, finding no metadata, import_module, and took an error there for a
        # failed model import (seen on the H200 machine, transformers 5.17: LlamaConfig).
        sys.modules[__name__] = None
    else:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _installed
        _spec.loader.exec_module(_installed)
else:
    from mpq.kernels.cpu import cpu_supports, linear_cpu, prepare_cpu
    from mpq.kernels.reference import linear_reference
    from mpq.kernels.triton_shapes import triton_supports

    __all__ = ["cpu_supports", "linear_cpu", "linear_reference", "prepare_cpu", "triton_supports"]
