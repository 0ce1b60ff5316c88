"""How a W4A16 layer's scales and zero points lie, and how the kernel's K loops read them.

A Triton layer keeps them column-major, each bf16 zero point right after its scale, so a column's
pair is one 32-bit word (ZEROS_PAIRED; mpq.qlinear.scale_zero_pairs lays it out): a thread's share
is then 4 bytes even at one column a thread, enough for Triton's pipeline to copy it ahead with
the weights (cp.async) instead of a plain load each pass waits on. Symmetric layers have no zero
points (the kernel takes 8); stacks of experts keep them row-major and apart. zeros_layout tells
the launcher which of these it holds, scales_key puts that in the tuner's key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


ZEROS_PAIRED = tl.constexpr(2)  # HAS_ZEROS when each zero point lies right after its scale (scale_zero_pairs)


@triton.jit
def group_scale_zero(s_ptr, z_ptr, offs_n, mask_n, stride_sn, stride_sg, group, HAS_ZEROS: tl.constexpr):
    """The scale and zero point (8 when symmetric, HAS_ZEROS 0) of one group for the tile's columns,
    in fp32 (or, with offs_n [1, N] and group [S, 1], of S groups: turned_word_dots' steps side by
    side). ZEROS_PAIRED: each column's bf16 scale and zero point are one 32-bit word (the scale in
    its low half), loaded at once, so a thread's share is 4 bytes even at one column a thread:
    what Triton's pipeline needs to copy it ahead with the weights (cp.async) instead of a plain
    load the pass then waits on; bf16 becomes fp32 by a shift. mask_n None: columns known in range."""
    if HAS_ZEROS == ZEROS_PAIRED:
        pair = load_masked(s_ptr.to(tl.pointer_type(tl.int32)) + offs_n * (stride_sn // 2) + group * (stride_sg // 2),
                           mask_n)
        scale, zero = scale_zero_of_pairs(pair)
    else:
        scale = load_masked(s_ptr + offs_n * stride_sn + group * stride_sg, mask_n).to(tl.float32)
        if HAS_ZEROS:
            zero = load_masked(z_ptr + offs_n * stride_sn + group * stride_sg, mask_n).to(tl.float32)
        else:
            zero = tl.full(scale.shape, 8.0, tl.float32)
    return scale, zero


@triton.jit
def pairs_loaded_twice(s_ptr, columns, stride_sg, group):
    """group_scale_zero for ZEROS_PAIRED (zero point after scale, stride_sn 2, which zeros_layout
    checks) with every word loaded twice, as [columns, 2]. Triton 3.6 takes a load of fewer values
    than its program has threads for cheap to load again, and lays it out as its use wants: for the
    turned tiles' 128 columns on 8 warps, a slice of the MMA's first operand that gives each warp 32
    columns on every lane, so each thread copied 32 words a step (37 cp.async a step, against 6 with
    3.9, and 189 registers: one program an SM). Loaded twice the load is as large as the program and
    keeps its own layout, one 4-byte copy a thread (kernels_compile.py: 302 -> 245 instructions a
    step, 189 -> 125 registers with 3.6; 252 -> 246 with 3.9)."""
    twice = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + columns[:, None] + group * (stride_sg // 2)
                    + tl.zeros((1, 2), tl.int32))
    pair, same_pair = tl.split(twice)  # a name for each: a loop-carried `_` would change type
    return scale_zero_of_pairs(pair)


@triton.jit
def scale_zero_of_pairs(pair):
    """The fp32 scale (low half) and zero point (high half) of ZEROS_PAIRED words: bf16 to fp32 by a shift."""
    return (pair << 16).to(tl.float32, bitcast=True), ((pair >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def load_masked(pointers, mask):
    """tl.load with 0 where the mask is off, or of every pointer where the mask is None."""
    if mask is None:
        values = tl.load(pointers)
    else:
        values = tl.load(pointers, mask=mask, other=0)
    return values


def zeros_layout(scales: torch.Tensor, zeros: torch.Tensor | None, strides: tuple[int, ...] | None = None) -> int:
    """The kernel's HAS_ZEROS: 0 symmetric; ZEROS_PAIRED where each bf16 zero point lies right after
    its scale, pairs of adjacent columns adjacent and the first pair 4-byte aligned (mpq.qlinear.
    scale_zero_pairs), read as one int32 a column; else 1 (zeros read apart, through the same strides).
    `strides`: the scales', where the caller has read them (this runs on every launch)."""
    if zeros is None:
        return 0
    strides, start = strides or scales.stride(), scales.data_ptr()  # each read once
    paired = (scales.dtype == zeros.dtype == torch.bfloat16 and strides[-2] == 2 and strides[-1] % 2 == 0
              and zeros.data_ptr() == start + 2 and start % 4 == 0)
    return ZEROS_PAIRED.value if paired else 1


def scales_key(k: int, group_size: int, scale_strides: tuple[int, ...], has_zeros: int) -> tuple:
    """The part of a tuner key that says how a layer's scales and zeros lie (zeros_layout's HAS_ZEROS,
    and whether the scales, of these strides, run column-major): the K loop loads them differently
    (pipelined pairs or plain loads), so a config timed on one layout is not the choice for another."""
    return k, group_size, has_zeros, "by column" if scale_strides[-1] > scale_strides[-2] else "by row"
