"""How torch lays out an int4 weight for its CPU kernel (`_convert_weight_to_int4pack_for_cpu`),
and how to read rows back from that layout without a second copy of the weight in mpq's own."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


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


SPAN_ALIGNMENT = 64  # a span starts on a block boundary of every known layout (blocks of 64, 32, 16)


def int4_row_span_float(packed: torch.Tensor, start: int, stop: int, out_features: int,
                        in_features: int) -> torch.Tensor:
    """Rows start..stop of a weight relaid out by `_convert_weight_to_int4pack_for_cpu`, as float32
    integers 0..15 [stop - start, K]. Where int4_rows gathers each value, this reads whole blocks
    (a block is [K, block/2] bytes), several times faster: what a whole-layer dequantisation needs.
    `start` and `stop` are multiples of SPAN_ALIGNMENT (or `stop` the last row), so the span holds
    whole blocks; callers check int4_row_layout() is not None first."""
    layout = int4_row_layout()
    if layout is None:
        raise RuntimeError("this torch's CPU int4 layout is none that mpq knows how to read rows from")
    if start % SPAN_ALIGNMENT or (stop % SPAN_ALIGNMENT and stop != out_features) or not 0 <= start < stop <= out_features:
        raise ValueError(f"rows {start}..{stop} of {out_features} are not whole blocks of {SPAN_ALIGNMENT}")
    k, block, half = in_features, layout.block, layout.block // 2
    flat = packed.reshape(-1)
    out = torch.empty(stop - start, k)
    full_stop = max(start, min(stop, out_features // block * block))
    if full_stop > start:
        blocks = (full_stop - start) // block
        pairs = flat[start * k // 2: full_stop * k // 2].view(blocks, k, half).transpose(1, 2)  # [blocks, half, K]
        rows = out[: full_stop - start].view(blocks, block, k)
        # split: low nibbles are the block's first half of rows, high ones its second; else j, j + 1
        low, high = (rows[:, :half], rows[:, half:]) if layout.split else (rows[:, 0::2], rows[:, 1::2])
        low.copy_(pairs & 0xF)
        high.copy_(pairs >> 4)
    if stop > full_stop:  # the last, shorter block pairs rows j and j + 1
        tail = stop - full_stop
        pairs = flat[full_stop * k // 2: stop * k // 2].view(k, tail // 2).t()  # [tail/2, K]
        rows = out[full_stop - start:]
        rows[0::2].copy_(pairs & 0xF)
        rows[1::2].copy_(pairs >> 4)
    return out
