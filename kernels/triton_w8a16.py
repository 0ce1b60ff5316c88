"""W8A16: INT8 per-output-channel symmetric weights, fp16/bf16 activations, fp32 accumulation.

Weights: qweight int8 [N, K], scales [N] bf16; w[n, k] = q[n, k] * s[n]. The scale is per
column of the output, so it is applied once to the accumulator, after the K loop.
Same two regimes as W4A16 (split-K gemv for M <= 16, tiled gemm above, upright or turned round:
TRANSPOSED, W x^T); K is masked, since an INT8 layer may have any K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mpq.kernels.triton_common import (accumulator_fits, check_activation, check_grouped_config, check_stacks, decode_candidates,
                                       dense_route_fits, few_warp_tiles, grouped_candidates, grouped_row, interpreter_config,
                                       interpreting, launch, launch_dependents, prefetch_then_wait, prefill_candidates,
                                       PDL_PREFETCH_PASSES, regime, store_tile, tile_offsets, turned_prefill_candidates)
from mpq.kernels.triton_dequant import dequantize_int8


def tuner_space(m: int) -> list[dict]:
    """As W4A16's (triton_w4a16_configs.tuner_space): decode_candidates for M <= 16, prefill_candidates above."""
    if regime(m) == "gemv":
        return [c for c in decode_space(m) if c["BLOCK_M"] > 1 or accumulator_fits(c)]
    # and turned round (TRANSPOSED, out^T = W x^T; triton_w4a16.turned_tiles has the why): the converted
    # weights from registers keep the warpgroup MMA in flight while the next step is converted, where the
    # upright tiles wait for each (kernels_compile.py's mma_in_flight: 3 against 0 with Triton 3.6, 1 against
    # 0 with 3.9), for more instructions a step (128 x 128 x 64, 8 warps: 260 against 169 with 3.6). K steps
    # of 64 only: the turned tile in K steps of 128 was compiled and reckoned for INT4 alone.
    return prefill_candidates(m, [64, 128]) + turned_prefill_candidates(m, [64])


# 16-row tiles on one warp (32 and 64 columns) and on two (128): 3.2-3.6 instructions per weight
# byte, against 4.5-5.5 for the 4-warp tiles run 2 chose at M = 1 (few_warp_tiles)
FEW_WARP_TILES = ((32, 128, 1), (64, 128, 1), (32, 256, 1), (128, 128, 2))


def decode_space(m: int) -> list[dict]:
    """Decode's configs before those whose single-row accumulator would spill are dropped (accumulator_fits)."""
    return decode_candidates(m, [128, 256], 128) + few_warp_tiles(FEW_WARP_TILES)


def grouped_space() -> list[dict]:
    """A stack of experts' configs (grouped_candidates), single rows that fit their registers (accumulator_fits)."""
    return grouped_candidates([64, 128, 256], accumulator_fits)


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, slot_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_we, stride_se, stride_om, sums_ptr, counts_ptr,
                  ATOMIC: tl.constexpr, DOT_DTYPE: tl.constexpr, GROUPED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  PDL: tl.constexpr = False, TRANSPOSED: tl.constexpr = False):
    pid_k = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    if GROUPED:  # experts stacked [E, ...]; row m of x (offs_m, BLOCK_M = 1) runs through expert slot_ptr[m]
        pair, offs_m, offs_n, mask_n, expert = grouped_row(slot_ptr, M, N, BLOCK_N)
        w_ptr += expert * stride_we
        s_ptr += expert * stride_se
    else:
        offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
        mask_n = offs_n < N
        if PDL:  # a program reads BLOCK_K bytes of each of its columns a pass
            prefetch_then_wait(w_ptr, offs_n, mask_n, stride_wn, K, pid_k * BLOCK_K, BLOCK_K * SPLIT_K, BLOCK_K,
                               PDL_PREFETCH_PASSES)
    mask_m = offs_m < M
    if BLOCK_M == 1:
        # The scale is per output channel, so the products can pile up per (k, n) over the whole
        # K loop and be summed across threads once at the end, not once per K step.
        acc_k = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    elif TRANSPOSED:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T = W x^T: see below
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        mask_k = (k0 + offs_k) < K
        if TRANSPOSED:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0)  # [BLOCK_N, BLOCK_K] bytes of int8
        else:
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BLOCK_K, BLOCK_N] bytes of int8
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BLOCK_M == 1:
            # int8 to float without a conversion instruction: the byte read unsigned with its top
            # bit flipped is q + 128; XOR-ing both into the mantissa of 2^23 gives 2^23 + q + 128.
            biased = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True)
            acc_k += x.to(tl.float32).reshape(BLOCK_K, 1) * (biased - 8388736.0)
        elif TRANSPOSED:
            # Prefill turned round (triton_w4a16.turned_tiles has the why): the converted weights are the
            # warpgroup MMA's first operand, from registers, x^T its second, from the pipeline's buffers,
            # so the MMA stays in flight while the next step's bytes are converted; upright, the converted
            # weights go to shared memory each step and every MMA is waited for.
            acc = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), acc=acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc=acc, out_dtype=tl.float32)
    if BLOCK_M == 1:
        acc = tl.sum(acc_k, axis=0)[None, :]
    elif TRANSPOSED:
        acc = tl.trans(acc)
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if PDL:
        launch_dependents()
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, sums_ptr, counts_ptr, ATOMIC, SPLIT_K)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """y = x @ (q * s)^T (+ bias) for a 2-D x. `config` pins the tile sizes (tests, interpreter)."""
    out = _launch(x, qweight, scales, config)
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def w8a16_grouped(x: torch.Tensor, slots: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  config: dict | None = None) -> torch.Tensor:
    """y[p] = x[p] @ (q * s)[slots[p]]^T for every row p of x in one launch, as w4a16_grouped:
    qweight [E, N, K], scales [E, N]; slot -1: another stack's expert, row of y 0."""
    check_stacks(x, slots, (qweight, scales))
    return _launch(x, qweight, scales, config, slots)


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, config: dict | None,
            slots: torch.Tensor | None = None) -> torch.Tensor:
    """One launch: of one layer, or (slots given) of stacked experts, whose leading dimension goes."""
    n, k = qweight.shape[-2:]
    check_activation(x, k)
    if scales.shape[-1:] != (n,) or scales.dim() != qweight.dim() - 1:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a {n}x{k} weight (one per output channel)")
    x = x.contiguous()
    if config is None and interpreting():
        config = interpreter_config(x.shape[0], 64, grouped=slots is not None)
    check_grouped_config(config, slots)
    expert_strides = (0, 0) if slots is None else (qweight.stride(0), scales.stride(0))
    scalars = (x.shape[0], n, k, x.stride(0), qweight.stride(-2), *expert_strides)
    pointers = (qweight, scales, scales if slots is None else slots)  # one layer: the slots pointer goes unused
    shape_key = (k,) if slots is None else (k, "grouped", qweight.shape[0])
    candidates = (lambda: tuner_space(x.shape[0])) if slots is None else grouped_space
    # prefill's dense route, timed beside the fused configs (kernels/triton_dequant.py)
    dense = (lambda: F.linear(x, dequantize_int8(qweight, scales, x.dtype))) if slots is None and dense_route_fits(x, n, k) else None
    return launch(_w8a16_kernel, x, n, pointers, scalars, {"GROUPED": slots is not None}, config, shape_key=shape_key,
                  candidates=candidates, dense=dense)
