"""Round-to-nearest weight quantisers producing the canonical packed tensors of each format.

Canonical tensors (what checkpoints hold, whatever kernel runs them):
- fp16:  weight  [N, K] in the model's 16-bit dtype (bf16 for bf16 models, else fp16)
- int8:  qweight [N, K] int8, scales [N] bf16;                w = q * s
- int4:  qweight [N, K/2] uint8 (two per byte), scales [N, K/g] bf16,
         zeros [N, K/g] bf16 holding integer zero points (asymmetric only);
         w = (q - z) * s, with z = 8 for symmetric
Scales are rounded to bf16 before the integers are computed, so the integers fit the stored scale.
"""

from __future__ import annotations

import torch

from mpq.formats import FormatSpec
from mpq.packing import pack_int4_u8, unpack_int4_u8

SCALE_DTYPE = torch.bfloat16
_TINY = 1e-8


def sixteen_bit_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """FP16 format keeps bf16 for bf16 models and uses fp16 otherwise."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def _rounded_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp_min(_TINY).to(SCALE_DTYPE)


def quantize_weight(weight: torch.Tensor, fmt: FormatSpec) -> dict[str, torch.Tensor]:
    """Quantise one [N, K] weight into the canonical tensors of `fmt` (round to nearest)."""
    n, k = weight.shape
    if not fmt.supports(n, k):
        raise ValueError(f"format {fmt.name} does not fit a weight of shape {n}x{k}")
    if fmt.bits == 16:
        return {"weight": weight.detach().to(sixteen_bit_dtype(weight.dtype)).contiguous()}
    w = weight.detach().float()
    if fmt.bits == 8:
        scales = _rounded_scale(w.abs().amax(dim=1) / 127.0)
        q = torch.round(w / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
        return {"qweight": q.contiguous(), "scales": scales.contiguous()}
    g = fmt.group_size
    wg = w.reshape(n, k // g, g)
    if fmt.symmetric:
        scales = _rounded_scale(wg.abs().amax(dim=2) / 7.5)
        q = torch.round(wg / scales.float()[..., None]).clamp(-8, 7) + 8
        return {"qweight": pack_int4_u8(q.reshape(n, k)).contiguous(), "scales": scales.contiguous()}
    low = wg.amin(dim=2).clamp(max=0.0)
    high = wg.amax(dim=2).clamp(min=0.0)
    scales = _rounded_scale((high - low) / 15.0)
    zeros = torch.round(-low / scales.float()).clamp(0, 15)
    q = (torch.round(wg / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15)
    return {
        "qweight": pack_int4_u8(q.reshape(n, k)).contiguous(),
        "scales": scales.contiguous(),
        "zeros": zeros.to(SCALE_DTYPE).contiguous(),
    }


def dequantize_weight(tensors: dict[str, torch.Tensor], fmt: FormatSpec) -> torch.Tensor:
    """The float32 weight that the canonical tensors stand for (the reference every kernel matches)."""
    if fmt.bits == 16:
        return tensors["weight"].float()
    if fmt.bits == 8:
        return tensors["qweight"].float() * tensors["scales"].float()[:, None]
    q = unpack_int4_u8(tensors["qweight"]).float()
    n, k = q.shape
    g = fmt.group_size
    scales = tensors["scales"].float()
    zeros = tensors["zeros"].float() if "zeros" in tensors else torch.full_like(scales, 8.0)
    w = (q.reshape(n, k // g, g) - zeros[..., None]) * scales[..., None]
    return w.reshape(n, k)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
