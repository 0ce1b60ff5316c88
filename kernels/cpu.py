"""torch's weight-only CPU kernels: `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`.

Both run with bf16 activations, where they beat an fp32 matmul several-fold; inputs of other
dtypes are cast to bf16 and the output cast back. The int4 kernel needs its own weight layout
(`_convert_weight_to_int4pack_for_cpu`, same bytes as ours), made once when the layer is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Int4RowLayout:
    """How `_convert_weight_to_int4pack_for_cpu` lays out a weight's rows. It is torch's private
    layout and depends on the CPU torch runs on (its int4mm_kernel.cpp): rows go in blocks of
    `block` (64 under AVX512, 32 under AVX2); in a full block, byte (k, j) holds row j's value at k
    in its low nibble and row j + block/2's in its high one where `split` (the vector builds), row
    j + 1's otherwise; a last, shorter block always pairs rows j and j + 1 in byte (k, j / 2)."""

    block: int
    split: bool


_INT4_LAYOUTS = tuple(Int4RowLayout(block, split) for block in (64, 32, 16) for split in (True, False))


@functools.cache
def int4_row_layout() -> Int4RowLayout | None:
    """The layout this process's torch packs int4 weights in, found once by packing a probe and
    reading it back under each known layout; None if none reads it right (a torch that changed it)."""
    rows, cols = 144, 4  # two full blocks of 64 and a shorter last one: every known layout reads it differently
    values = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
    except (AttributeError, RuntimeError):
        return None
    if packed.numel() != rows * cols // 2:
        return None
    ids = torch.arange(rows)
    return next((layout for layout in _INT4_LAYOUTS
                 if torch.equal(_int4_rows_in(layout, packed, ids, rows, cols), values.long())), None)


def _int4_rows_in(layout: Int4RowLayout, packed: torch.Tensor, ids: torch.Tensor, out_features: int,
                  in_features: int) -> torch.Tensor:
    n, k = out_features, in_features
    start = ids // layout.block * layout.block
    block = (n - start).clamp(max=layout.block)
    j = ids - start
    split = (block == layout.block) & layout.split
    half = block // 2
    within = torch.where(split, j % half, j // 2)
    shift = torch.where(split, (j >= half).long(), j % 2) * 4
    cols = torch.arange(k, device=packed.device)
    offsets = (start * k // 2 + within)[:, None] + cols[None, :] * half[:, None]
    return (packed.reshape(-1)[offsets].long() >> shift[:, None]) & 0xF


def int4_rows(packed: torch.Tensor, ids: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Rows `ids` of a weight relaid out by `_convert_weight_to_int4pack_for_cpu`, as integers
    0..15 [len(ids), K] (what a tied embedding table looks up in its head). Callers check
    int4_row_layout() is not None first, and the rows against the canonical weight before trusting them."""
    layout = int4_row_layout()
    if layout is None:
        raise RuntimeError("this torch's CPU int4 layout is none that mpq knows how to read rows from")
    return _int4_rows_in(layout, packed, ids, out_features, in_features)


def dequantize_rows_cpu(prepared: dict[str, torch.Tensor], fmt: FormatSpec, ids: torch.Tensor,
                        out_features: int, in_features: int) -> torch.Tensor:
    """Float32 rows `ids` [len(ids), K] of an int4 weight held in the CPU kernel's own tensors
    (prepare_cpu), dequantised as the kernel does: w = (q - 8) s + zf."""
    q = int4_rows(prepared["qweight"], ids, out_features, in_features).float()
    group = kernel_group(fmt, in_features)
    m = len(ids)
    if "scale_zeros" in prepared:
        pairs = prepared["scale_zeros"].index_select(1, ids).float()  # [K/G, rows, 2]
        scales, offsets = pairs[..., 0].t(), pairs[..., 1].t()
    else:
        scales = prepared["scales"].index_select(0, ids).float()
        offsets = torch.zeros_like(scales)
    w = (q.reshape(m, -1, group) - 8) * scales[..., None] + offsets[..., None]
    return w.reshape(m, in_features)


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
