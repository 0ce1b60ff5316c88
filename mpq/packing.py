"""Bit packing: two 4-bit values per byte, low nibble first (even input index in the low nibble)."""

from __future__ import annotations

import torch


def pack_int4_u8(values: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 -> [N, K/2] uint8."""
    if values.shape[-1] % 2:
        raise ValueError(f"pack_int4_u8 needs an even last dimension, got {tuple(values.shape)}")
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_int4_u8(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 in 0..15."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)
