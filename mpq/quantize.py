"""Round-to-nearest weight quantisers producing the canonical packed tensors of each format.

Canonical tensors (what checkpoints hold, whatever kernel runs them):
- fp16:  weight  [N, K] in the model's 16-bit dtype (bf16 for bf16 models, else fp16)
- int8:  qweight [N, K] int8, scales [N] bf16;                w = q * s
- int4:  qweight [N, K/2] uint8 (two per byte), scales [N, K/g] bf16 (g = K per-channel),
         zeros [N, K/g] bf16 holding integer zero points (asymmetric only);
         w = (q - z) * s, with z = 8 for symmetric
Scales are rounded to bf16 before the integers are computed, so the integers fit the stored scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.formats import INT8, FormatSpec
from mpq.packing import pack_int4_u8, unpack_int4_u8

SCALE_DTYPE = torch.bfloat16
_TINY = 1e-8


def sixteen_bit_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """FP16 format keeps bf16 for bf16 models and uses fp16 otherwise."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def _rounded_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp_min(_TINY).to(SCALE_DTYPE)


@dataclass
class Grid:
    """The quantisation grid of one weight: w ~ (q - zero) * scale, q in [low, high], with one scale
    (and zero) per output row (int8) or per row and group of `group` input columns (int4)."""

    scales: torch.Tensor  # [N] or [N, K/g], bf16 (what is stored)
    zeros: torch.Tensor  # same shape, float32 integers (0 for int8, 8 for symmetric int4)
    low: int
    high: int
    group: int  # columns per scale (K for per-channel)

    def columns(self, cols: torch.Tensor | slice | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero of each row for the given input columns: [N, c] float32 each."""
        index = torch.arange(self.group * self.scales.reshape(self.scales.shape[0], -1).shape[1],
                             device=self.scales.device)[cols] // self.group
        scales = self.scales.float().reshape(self.scales.shape[0], -1)[:, index]
        zeros = self.zeros.reshape(self.zeros.shape[0], -1)[:, index]
        return scales, zeros

    def integers(self, w: torch.Tensor, cols: torch.Tensor | slice | int = slice(None)) -> torch.Tensor:
        """The grid's integers nearest to columns `cols` of a float32 weight slice w [N, c]."""
        scales, zeros = self.columns(cols)
        return (torch.round(w / scales) + zeros).clamp(self.low, self.high)

    def snap(self, w: torch.Tensor, cols: torch.Tensor | slice | int = slice(None)) -> torch.Tensor:
        """w rounded to the grid (quantise then dequantise), float32."""
        scales, zeros = self.columns(cols)
        return (self.integers(w, cols) - zeros) * scales


def grid_for(weight: torch.Tensor, fmt: FormatSpec, clip: torch.Tensor | float = 1.0) -> Grid:
    """The round-to-nearest grid of a weight: scales (and zeros) from each row's or group's range,
    shrunk by `clip` (a ratio <= 1, one per row or per row and group) where a method clips it."""
    n, k = weight.shape
    if not fmt.supports(n, k) or not fmt.quantized:
        raise ValueError(f"format {fmt.name} does not fit a weight of shape {n}x{k}")
    w = weight.detach().float()
    if fmt.bits == 8:
        scales = _rounded_scale(w.abs().amax(dim=1) * clip / 127.0)
        return Grid(scales, torch.zeros(n, device=w.device), -128, 127, k)
    g = fmt.group_along(k)
    wg = w.reshape(n, k // g, g)
    if fmt.symmetric:
        scales = _rounded_scale(wg.abs().amax(dim=2) * clip / 7.5)
        return Grid(scales, torch.full(scales.shape, 8.0, device=w.device), 0, 15, g)
    low = wg.amin(dim=2).clamp(max=0.0) * clip
    high = wg.amax(dim=2).clamp(min=0.0) * clip
    scales = _rounded_scale((high - low) / 15.0)
    zeros = torch.round(-low / scales.float()).clamp(0, 15)
    return Grid(scales, zeros, 0, 15, g)


def encode(q: torch.Tensor, grid: Grid, fmt: FormatSpec) -> dict[str, torch.Tensor]:
    """Canonical tensors from the integers q [N, K] of a weight on `grid`."""
    if fmt.bits == 8:
        return {"qweight": q.to(torch.int8).contiguous(), "scales": grid.scales.contiguous()}
    packed = {"qweight": pack_int4_u8(q).contiguous(), "scales": grid.scales.contiguous()}
    if not fmt.symmetric:
        packed["zeros"] = grid.zeros.to(SCALE_DTYPE).contiguous()
    return packed


HOT_TENSORS = ("hot_ids", "hot_qweight", "hot_scales")


def quantize_weight(weight: torch.Tensor, fmt: FormatSpec, clip: torch.Tensor | float = 1.0,
                    hot_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Quantise one [N, K] weight into the canonical tensors of `fmt` (round to nearest), each
    row's (and group's) range shrunk by `clip` where one is given (see grid_for). A "+hot" format
    also takes `hot_ids`, the rows (distinct, min(K, N) of them) held at int8 besides."""
    n, k = weight.shape
    if not fmt.supports(n, k):
        raise ValueError(f"format {fmt.name} does not fit a weight of shape {n}x{k}")
    if fmt.hot_rows:
        return _with_hot_rows(weight, fmt, clip, hot_ids)
    if fmt.bits == 16:
        return {"weight": weight.detach().to(sixteen_bit_dtype(weight.dtype)).contiguous()}
    grid = grid_for(weight, fmt, clip)
    return encode(grid.integers(weight.detach().float()), grid, fmt)


def _with_hot_rows(weight: torch.Tensor, fmt: FormatSpec, clip: torch.Tensor | float,
                   hot_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    n = weight.shape[0]
    count = min(fmt.hot_rows, n)
    if hot_ids is None or hot_ids.numel() != count or torch.unique(hot_ids).numel() != count:
        raise ValueError(f"format {fmt.name} of a {n}-row table needs {count} distinct hot row ids "
                         f"(mpq.hot_rows picks them from calibration text)")
    ids = torch.sort(hot_ids.to(torch.int64)).values
    if ids[0] < 0 or ids[-1] >= n:
        raise ValueError(f"hot row ids of format {fmt.name} must lie in [0, {n})")
    hot = quantize_weight(weight.detach().index_select(0, ids), INT8)
    return {**quantize_weight(weight, fmt.base, clip), "hot_ids": ids.to(torch.int32).contiguous(),
            "hot_qweight": hot["qweight"], "hot_scales": hot["scales"]}


def dequantize_weight(tensors: dict[str, torch.Tensor], fmt: FormatSpec) -> torch.Tensor:
    """The float32 weight that the canonical tensors stand for (the reference every kernel matches),
    AWQ's input scale folded back in where there is one."""
    if fmt.hot_rows:
        weight = dequantize_weight({name: t for name, t in tensors.items() if name not in HOT_TENSORS}, fmt.base)
        weight[tensors["hot_ids"].long()] = tensors["hot_qweight"].float() * tensors["hot_scales"].float()[:, None]
        return weight
    if "input_scale" in tensors:  # the stored weight is W s; the input is multiplied by 1/s
        rest = {name: t for name, t in tensors.items() if name != "input_scale"}
        return dequantize_weight(rest, fmt) * tensors["input_scale"].float()[None, :]
    if fmt.bits == 16:
        return tensors["weight"].float()
    if fmt.bits == 8:
        return tensors["qweight"].float() * tensors["scales"].float()[:, None]
    q = unpack_int4_u8(tensors["qweight"]).float()
    n, k = q.shape
    g = fmt.group_along(k)
    scales = tensors["scales"].float()
    zeros = tensors["zeros"].float() if "zeros" in tensors else torch.full_like(scales, 8.0)
    w = (q.reshape(n, k // g, g) - zeros[..., None]) * scales[..., None]
    return w.reshape(n, k)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
