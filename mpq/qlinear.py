"""QuantizedLinear: the one module that holds a layer's packed weight and dispatches its matmul.

Backends, chosen per instance when the layer is built, from the device it is built on:
- "triton": mpq's Triton kernels (W4A16, W8A16) on CUDA; also on the CPU under TRITON_INTERPRET=1
- "cpu": torch's weight-only CPU kernels (mpq.kernels.cpu), bf16 activations; from a few dozen
  tokens a float32 matmul over dequantised tiles of the same tensors, which is faster there
- "reference": dequantise and multiply in float32 (forced with MPQ_KERNELS=reference)
- "dense": a 16-bit weight through F.linear (the fp16 format); on a CPU with no GEMM in its dtype,
  from a few tokens in float32 tiles (mpq.kernels.cpu.linear_dense_cpu), which is faster there
All read the same canonical packed tensors; only the CPU int4 kernel relays its weight out, once,
when the layer is built. A layer stays on the device it was built on (mpq.load(..., device=)).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from mpq.cpu_matmul import routes
from mpq.formats import FormatSpec, get_format
from mpq.kernels import cpu_supports, linear_cpu, linear_reference, prepare_cpu, triton_supports
from mpq.kernels.cpu import DENSE_FLOAT32_FROM_TOKENS, float32_from_tokens, linear_dense_cpu, multiplies_in_float32
from mpq.kernels.cpu_thresholds import NEVER
from mpq.packed_weight import PackedWeight, cast_target, keeping_dtypes
from mpq.quantize import quantize_weight

log = logging.getLogger(__name__)
BACKENDS = ("auto", "cpu", "reference", "triton")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a transformers Conv1D (which stores [in, out])."""
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return module.weight


def out_features_of(tensors: dict[str, torch.Tensor]) -> int:
    """Output features of a layer's canonical tensors (rows of its weight, packed or not)."""
    return tensors["qweight" if "qweight" in tensors else "weight"].shape[0]


# The oldest Triton that benchmarks/kernels_compile.py has compiled every launch config with
# for sm_90 (3.4, 3.6 and 3.9 checked; 3.4 is what torch 2.8 pins): an older one may reject a
# kernel at its first call, so the layer runs the reference instead.
TRITON_MIN = (3, 4)


@functools.cache
def triton_version() -> str | None:
    """The installed Triton's version, None if there is none."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def triton_problem() -> str | None:
    """Why mpq's Triton kernels cannot run here, or None when they can."""
    version = triton_version()
    if version is None:
        return "triton is not installed"
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < TRITON_MIN:
        return f"triton {version} is older than {'.'.join(map(str, TRITON_MIN))}, the oldest mpq's kernels are checked with"
    return None


def triton_available() -> bool:
    return triton_problem() is None


def choose_backend(fmt: FormatSpec, out_features: int, in_features: int, requested: str | None = None,
                   device: torch.device | str = "cpu") -> str:
    requested = requested or os.environ.get("MPQ_KERNELS", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"MPQ_KERNELS={requested!r} is not one of {BACKENDS}")
    if not fmt.quantized:
        return "dense"
    if requested == "reference":
        return "reference"
    on_cuda = torch.device(device).type == "cuda"
    if requested == "triton" or (requested == "auto" and on_cuda):
        problem = triton_problem()
        if problem is not None:
            if requested == "triton":
                raise ValueError(f"MPQ_KERNELS=triton but {problem}: pip install 'mpq-compiler[triton]'")
            log.warning("%s: %dx%d %s runs the dequantise reference on CUDA (pip install 'mpq-compiler[triton]')",
                        problem, out_features, in_features, fmt.name)
            return "reference"
        if triton_supports(fmt, in_features):
            return "triton"
        if requested == "triton":
            raise ValueError(f"no Triton kernel for {fmt.name} at {out_features}x{in_features} (groups must be a multiple "
                             "of 32 columns): use MPQ_KERNELS=reference")
        log.warning("no Triton kernel for %dx%d %s: it runs the dequantise reference on CUDA", out_features, in_features, fmt.name)
        return "reference"
    if not on_cuda and cpu_supports(fmt, out_features, in_features):
        return "cpu"
    if requested == "cpu":
        raise ValueError(f"no CPU kernel for {fmt.name} at {out_features}x{in_features}")
    return "reference"


def scales_by_column(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """INT4 scales and zeros [N, G] laid out for the Triton kernels: column-major, a K step's scales
    for a tile's columns side by side, and (bf16 zero points) each zero point right after its scale
    (scale_zero_pairs). A thread's share of a step's scales and zeros is then 32 bits or more even at
    one column a thread, so Triton's pipeline copies them ahead with the weights (cp.async) instead
    of each pass waiting on 16-bit loads of its own (kernels/triton_w4a16.py). Every torch path
    reads them as [N, G] all the same; a checkpoint saves them contiguous (checkpoint_tensors)."""
    scales, zeros = tensors["scales"], tensors.get("zeros")
    if zeros is not None and scales.dtype == zeros.dtype == torch.bfloat16:
        return {**tensors, **scale_zero_pairs(scales, zeros)}
    return {name: tensor.t().contiguous().t() if name in ("scales", "zeros") else tensor
            for name, tensor in tensors.items()}


def triton_layout(tensors: dict[str, torch.Tensor], fmt: FormatSpec) -> dict[str, torch.Tensor]:
    """A layer's tensors as its Triton kernel reads them: INT4's scales and zeros by column
    (scales_by_column), any other format's as quantised. The layer and the kernel benchmarks both
    lay them out here, so that what is timed is what a loaded layer runs."""
    return scales_by_column(tensors) if fmt.bits == 4 else tensors


def scale_zero_pairs(scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scales and zeros [N, G] as two views of one [G, N, 2] tensor: strides (2, 2N), the zero point
    of (n, g) one element after its scale. (Two buffers sharing storage: a save through mpq writes
    each contiguous; one that drops tensors sharing memory as tied would lose the zeros.)"""
    pairs = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()
    return {"scales": pairs[..., 0].t(), "zeros": pairs[..., 1].t()}


def launches_directly(x: torch.Tensor) -> bool:
    """Whether a Triton layer may call its launcher itself rather than through torch.ops.mpq.*.

    The custom op is what torch.compile, torch.export and make_fx record, and it refuses a backward
    pass; but on an eager call its dispatch adds host time to a launch that is already host-bound:
    on the H200 machine an eager INT4 call at M <= 16 took 84-154 us against 10-35 us of kernel
    (benchmarks/results/kernels-NVIDIA_H200-*.json; the op's own share was not measured there), and
    eager decoding is bound by that time. So the op is skipped only when nothing
    records the call: a plain tensor (not fake, functional or batched), no dispatch mode, no
    compiler, no functorch transform, no gradient wanted.
    """
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and torch._C._functorch.maybe_current_level() is None
            and not (x.requires_grad and torch.is_grad_enabled()))


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored in one of mpq's formats."""

    def __init__(self, fmt: FormatSpec, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 in_features: int, out_features: int, backend: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """`dtype`: that of the weight the layer stands in for (default: its bias's, else torch's default)."""
        super().__init__()
        self.fmt = fmt
        self.in_features = in_features
        self.out_features = out_features
        device = torch.device(device) if device is not None else next(iter(tensors.values())).device
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        self.backend = choose_backend(fmt, out_features, in_features, backend, device)
        if self.backend == "cpu":
            tensors = prepare_cpu(tensors, fmt)
            float32_from_tokens(fmt.bits)  # measured (once a machine) now, not inside a forward that torch traces
        if self.backend == "triton":
            tensors = triton_layout(tensors, fmt)
        # decided once (MPQ_CPU_MATMUL and the CPU's probe): a forward reads no environment
        self.dense_in_float32 = self.backend == "dense" and device.type == "cpu" and routes(tensors["weight"].dtype)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        if "weight" not in tensors:
            # No dense weight: model code that peeks at one reads its dtype, device and shape (mpq.packed_weight)
            dtype = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())
            self.weight = PackedWeight(dtype, device, torch.Size((out_features, in_features)))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device), requires_grad=False)

    def _apply(self, fn, recurse: bool = True):
        """Move with the model, keep every stored dtype (SwitchTransformers' router casts its
        classifier on every forward); a packed weight's dtype follows the cast, as the weight's would."""
        target = cast_target(fn)
        device = self.qweight.device if hasattr(self, "qweight") else None
        result = super()._apply(keeping_dtypes(fn), recurse)
        if self.backend == "triton" and self.fmt.bits == 4 and self.qweight.device != device:
            # a move copies each buffer on its own, the pairs apart and row-major: lay them out again
            self._buffers.update(scales_by_column({name: self._buffers[name] for name in ("scales", "zeros")
                                                   if name in self._buffers}))
        if isinstance(self.weight, PackedWeight):
            self.weight = PackedWeight(target or self.weight.dtype, self.qweight.device, self.weight.shape)
        return result

    @classmethod
    def from_module(cls, module: nn.Module, fmt: FormatSpec | str, backend: str | None = None
                    ) -> tuple["QuantizedLinear", dict[str, torch.Tensor]]:
        """Quantise an nn.Linear / Conv1D; returns the layer and its canonical tensors (for saving)."""
        fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        weight = linear_weight(module)
        tensors = quantize_weight(weight, fmt)
        out_features, in_features = weight.shape
        layer = cls(fmt, tensors, module.bias, in_features, out_features, backend, dtype=weight.dtype)
        return layer, tensors

    @property
    def kernel(self) -> str:
        """What runs this layer's matmul, in words (for `mpq inspect` and logs)."""
        if self.backend == "dense":
            return f"F.linear, float32 tiles from {DENSE_FLOAT32_FROM_TOKENS} tokens" if self.dense_in_float32 else "F.linear"
        if self.backend == "triton":
            return "triton w8a16" if self.fmt.bits == 8 else "triton w4a16"
        if self.backend == "cpu":
            name = "torch _weight_int8pack_mm" if self.fmt.bits == 8 else "torch _weight_int4pack_mm_for_cpu"
            tokens = float32_from_tokens(self.fmt.bits)
            tiled = tokens < NEVER and multiplies_in_float32(self.fmt, tokens)  # NEVER: no count reaches them
            return f"{name}, float32 tiles from {tokens} tokens" if tiled else name
        return "reference (dequantise + F.linear)"

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in self.named_buffers(recurse=False) if name != "input_scale"}

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        if launches_directly(x):
            from mpq.kernels import triton_w4a16, triton_w8a16  # imports triton on first use

            w8, w4 = triton_w8a16.w8a16_linear, triton_w4a16.w4a16_linear
        else:
            from mpq.kernels import ops  # registers torch.ops.mpq.* (imports triton on first use)

            w8, w4 = ops.w8a16_linear, ops.w4a16_linear
        if self.fmt.bits == 8:
            return w8(x, self.qweight, self.scales, self.bias)
        return w4(x, self.qweight, self.scales, getattr(self, "zeros", None), self.fmt.group_along(self.in_features),
                  self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if hasattr(self, "input_scale"):  # AWQ: x / s, where the weight holds W s
            # a fused group holds each member's (identical) vector one after another: the first serves
            x2 = x2 * self.input_scale[: self.in_features].to(x2.dtype)
        if self.backend == "dense":
            weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            if self.dense_in_float32 and x.dtype == self.weight.dtype:
                y = linear_dense_cpu(x2, weight, bias)
            else:
                y = F.linear(x2, weight, bias)
        elif self.backend == "cpu":
            y = linear_cpu(x2, self._tensors(), self.fmt, self.bias)
        elif self.backend == "triton":
            y = self._triton(x2)
        else:
            y = linear_reference(x2, self._tensors(), self.fmt, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt.name}, kernel={self.kernel}"
