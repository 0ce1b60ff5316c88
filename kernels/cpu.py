"""torch's weight-only CPU kernels: `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`, and
for many tokens a float32 matmul over dequantised tiles of the same tensors.

The kernels run with bf16 activations; inputs of other dtypes are cast to bf16 and the output cast
back. Their cost grows with the token count M as M separate passes over the weight would
(benchmarks/cpu_kernels.py: flat per token from M = 16 to 2048), so from a few dozen tokens a
float32 GEMM, which reuses each weight across tokens, wins even after dequantising every weight
once per call. That path reads the same tensors (no second copy), one tile of rows at a time, and
keeps the kernels' arithmetic: bf16-rounded inputs, float32 weights and sums, one rounding of the
output. The int4 kernel needs its own weight layout (`_convert_weight_to_int4pack_for_cpu`, same
bytes as ours), made once when the layer is built.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mpq.cpu_matmul import TILE_ELEMENTS
from mpq.formats import FormatSpec
from mpq.kernels.cpu_int4_layout import SPAN_ALIGNMENT, int4_row_layout, int4_row_span_float, int4_rows

ACT_DTYPE = torch.bfloat16
_INT4_N_MULTIPLE = 16  # the CPU int4 layout packs output channels in blocks of 16
_INT4_GROUPS = (256, 128, 64, 32)  # the group sizes the CPU int4 kernel takes
_ALIGNMENT = 64


def kernel_group(fmt: FormatSpec, in_features: int) -> int | None:
    """The group size the CPU int4 kernel runs a layer with: the format's own, or for per-channel
    INT4 the largest one the kernel takes that divides K (each row's one scale, repeated)."""
    if fmt.group_size is not None:
        return fmt.group_size if fmt.group_size in _INT4_GROUPS else None
    return next((g for g in _INT4_GROUPS if in_features % g == 0), None)


def cpu_supports(fmt: FormatSpec, out_features: int, in_features: int) -> bool:
    if fmt.bits == 8:
        return True
    if fmt.bits == 4:
        return (out_features % _INT4_N_MULTIPLE == 0 and fmt.supports(out_features, in_features)
                and kernel_group(fmt, in_features) is not None)
    return False


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    # Tensors read from one safetensors file can start at any 8-byte offset; the int8 kernel's
    # vector loads crash on such memory (seen with torch 2.13), so give them their own allocation.
    return tensor if tensor.data_ptr() % _ALIGNMENT == 0 else tensor.clone()


def prepare_cpu(tensors: dict[str, torch.Tensor], fmt: FormatSpec) -> dict[str, torch.Tensor]:
    """Canonical tensors -> the tensors the CPU kernel reads (int4: weight relaid out once)."""
    prepared = {name: _aligned(tensor) for name, tensor in tensors.items()}
    if fmt.bits == 4:
        from mpq.packing import unpack_int4_u8

        unpacked = unpack_int4_u8(prepared["qweight"]).to(torch.int32)
        prepared["qweight"] = torch._convert_weight_to_int4pack_for_cpu(unpacked, 1)
        if fmt.group_size is None:  # per-channel: the row's scale (and zero) for each kernel group
            repeat = unpacked.shape[1] // kernel_group(fmt, unpacked.shape[1])
            for name in ("scales", "zeros"):
                if name in prepared:
                    prepared[name] = prepared[name].repeat_interleave(repeat, dim=1)
        if "zeros" in prepared:
            # Scales and zeros become the kernel's [K/G, N, 2] table once (same bytes): building it
            # per call cost 100 of 400 us at M = 1 on a 4096x4096 layer. Symmetric layers have no
            # zeros to trade, so they build it per call rather than hold 2 bytes a group more.
            prepared["scale_zeros"] = _int4_scale_and_zeros(prepared)
            del prepared["scales"], prepared["zeros"]
    return prepared


def _int4_scale_and_zeros(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    # The kernel computes w = (q - 8) * s + zf; ours is w = (q - z) * s, so zf = (8 - z) * s.
    scales = tensors["scales"]
    zeros = tensors.get("zeros")
    offset = torch.zeros_like(scales) if zeros is None else (8 - zeros) * scales
    return torch.stack([scales.t(), offset.t()], dim=-1).contiguous()


def _int4_dequantised(q: torch.Tensor, prepared: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> torch.Tensor:
    """Integer values q [len(rows), K] (float32) of an int4 weight's `rows`, dequantised in place as the
    kernel does: w = (q - 8) s + zf, per kernel group."""
    m, k = q.shape
    if "scale_zeros" in prepared:
        pairs = prepared["scale_zeros"][:, rows].float()  # [K/G, rows, 2]
        scales, offsets = pairs[..., 0].t(), pairs[..., 1].t()
    else:
        scales, offsets = prepared["scales"][rows].float(), None
    grouped = q.view(m, scales.shape[1], k // scales.shape[1])
    grouped.sub_(8).mul_(scales[..., None])
    if offsets is not None:
        grouped.add_(offsets[..., None])
    return q


def dequantize_rows_cpu(prepared: dict[str, torch.Tensor], fmt: FormatSpec, ids: torch.Tensor,
                        out_features: int, in_features: int) -> torch.Tensor:
    """Float32 rows `ids` [len(ids), K] of an int4 weight held in the CPU kernel's own tensors
    (prepare_cpu), dequantised as the kernel does: w = (q - 8) s + zf."""
    q = int4_rows(prepared["qweight"], ids, out_features, in_features).float()
    return _int4_dequantised(q, prepared, ids)


def dequantize_span_cpu(prepared: dict[str, torch.Tensor], fmt: FormatSpec, start: int, stop: int,
                        out_features: int, in_features: int) -> torch.Tensor:
    """Float32 rows start..stop [stop - start, K] of an int8 or int4 weight held in the CPU kernel's
    own tensors; `start` a multiple of SPAN_ALIGNMENT."""
    if fmt.bits == 8:
        return prepared["qweight"][start:stop].float().mul_(prepared["scales"][start:stop, None].float())
    q = int4_row_span_float(prepared["qweight"], start, stop, out_features, in_features)
    return _int4_dequantised(q, prepared, slice(start, stop))


# From how many tokens (rows of x) a layer multiplies in float32 rather than call torch's kernel,
# per bit width: where the two cross depends on the CPU. On a 2-core AVX2 EPYC (benchmarks/
# cpu_kernels.py) from 64 (INT8) and 128 (INT4) tokens, for layers of 256 to 4096 x 4096; on a
# 2-core AVX-512 one torch's kernels won at every size up to 2048 tokens but one, and the tiles
# made an INT4 demo's evaluation 0.76x as fast. So it is measured on the machine, once
# (kernels/cpu_thresholds.py), unless MPQ_CPU_TILES pins it; filled on first use.
FLOAT32_FROM_TOKENS: dict[int, int] = {}


def float32_from_tokens(bits: int) -> int:
    """The token count from which an INT`bits` layer takes float32 tiles on this CPU (NEVER: none)."""
    if bits not in FLOAT32_FROM_TOKENS:
        from mpq.kernels.cpu_thresholds import thresholds

        for width, tokens in thresholds().items():
            FLOAT32_FROM_TOKENS.setdefault(width, tokens)
    return FLOAT32_FROM_TOKENS[bits]


def multiplies_in_float32(fmt: FormatSpec, tokens: int) -> bool:
    """Whether linear_cpu runs `tokens` rows of x as a float32 matmul over dequantised tiles. Not for
    INT4 under a torch whose CPU layout mpq cannot read (then the kernel serves every M)."""
    return tokens >= float32_from_tokens(fmt.bits) and (fmt.bits == 8 or int4_row_layout() is not None)


def linear_in_float32_tiles(xf: torch.Tensor, rows_of: Callable[[int, int], torch.Tensor], out_features: int,
                            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """xf @ W^T (+ bias) for a float32 xf [M, K], with W's rows start..stop given in float32 by
    `rows_of(start, stop)`, one tile of at most TILE_ELEMENTS weights (a whole number of int4
    blocks) at a time, so a big layer is never held in float32 whole; the output in `out_dtype`."""
    k = xf.shape[-1]
    rows = max(SPAN_ALIGNMENT, TILE_ELEMENTS // k // SPAN_ALIGNMENT * SPAN_ALIGNMENT)
    y = torch.empty(xf.shape[0], out_features, dtype=out_dtype)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        y[:, start:stop] = F.linear(xf, rows_of(start, stop), None if bias is None else bias[start:stop].float())
    return y


# A 16-bit dense layer on a CPU where torch has no GEMM in its dtype (mpq.cpu_matmul.routes): from
# this many tokens a float32 matmul over tiles of its weight beats torch's generic 16-bit loop
# (1.25 to 1.8x at 16 tokens, 5.4 to 6.7x from 512, bf16 on a 2-core AVX2 EPYC:
# benchmarks/cpu_kernels.py); at one token converting the weight costs more than the loop saves.
DENSE_FLOAT32_FROM_TOKENS = 16


def linear_dense_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear of a 16-bit x and weight on a CPU without a GEMM in their dtype: float32 tiles from
    DENSE_FLOAT32_FROM_TOKENS tokens (the same arithmetic: products and sums in float32, one rounding)."""
    if x.shape[0] < DENSE_FLOAT32_FROM_TOKENS:
        return F.linear(x, weight, bias)
    return linear_in_float32_tiles(x.float(), lambda start, stop: weight[start:stop].float(), weight.shape[0], bias, x.dtype)


def linear_cpu(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: FormatSpec,
               bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a 2-D x, through torch's CPU kernel for the format, or for many
    tokens a float32 matmul over dequantised tiles of the same tensors (faster there)."""
    if multiplies_in_float32(fmt, x.shape[0]):
        return linear_cpu_tiles(x, prepared, fmt, bias)
    return linear_cpu_kernel(x, prepared, fmt, bias)


def linear_cpu_tiles(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: FormatSpec,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """linear_cpu's float32 path: tiles of the kernel's tensors dequantised, bf16-rounded x."""
    k = x.shape[-1]
    out_features = prepared["qweight"].shape[0] if fmt.bits == 8 else prepared["qweight"].numel() * 2 // k
    y = linear_in_float32_tiles(x.to(ACT_DTYPE).float(),  # the kernels' bf16 activations
                                lambda start, stop: dequantize_span_cpu(prepared, fmt, start, stop, out_features, k),
                                out_features, bias, ACT_DTYPE)
    return y.to(x.dtype)


def linear_cpu_kernel(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: FormatSpec,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """linear_cpu's kernel path: torch's weight-only kernel, bf16 activations."""
    xb = x.to(ACT_DTYPE).contiguous()
    if fmt.bits == 8:
        y = torch._weight_int8pack_mm(xb, prepared["qweight"], prepared["scales"])
    else:
        scale_zeros = prepared["scale_zeros"] if "scale_zeros" in prepared else _int4_scale_and_zeros(prepared)
        y = torch._weight_int4pack_mm_for_cpu(xb, prepared["qweight"], kernel_group(fmt, x.shape[-1]), scale_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)
