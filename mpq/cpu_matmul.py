"""16-bit matrix products on a CPU that has no 16-bit GEMM, computed in float32 for quality passes.

Where oneDNN has no bf16 (or fp16) GEMM for the CPU (an AVX2 one: no AVX-512), torch multiplies
16-bit matrices in a generic loop, about 5x slower than in float32: the demo's held-out evaluation
takes 18.5 s in bf16 and 4.0 s with its products in float32 on a 2-core AVX2 EPYC
(benchmarks/cpu_matmul.py). The arithmetic is the same either way (16-bit inputs, float32
products and sums, the output rounded once to the 16-bit dtype); only the order of the sums
differs, so an output differs rarely and by one unit in its last place (about 0.02% of them on
random 512x512 @ 512x1024 bf16, 0.2% in fp16), or where the sum cancels, by float32's rounding.

mpq's quality passes (mpq.tasks: calibration references, divergences, held-out losses, embeddings)
run under `float32_products()`. Speed is timed without it: that is what a user's runtime runs.
The emitted model's own 16-bit (fp16-format) layers take float32 tiles on such a CPU themselves,
from a few tokens (mpq.kernels.cpu.linear_dense_cpu), by the same `routes` decision; what the
plan leaves unquantised runs as the model has it. `MPQ_CPU_MATMUL=fp32` routes the products
through float32 on any CPU, `native` never, `auto` (the default) where the CPU has no 16-bit GEMM.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpq.errors import MpqError

SETTINGS = ("auto", "fp32", "native")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# A float32 tile of an operand or of the output holds at most this many elements (4 MB): an lm_head
# of a 128k vocabulary is converted a slice at a time, not as a 2 GB transient in the peak memory.
TILE_ELEMENTS = 1 << 20

_aten = torch.ops.aten


def setting() -> str:
    value = os.environ.get("MPQ_CPU_MATMUL", "auto")
    if value not in SETTINGS:
        raise MpqError(f"MPQ_CPU_MATMUL={value!r}: use one of {', '.join(SETTINGS)}")
    return value


@functools.cache
def native_gemm(dtype: torch.dtype) -> bool:
    """Whether torch has a 16-bit GEMM (oneDNN's) for this CPU and dtype."""
    try:
        check = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
                 else torch.ops.mkldnn._is_mkldnn_fp16_supported)
        return bool(check())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume the generic loop
        return False


def routes(dtype: torch.dtype) -> bool:
    """Whether CPU products in `dtype` go through float32 under `float32_products()`."""
    if dtype not in SIXTEEN_BIT:
        return False
    chosen = setting()
    return chosen == "fp32" or (chosen == "auto" and not native_gemm(dtype))


def describe() -> str:
    """One line for cards and reports: how this machine's quality passes multiply 16-bit matrices."""
    routed = [str(dtype).removeprefix("torch.") for dtype in SIXTEEN_BIT if routes(dtype)]
    if not routed:
        return "torch's CPU GEMM in the model's dtype"
    why = "MPQ_CPU_MATMUL=fp32" if setting() == "fp32" else "this CPU has no 16-bit GEMM"
    return f"{'/'.join(routed)} products computed in float32, rounded to the 16-bit dtype ({why})"


def _product(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None, beta: float = 1,
             alpha: float = 1) -> torch.Tensor:
    """(beta * add + alpha *) a @ b of 16-bit [M, K] and [K, N], in float32 a tile at a time, in a's dtype."""
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty(m, n, dtype=a.dtype)
    if add is not None:
        add = add.expand(m, n)
    # Each float32 tile (of a, of b, of the output) holds at most TILE_ELEMENTS.
    cols = min(n, max(1, TILE_ELEMENTS // max(k, 1)))
    rows = max(1, TILE_ELEMENTS // max(k, cols))
    for j in range(0, n, cols):
        b32 = b[:, j:j + cols].float()
        for i in range(0, m, rows):
            a32 = a[i:i + rows].float()
            out[i:i + rows, j:j + cols] = (torch.mm(a32, b32) if add is None else
                                           torch.addmm(add[i:i + rows, j:j + cols].float(), a32, b32, beta=beta, alpha=alpha))
    return out


class Float32Products(TorchDispatchMode):
    """Computes CPU aten.mm / aten.addmm of tensors in `dtypes` in float32 (the linear layers'
    products; attention goes through SDPA, which has its own CPU kernels). Which dtypes is decided
    once, when the mode is made, not on every product."""

    def __init__(self, dtypes: frozenset[torch.dtype]) -> None:
        super().__init__()
        self.dtypes = dtypes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.mm.default:
            a, b = args
            if self._routed(a, b):
                return _product(a, b)
        elif func is _aten.addmm.default:
            add, a, b = args
            if self._routed(add, a, b):
                return _product(a, b, add, kwargs.get("beta", 1), kwargs.get("alpha", 1))
        return func(*args, **kwargs)

    def _routed(self, *tensors: torch.Tensor) -> bool:
        dtype = tensors[0].dtype
        a, b = tensors[-2:]
        return (dtype in self.dtypes and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors)
                and a.dim() == 2 and b.dim() == 2 and a.shape[1] > 0)  # an empty sum is torch's to define


def float32_products(device: torch.device | str = "cpu"):
    """A context in which CPU products of 16-bit matrices are computed in float32 where `routes`
    says so; for a model on another `device`, or where nothing would be routed, a plain no-op
    context (the dispatch mode's Python call per op would cost a GPU's forward pass for nothing)."""
    dtypes = frozenset(dtype for dtype in SIXTEEN_BIT if routes(dtype))
    if torch.device(device).type != "cpu" or not dtypes:
        return nullcontext()
    return Float32Products(dtypes)
