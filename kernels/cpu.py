"""torch's weight-only CPU kernels: `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`.

Both run with bf16 activations, where they beat an fp32 matmul several-fold; inputs of other
dtypes are cast to bf16 and the output cast back. The int4 kernel needs its own weight layout
(`_convert_weight_to_int4pack_for_cpu`, same bytes as ours), made once when the layer is built.
"""

from __future__ import annotations

import torch

from mpq.formats import FormatSpec

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


def linear_cpu(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: FormatSpec,
               bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a 2-D x, through torch's CPU kernel for the format."""
    xb = x.to(ACT_DTYPE).contiguous()
    if fmt.bits == 8:
        y = torch._weight_int8pack_mm(xb, prepared["qweight"], prepared["scales"])
    else:
        scale_zeros = prepared["scale_zeros"] if "scale_zeros" in prepared else _int4_scale_and_zeros(prepared)
        y = torch._weight_int4pack_mm_for_cpu(xb, prepared["qweight"], kernel_group(fmt, x.shape[-1]), scale_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)
