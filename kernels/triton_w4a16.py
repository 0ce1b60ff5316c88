"""W4A16: INT4 group-wise weights (mpq's canonical packing), fp16/bf16 activations, fp32 accumulation.

Weights: qweight uint8 [N, K/2], two 4-bit values per byte, the even input index in the low
nibble; scales [N, K/G] bf16; zeros [N, K/G] (integer zero points, asymmetric) or none
(symmetric, zero point 8). w[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]. Scales and zeros
are read through both strides (stride_sn, stride_sg), so any layout serves: a Triton layer keeps
them column-major, bf16 zero points each right after its scale (mpq.qlinear.scales_by_column;
group_scale_zero reads the pair as one int32; see word_dots), a stack of experts row-major.

One kernel, two regimes picked by M (kernels/triton_common.regime):
- gemv (M <= 16, memory-bound decode): BLOCK_M = 1 (single_row) reads the weights as int32
  words and multiplies and sums on the FMA units, or BLOCK_M = 16 runs tl.dot (M in 9..16, and
  from M = 1 where no tile turned round serves: turned_serves; word_dots, which reads int32 words
  too, for K steps of 64 and 128, the byte path for groups of 32), or BLOCK_M = 8 runs word_dots
  turned round (TRANSPOSED: W x^T, for M <= 8); split-K spreads the K loop over more programs so the whole
  GPU reads weights at once, partial sums meet through fp32 atomics. Both apply the scale to a
  sum of products, not to each weight.
- gemm (M > 16, prefill): tiled tl.dot over (BLOCK_M, BLOCK_N), split-K up to 128 rows; from K steps
  of 64, word_dots dequantises its pairs two weights an instruction before the dots (word tiles), or
  the tile is turned round (TRANSPOSED: turned_tiles, W x^T, the weights the MMA's operand from registers).
BLOCK_K divides the group size, so each K step reads one scale (and zero) per column and K needs
no mask (K is a multiple of G); except single_row's long steps (long_steps: 2-4 whole groups a step,
dividing K), which read each group's scale and give each word its own.

Decode reads little and must not spend more issue slots per weight byte than the memory system
takes to deliver it (benchmarks/kernels_compile.py counts them): nibbles become floats by bit
tricks instead of conversion instructions (byte_floats on the single-row path, pair_floats and
nibble_floats on the tensor-core decode paths, where the zero point comes off a sum instead of
each weight; for prefill, pair_floats again in word_dots' word tiles and nibbles_minus_zero on
the byte path), 16-bit activations are read as int32 pairs that line up with the packed bytes (single_row, and the byte paths), and word_dots' words
are taken in the order the tensor cores' operands want them (operand_order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mpq.kernels.triton_common import (check_activation, check_grouped_config, check_stacks, decode_candidates,
                                       dense_route_fits, few_warp_tiles, grouped_candidates, grouped_row, interpreter_config,
                                       interpreting, launch, launch_dependents, prefetch_then_wait, prefill_candidates,
                                       PDL_PREFETCH_PASSES, regime, store_tile, tile_offsets, turned_prefill_candidates)
from mpq.kernels.triton_dequant import dequantize_int4


def _candidates(m: int, group: int, k: int) -> list[dict]:
    """A small, deliberate space: decode_space for M <= 16 (less its 16-row tiles where the tiles
    turned round serve: turned_serves), prefill_candidates above (for a layer of K inputs: single_row's
    long steps must divide it)."""
    if regime(m) == "gemv":
        space = decode_space(m, group, k)
        if turned_serves(m, k_steps(group)):
            space = [config for config in space if config["BLOCK_M"] != 16]
        return space
    steps = k_steps(group)
    space = prefill_candidates(m, steps)
    if m > 128 and 64 in steps:
        # 256 rows a tile: twice the multiply-adds of 128 x 128 for the same dequantised weights
        # (word_dots' word tiles: 261 SASS instructions a K step of 64 with 8 warps, against 218 at 128 x 128;
        # no spills). Few tiles in a 4096-wide layer (64 at M = 512): the timer weighs that.
        space += [{"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 8, "num_stages": st}
                  for st in (3, 4)]
    # word tiles (word_dots, the default from K steps of 64) and the byte path they replaced, timed side by side
    space += [{**config, "WORD_DOTS": False} for config in space if runs_word_tiles(config)]
    # and turned round (turned_tiles): the weights as the warpgroup MMA's first operand, from registers, so
    # its MMAs run on while the next K step is dequantised, where every word tile and byte tile waits for
    # each MMA to finish (kernels_compile.py's mma_in_flight: 0 for those, 1 for these with Triton 3.9, 3 with
    # 3.6). 128 x 128 x 64 with 8 warps takes 246 SASS instructions a step with 3.9 against the word tiles'
    # 227 (3.6: 245 against 223; 125 registers, two programs an SM: pairs_loaded_twice). Above 128 rows also
    # in K steps of 128: 424 instructions a step with 3.6 (412 with 3.9) against 2 x 245 for the same work at
    # 64, 7 MMA groups left in flight (3.9: 1), no spills, 189 registers (one program an SM): at the peak issue
    # rate a step issues in about 0.83 of its MMAs' time (~1024 cycles), at 64 in 0.96.
    return space + turned_prefill_candidates(m, steps, square_stages=(3, 4))


def decode_space(m: int, group: int, k: int) -> list[dict]:
    """Every INT4 decode config (M <= 16) for a layer of K inputs, the 16-row tiles included where
    _candidates leaves them out (turned_serves); gpu_decode_space.py sweeps it whole."""
    steps = k_steps(group)
    # Decode steps K by the group's widest step only (128 for groups of 128 and up; a group of 64
    # or 32 has one step anyway). On the H200 the 64-wide steps (32 bytes of a row) lost on every
    # path the tuner runs: in run 2's INT4 M = 1 sweep each path's fastest 64-wide config (single
    # row, loading ahead, 16-row tiles on words or bytes) took 1.09-1.44x its fastest 128-wide one
    # on all three shapes, the best 64-wide of all 1.09-1.16x the fastest config; and all 39 INT4
    # decode rows of runs 1 and 2 (M = 1, 4, 16; demo layers with K = 256 and 768 among them) chose
    # 128 (benchmarks/gpu_decode_space.py --read results/decode-space-NVIDIA_H200.json; the
    # rows' chosen_configs in results/kernels-NVIDIA_H200-*.json).
    steps = steps[-1:]
    space = decode_candidates(m, steps, steps[-1])
    # Wider tensor-core tiles: word_dots' work on the step's activations (splitting and summing
    # them, building the dot's A operand), which every warp does for the whole step, is shared by
    # more columns a warp: 6.3 instructions per weight byte at 256 x 64 against 8.1 at 128 x 64,
    # and in K steps of 128 (operand_order), 5.3 at 256 x 128 with 8 warps (32 columns a warp),
    # 4.5 with 4 and 4.3 at 512 x 128 with 8 (64 a warp; Triton 3.9, kernels_compile.py; 3.6:
    # 5.7, 5.0, 4.8), none spilling. Fewer programs: the timer weighs that against split-K.
    space += [{"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 8 if bk > 64 else 4,
               "num_stages": 3} for bk in steps if bk >= 64 for sk in (1, 2, 4, 8)]
    space += [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": warps, "num_stages": 3}
              for bn, warps in ((256, 4), (512, 8)) if 128 in steps for sk in (1, 2, 4, 8)]
    if m > 1 and 128 in steps and k % 256 == 0:
        # 2 consecutive K steps a pass (STEPS): 128 bytes of each row a pass, where a step reads 64;
        # 5-7% fewer instructions a weight byte (Triton 3.6: 5.60 against 6.00 at 128 x 128 with 4
        # warps, 5.29 against 5.58 at 256 x 128 with 8), no spills, one program an SM fewer at 128
        space += [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": warps, "num_stages": 3,
                   "STEPS": 2} for bn, warps in ((128, 4), (256, 8)) for sk in (1, 2, 4, 8)]
    if m > 8 and 128 in steps:
        # 16-row tiles on one warp (64 columns) or two (128): 5.7 and 5.2 instructions per weight
        # byte against 8.5 and 6.0 on four (Triton 3.6), and on the H200 fewer warps ran faster at
        # every such width (few_warp_tiles). Up to 8 rows the one-warp tiles turned round are leaner.
        space += few_warp_tiles(((64, 128, 1), (128, 128, 2)))
        if k % 256 == 0:  # and two K steps a pass on two warps: 4.96
            space += few_warp_tiles(((128, 128, 2),), STEPS=2)
        # The byte path (WORD_DOTS False) on 4-warp tiles 64 and 128 wide: in run 2's sweep on the H200
        # (M = 1; a 16-row tile's work does not change up to 16 rows) it beat word_dots on the same tiles
        # on all three shapes (64 wide: 15.8 / 35.2 / 34.1 us against 19.0 / 49.7 / 44.4; 128: 15.9 /
        # 35.3 / 37.5 against 17.1 / 36.9 / 40.6) and on 14336 -> 4096 every 16-row word tile (34.1
        # against 38.4), though it issues about 1.5x the instructions a weight byte (Triton 3.6: 12.9 against
        # 8.5 at 64 wide): these tiles wait, and their instruction counts do not say which is faster.
        space += [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3,
                   "WORD_DOTS": False} for bn in (64, 128) for sk in (2, 4, 8)]
    if m <= 8 and 128 in steps:
        # word_dots turned round (TRANSPOSED, turned_word_dots): up to 8 rows of x in a tile of 8
        # (accumulators, multiply-adds and the activations' split halved against a 16-row tile):
        # 3.6 instructions per weight byte at 128 x 128 with one warp against 4.6-4.7 at the leanest
        # 16-row tile (turned_serves); and with 4 warps side by side along K (STACK), 3.9, for fewer
        # programs splitting K over atomics.
        space += [{"BLOCK_M": 8, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": stack, "num_stages": 3,
                   "TRANSPOSED": True, "STACK": stack}
                  for stack, splits in ((1, (1, 2, 4, 8, 16)), (4, (1, 2, 4))) if stack in TURNED_STACKS
                  for bn in (64, 128) for sk in splits]
        # and one warp taking 2 consecutive K steps a pass (STEPS): 128 bytes of each row a pass where
        # a step reads 64 (what STACK 4 does over 4 warps, which Triton 3.6 compiles badly), for
        # 4.1 and 3.5 instructions per weight byte at 64 and 128 wide against 4.3 and 3.6 a step a
        # pass (Triton 3.6 and 3.9), in 8 and 5 programs an SM against 14 and 8
        if 1 in TURNED_STACKS and k % 256 == 0:
            space += [{"BLOCK_M": 8, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": 1, "num_stages": 3,
                       "TRANSPOSED": True, "STACK": 1, "STEPS": 2} for bn in (64, 128) for sk in (1, 2, 4, 8)]
    if m == 1:
        # (No 256-wide single row, which halves each thread's share of a step's activation work
        # against 128 wide: on the H200 it was 1.17-1.34x the fastest config on all three shapes
        # of run 2's sweep, the 128-wide one 1.00-1.04x.)
        # The tile widths the H200 chose at M = 1 (32, 64) and the next, loading a step ahead
        space += [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3,
                   "PREFETCH": True} for bn in (32, 64, 128) for bk in steps for sk in (1, 2, 4, 8)]
        # and in Triton's pipeline (PIPELINE: no plain load left in the loop), in K steps of the group's widest
        space += [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": steps[-1], "SPLIT_K": sk, "num_warps": 4, "num_stages": 3,
                   "PIPELINE": True} for bn in (32, 64, 128) for sk in (1, 2, 4, 8)]
        # Long steps (long_steps): 128-256 bytes of each weight row a step, where every other INT4 path
        # reads 64 (K steps of 128: half a 128-byte line) and INT8, which streamed at 3.2-3.9 TB/s on
        # the H200 against INT4's 1.1-2.2, reads 128-256 (benchmarks/GPU_NOTES.md). Up to 4 groups a
        # step (each group past the first costs two selects a word); 7.6-8.7 instructions per weight
        # byte (Triton 3.6, sm_90), against 9.7 for the 64-wide single row with 64-byte steps.
        space += [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3,
                   **ahead} for bk in (256, 512) if group < bk <= 4 * group and bk % group == 0 and k % bk == 0
                  for bn, ahead in ((32, {}), (64, {}), (32, {"PREFETCH": True})) for sk in (1, 2, 4, 8)]
    return space


def turned_serves(m: int, steps: list[int]) -> bool:
    """Whether the 8-row tiles turned round stand in for every 16-row tensor-core tile at M rows: up
    to 8 rows, where a group holds a K step of 128 and this Triton compiles them (TURNED_STACKS).

    There a turned tile does a 16-row tile's work with half its MMAs (x's rows are the MMA's 8-wide
    side, not 16 of which 8 or more are masked), half its accumulators and half the activations'
    split: 3.6 instructions per weight byte at 8 x 128 x 128 on one warp against 4.6-4.7 for the
    leanest 16-row tile, 512 x 128 on 8 warps, whose loop is the same at M = 1 and 16 (sm_90 with
    Triton 3.6 and 3.9, sm_80 with 3.9: 3.59 against 4.64; kernels_compile.py). On the H200 no
    16-row tile was chosen at M <= 8 once the turned tiles were offered: run 2 took them on all five
    shapes at M = 4 (and on two at M = 1, the single row on three), and its M = 1 sweep put each
    shape's fastest 16-row tile at 1.23-1.31x its fastest config, the fastest turned one at
    1.04-1.09x (results/decode-space-NVIDIA_H200.json, kernels-NVIDIA_H200-*.json). Timing the 16-row tiles
    anyway cost the tuner 24 candidates at M = 1 (112 -> 88 with Triton 3.9) and 36 at M = 2-8 (60 ->
    24), each compiled and timed on every layer shape's first call (benchmarks/first_call.py, 2
    cores: 31.2 -> 24.4 s at M = 1, 24.2 -> 12.5 s at M = 4). The decode-space sweep keeps them
    (decode_space)."""
    return m <= 8 and 128 in steps and bool(TURNED_STACKS)


def _grouped_candidates(group: int) -> list[dict]:
    return grouped_candidates(k_steps(group))


def operand_k_width(version: str = triton.__version__) -> int:
    """How many 16-bit values along K Triton gives a thread of a tl.dot operand on the tensor cores
    at decode tiles: 4 up to Triton 3.7, 2 from 3.8 (word_dots' tiles compiled for sm_90 with 3.4,
    3.6, 3.7, 3.8 and 3.9 by benchmarks/kernels_compile.py: each order takes the shared-memory trip
    of the unpacked pairs away with its versions and not with the others). word_dots orders each
    step's words for it (operand_order); any order gives the same sums."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return 4 if (major, minor) < (3, 8) else 2


K_WIDTH = operand_k_width()  # read once: the launch path must not parse versions


def turned_stacks(version: str = triton.__version__) -> tuple[int, ...]:
    """The STACKs (warps side by side along K) of the 8-row tiles turned round that this Triton
    compiles well for sm_90 (benchmarks/kernels_compile.py): none before 3.6, whose tl.dot refuses
    an 8-wide operand (3.4: "N >= 16"); one warp from 3.6; 4 from 3.7 (3.6 moved the unpacked
    weights of a batched dot through shared memory: 6.1 instructions per weight byte, not 3.9)."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return () if (major, minor) < (3, 6) else (1,) if (major, minor) < (3, 7) else (1, 4)


TURNED_STACKS = turned_stacks()


def runs_word_dots(config: dict) -> bool:
    """Whether a launch config takes word_dots (the kernel's own branch, in Python for the benchmarks
    that name a config's path): tensor-core decode tiles, K steps of 64 or more, not switched off,
    not turned round (turned_word_dots)."""
    return (1 < config["BLOCK_M"] <= 16 and config["BLOCK_K"] >= 64 and config.get("WORD_DOTS", True)
            and not config.get("TRANSPOSED"))


def runs_word_tiles(config: dict) -> bool:
    """Whether a launch config takes word_dots' prefill branch, the word tiles (prefill tiles from K
    steps of 64, not switched off)."""
    return (config["BLOCK_M"] > 16 and config["BLOCK_K"] >= 64 and config.get("WORD_DOTS", True)
            and not config.get("TRANSPOSED"))


def runs_turned_tiles(config: dict) -> bool:
    """Whether a launch config takes prefill turned round (turned_tiles: prefill tiles, TRANSPOSED)."""
    return config["BLOCK_M"] > 16 and bool(config.get("TRANSPOSED"))


def long_steps(config: dict, group: int) -> bool:
    """Whether a config's K step runs over several whole groups: single_row's long steps (BLOCK_M = 1,
    BLOCK_K a multiple of GROUP above it), each word scaled by its own group's scale. Every other
    path takes one group's scale a step, so its BLOCK_K divides the group."""
    return config["BLOCK_M"] == 1 and config["BLOCK_K"] > group and config["BLOCK_K"] % group == 0


def check_k_step(config: dict, group: int, k: int) -> None:
    """A pinned config's K step: it divides the group, or (long_steps) it is whole groups and divides
    K, which then needs no mask: a mask a word would split the 16-byte loads."""
    steps = config.get("STEPS", 1)
    on_path = (config.get("STACK", 1) == 1 and config["BLOCK_M"] <= 16 if config.get("TRANSPOSED")
               else runs_word_dots(config))
    if steps > 1 and (not on_path or k % (steps * config["BLOCK_K"])):
        raise ValueError(f"STEPS={steps} (K steps a pass) runs on tensor-core decode tiles of int32 words (word_dots, or "
                         f"turned round with STACK 1), and STEPS x BLOCK_K must divide K={k}; got {config}")
    if long_steps(config, group):
        if k % config["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={config['BLOCK_K']} over several groups must divide K={k}")
    elif group % config["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={config['BLOCK_K']} must divide the group size {group} (one scale per K step; only "
                         f"the single-row path, BLOCK_M = 1, takes steps of several whole groups)")


def k_steps(group: int) -> list[int]:
    """The K steps a launch may take: 64 and 128 where they divide the group, else the largest that does."""
    return [bk for bk in (64, 128) if group % bk == 0] or [k_step_for(group)]


def k_step_for(group: int) -> int:
    """The largest power-of-two K step (at most 64) inside one group: a step reads one scale per column."""
    return next(b for b in (64, 32, 16, 8, 4, 2) if group % b == 0)


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, slot_ptr, out_ptr, M, N, K,
                  stride_xm, stride_wn, stride_sn, stride_sg, stride_we, stride_se, stride_om, sums_ptr, counts_ptr,
                  GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, ATOMIC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr, GROUPED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  PREFETCH: tl.constexpr = False, WORD_DOTS: tl.constexpr = True, K_WIDTH: tl.constexpr = 0,
                  TRANSPOSED: tl.constexpr = False, STACK: tl.constexpr = 1, STAGES: tl.constexpr = 3,
                  PDL: tl.constexpr = False, PIPELINE: tl.constexpr = False, STEPS: tl.constexpr = 1):
    pid_k = tl.program_id(1)
    if GROUPED:  # experts stacked [E, ...]; row m of x runs through expert slot_ptr[m] (BLOCK_M = 1)
        pair, offs_m, offs_n, mask_n, expert = grouped_row(slot_ptr, M, N, BLOCK_N)
        w_ptr += expert * stride_we
        s_ptr += expert * stride_se
        z_ptr += expert * stride_se
        x_ptr += pair * stride_xm  # single_row reads the row at x_ptr
    else:
        offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
        mask_n = offs_n < N
        if PDL:  # a program reads SPAN bytes of each of its columns a pass (STACK x STEPS steps turned round)
            SPAN: tl.constexpr = STACK * STEPS * BLOCK_K // 2
            prefetch_then_wait(w_ptr, offs_n, mask_n, stride_wn, K // 2, pid_k * SPAN, SPAN * SPLIT_K, SPAN,
                               PDL_PREFETCH_PASSES)
    if BLOCK_M == 1:
        acc = single_row(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, pid_k, N, K, stride_wn, stride_sn, stride_sg,
                         GROUP, HAS_ZEROS, X_PAIRS, X_DTYPE, BLOCK_N, BLOCK_K, SPLIT_K, PREFETCH, PIPELINE, STAGES)
    elif TRANSPOSED and BLOCK_M > 16:  # prefill on the tensor cores, W x^T: the weights from registers
        acc = turned_tiles(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, mask_n, pid_k, M, N, K, stride_xm, stride_wn,
                           stride_sn, stride_sg, GROUP, HAS_ZEROS, DOT_DTYPE, X_PAIRS, X_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
                           SPLIT_K, STAGES)
    elif TRANSPOSED:  # decode (M <= 8) on the tensor cores, W x^T
        acc = turned_word_dots(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, pid_k, M, N, K, stride_xm, stride_wn, stride_sn,
                               stride_sg, GROUP, HAS_ZEROS, DOT_DTYPE, X_PAIRS, X_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
                               K_WIDTH, STACK, STAGES, STEPS)
    elif BLOCK_K >= 64 and WORD_DOTS:  # on the tensor cores: decode (M <= 16), or prefill (runs_word_tiles)
        acc = word_dots(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, mask_n, pid_k, M, N, K, stride_xm, stride_wn, stride_sn,
                        stride_sg, GROUP, HAS_ZEROS, DOT_DTYPE, X_PAIRS, X_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, K_WIDTH,
                        STAGES, STEPS)
    else:
        offs_j = tl.arange(0, BLOCK_K // 2)  # byte index within the K step
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K, num_stages=STAGES):
            packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 // 2 + offs_j)[:, None],
                             mask=mask_n[None, :], other=0)  # [BLOCK_K/2, BLOCK_N] bytes
            scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n, mask_n, stride_sn, stride_sg, k0 // GROUP, HAS_ZEROS)
            x_even, x_odd = load_x_halves(x_ptr, offs_m, mask_m, stride_xm, k0 // 2 + offs_j, X_PAIRS, X_DTYPE)
            if BLOCK_M <= 16:
                # The byte path of decode on tensor cores (K steps under 64, where word_dots' four
                # dots would be under 16 deep; and for comparison, WORD_DOTS=False: gpu_decode_space.py).
                # It multiplies exact integers: nibble_floats makes each nibble q
                # the 16-bit float B + q, the products are exact and summed in fp32, and (B + z) times
                # the step's activation sum comes off the result, which the group's scale then scales.
                # The sum is of the activations as the tensor cores see them (rounded to 16 bits).
                w_lo, w_hi, base = nibble_floats(packed, X_DTYPE)
                x_even = x_even.to(w_lo.dtype).to(DOT_DTYPE)
                x_odd = x_odd.to(w_lo.dtype).to(DOT_DTYPE)
                part = tl.dot(x_even, w_lo.to(DOT_DTYPE), out_dtype=tl.float32)
                part = tl.dot(x_odd, w_hi.to(DOT_DTYPE), acc=part, out_dtype=tl.float32)
                x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
                acc += (part - x_sum[:, None] * (zero + base)[None, :]) * scale[None, :]
            else:
                # The byte path of prefill (K steps under 64, and WORD_DOTS=False for comparison).
                # Prefill tiles have more rows than a K step has columns: scaling each weight is cheaper.
                w_lo, w_hi = nibbles_minus_zero(packed, zero)
                acc = tl.dot(x_even.to(DOT_DTYPE), (w_lo * scale[None, :]).to(DOT_DTYPE), acc=acc, out_dtype=tl.float32)
                acc = tl.dot(x_odd.to(DOT_DTYPE), (w_hi * scale[None, :]).to(DOT_DTYPE), acc=acc, out_dtype=tl.float32)
    if PDL:
        launch_dependents()
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, sums_ptr, counts_ptr, ATOMIC, SPLIT_K)


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


@triton.jit
def single_row(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, pid_k, N, K, stride_wn, stride_sn, stride_sg,
               GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
               PIPELINE: tl.constexpr, STAGES: tl.constexpr):
    """x @ dequant(W)^T for a single row of x, [1, BLOCK_N] in fp32, on the FMA units.

    The weights are read as int32 words of eight nibbles (inputs 8j .. 8j + 7 in word j, nibble i
    in bits 4i .. 4i + 3: the canonical bytes read little-endian), so no byte is widened on its
    own. One shift per byte moves it to bits 15..22 (byte_floats), where one logic instruction
    per nibble makes it a float B + q: 256 + q for the low nibble, 16 + q for the high one. Then
    each nibble costs one more instruction, the multiply-add with its activation. A 16-bit
    activation times B + q is exact in fp32 (at most 11 + 9 significant bits), and
    sum(x B) + z sum(x) comes off each word's sum at once: (x_base + x_sum z) below. The group's
    scale multiplies each word's sum; the sum across threads runs once, after the K loop.
    (benchmarks/kernels_compile.py counts the loop: about 7 instructions per weight byte at
    BLOCK_N = 256, where the byte-wise multiply-and-sum took 11.)

    Written as a plain loop (tl.range with one stage), Triton does not pipeline it (no dot), so a
    thread's weight loads for one step wait out the memory's latency before its arithmetic, and
    the next step's loads are issued only after it. PREFETCH loads the next step's words at the top
    of each pass, so one step's loads are in flight while the last one is multiplied: on the H200,
    INT8, whose tl.dot path Triton does pipeline and which reads twice the bytes per step, reached
    about twice INT4's bandwidth (66% of copy bandwidth against 35%, 14336 x 4096 at M = 1).
    The tuner takes a PREFETCH config only where it is the fastest (on the H200: 4096 x 4096 and
    the fused q/k/v at M = 1). PIPELINE hands the loop to Triton's pipeline instead (the launch's
    num_stages, STAGES): words, activations and, since a scale and its zero point are one 32-bit
    word (ZEROS_PAIRED), the scales too come by cp.async num_stages - 1 steps ahead, and no plain
    load is left in the loop, for about the instructions PREFETCH takes (64 columns: 304 a step
    against PREFETCH's 300 and 287 without either with Triton 3.9; 318 against 300 with 3.6). A
    candidate beside PREFETCH until a GPU has timed the two.

    Long steps (long_steps: BLOCK_K of 2 to 4 whole groups, dividing K) read 128-256 bytes of each
    weight row a step where a step of one group of 128 reads 64, half a 128-byte line; the tile
    stays one load in the words' own layout, and each word takes its group's scale and zero point
    by a select over the step's groups, loaded as one group's are. (A scale tile gathered a word,
    [BLOCK_K/8, BLOCK_N], loads fastest along N and Triton then moved every product between the
    two layouts through shared memory: 20 instructions per weight byte, against 7.6-8.7 this way;
    benchmarks/kernels_compile.py, Triton 3.6 and 3.9.) Whether the longer pieces stream faster
    on a GPU is for the timer: benchmarks/GPU_NOTES.md.
    """
    offs_w = tl.arange(0, BLOCK_K // 8)
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[None, :] * (stride_wn // 4) + offs_w[:, None]
    acc_k = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    GROUPS: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups a step (long_steps)
    # The exponents go in as registers the compiler cannot see are constant (N >> 31 is 0 for any
    # real N): as immediates, LLVM merges them with the masks into one two-constant instruction
    # and ptxas then reloads a register before every nibble.
    unknown_zero = N >> 31
    exp256 = unknown_zero + 0x43800000
    exp16 = unknown_zero + 0x41800000
    k_first = pid_k * BLOCK_K
    if PREFETCH:
        # Past the last step the address falls back on a step of the layer (its first, or the one
        # just loaded) instead of a mask: a scalar mask breaks the interpreter, one per word would
        # break the 16-byte loads; the words read there go unused.
        upcoming = tl.load(words_ptr + tl.where(k_first < K, k_first, 0) // 8, mask=mask_n[None, :], other=0)
    for k0 in tl.range(k_first, K, BLOCK_K * SPLIT_K, num_stages=STAGES if PIPELINE else 1):
        if PREFETCH:  # this step's words arrived during the last pass; ask for the next step's now
            words = upcoming
            k_next = k0 + BLOCK_K * SPLIT_K
            upcoming = tl.load(words_ptr + tl.where(k_next < K, k_next, k0) // 8, mask=mask_n[None, :], other=0)
        else:
            words = tl.load(words_ptr + k0 // 8, mask=mask_n[None, :], other=0)  # [BLOCK_K/8, BLOCK_N]
        scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n, mask_n, stride_sn, stride_sg, k0 // GROUP, HAS_ZEROS)
        scale, zero = scale[None, :], zero[None, :]
        for later in tl.static_range(1, GROUPS):  # a step over several groups: each word takes its own group's
            scale_later, zero_later = group_scale_zero(s_ptr, z_ptr, offs_n, mask_n, stride_sn, stride_sg,
                                                       k0 // GROUP + later, HAS_ZEROS)
            in_later = (offs_w // (GROUP // 8) == later)[:, None]
            scale = tl.where(in_later, scale_later[None, :], scale)
            zero = tl.where(in_later, zero_later[None, :], zero)
        word_index = k0 // 8 + offs_w
        x0, x1, x2, x3, x4, x5, x6, x7 = load_x_words(x_ptr, word_index, X_PAIRS, X_DTYPE)
        x_low = x0 + x2 + x4 + x6  # the activations of the low nibbles (bias 256) and the high ones (bias 16)
        x_high = x1 + x3 + x5 + x7
        x_base = x_low * 256.0 + x_high * 16.0
        x_sum = x_low + x_high
        f0, f1 = byte_floats(words << 15, exp256, exp16)
        f2, f3 = byte_floats(words << 7, exp256, exp16)
        f4, f5 = byte_floats(words >> 1, exp256, exp16)
        f6, f7 = byte_floats(words >> 9, exp256, exp16)
        part = x0[:, None] * f0 - (x_base[:, None] + x_sum[:, None] * zero)
        part += x1[:, None] * f1
        part += x2[:, None] * f2
        part += x3[:, None] * f3
        part += x4[:, None] * f4
        part += x5[:, None] * f5
        part += x6[:, None] * f6
        part += x7[:, None] * f7
        acc_k += part * scale
    return tl.sum(acc_k, axis=0)[None, :]


@triton.jit
def word_dots(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, mask_n, pid_k, M, N, K, stride_xm, stride_wn, stride_sn,
              stride_sg, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, DOT_DTYPE: tl.constexpr, X_PAIRS: tl.constexpr,
              X_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              SPLIT_K: tl.constexpr, K_WIDTH: tl.constexpr, STAGES: tl.constexpr, STEPS: tl.constexpr = 1):
    """x @ dequant(W)^T for up to 16 rows of x on the tensor cores, [BLOCK_M, BLOCK_N] in fp32,
    the weights read as int32 words of eight nibbles (inputs 8j .. 8j + 7 in word j).

    A tensor-core operand register holds two 16-bit weights of one column at neighbouring K
    positions. One AND-OR per word makes such a register out of nibbles i and i + 4 of that word:
    (word >> 4i) & 0x000F000F | the exponent bits of B in both halves is the pair of 16-bit floats
    B + q (B = 128 in bf16, 1024 in fp16, where those floats' spacing is 1). So a K step runs four
    dots, dot i over the weight pairs (8j + i, 8j + i + 4), with the activations taken in that
    order too (split out of the step's row of x), and no weight is ever moved on its own: the
    byte path (nibble_floats) widened each byte with a PRMT, 144 of the 391 SASS instructions of
    its step at 64 x 128 (benchmarks/kernels_compile.py, Triton 3.9: 12.2 instructions per weight
    byte there, 9.2 here; at 128 x 128, 9.1 and 6.4; Triton 3.6: 12.5 and 10.8, 9.9 and 7.7). As
    on that path the products of B + q are exact, and (B + z) times the step's activation sum
    comes off the sum before the group's scale.

    Each dot is K = BLOCK_K / 4 deep, so BLOCK_K >= 64 (a GPU's tl.dot takes K >= 16). In K steps
    of 128 the words and activations are first relabelled into the tensor cores' operand order
    (operand_order), so the unpacked pairs need not go through shared memory to their threads.

    Prefill tiles (BLOCK_M > 16, runs_word_tiles) have more rows of x than a K step has columns, so
    there the scale goes on the weights, not on the sums: one 16-bit subtraction of B + z makes a
    register's two weights q - z exactly (small integers), and one 16-bit multiply by the scale
    rounds (q - z) * s once, the reference's weight rounded to bf16 bit for bit (fp16 activations
    round the bf16 scale to fp16 first). Two weights an instruction, where the byte path
    (nibbles_minus_zero) spends fp32 instructions on each weight and a conversion on each pair:
    259 -> 218 SASS instructions a K step at 128 x 128 x 64 with 8 warps, 472 -> 367 at 128 x 128
    x 128 (Triton 3.9; 3.6 within 3 of those; benchmarks/kernels_compile.py). Both operands reach
    the tensor cores through shared memory there, so the words stay as loaded and the
    activations' split into the pairs' order costs no extra trip. Under the interpreter DOT_DTYPE
    is fp32, so the same lines compute the unrounded weight there.

    The K loop is tl.range(..., num_stages=STAGES) (the launch's num_stages: triton_common.
    takes_stages), so Triton's pipeline takes every load in it, not only those feeding a dot.
    With the scales and zeros column-major, a tile's share of them is 32 bits a thread from 64
    columns a warp, enough for cp.async, and they come num_stages - 1 steps ahead with the words
    (with bf16 zero points, each right after its scale, from 32: a scale and its zero point are one
    32-bit word, ZEROS_PAIRED; symmetric layers have no zero points to pair). On
    the H200 (run 2: row-major scales, a plain range) these tiles issued at 16-24% of the peak and
    streamed at 1060-1843 GB/s: each pass read its scales 10-32 SASS instructions after loading them
    (Triton 3.6), so it waited out a load from memory. Now their K loops hold no plain load
    (benchmarks/kernels_compile.py's load_waits; Triton 3.6: 554 -> 553 instructions a step at 8 x
    64 turned round, 644 -> 620 at 16 x 256; 3.9: 537 -> 554, 571 -> 619).

    STEPS consecutive K steps a pass (decode tiles; STEPS x BLOCK_K divides K) read 64 x STEPS bytes
    of each row a pass, both steps' words in one stage of the pipeline.
    """
    offs_w = tl.arange(0, BLOCK_K // 8)
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_wn // 4) + offs_w[None, :]
    x_rows = activation_rows(x_ptr, offs_m, stride_xm, X_PAIRS, X_DTYPE)[:, None]
    nibble_mask, exponents, base = pair_constants(N, X_DTYPE)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_pass in tl.range(pid_k * STEPS * BLOCK_K, K, STEPS * BLOCK_K * SPLIT_K, num_stages=STAGES):
        for step in tl.static_range(STEPS):
            k0 = k_pass + step * BLOCK_K
            words = tl.load(words_ptr + k0 // 8, mask=mask_n[:, None], other=0)  # [BLOCK_N, BLOCK_K/8]
            if BLOCK_M <= 16:
                words = tl.reshape(operand_order(tl.reshape(words, (BLOCK_N, BLOCK_K // 8, 1)), K_WIDTH), (BLOCK_N, BLOCK_K // 8))
            scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n, mask_n, stride_sn, stride_sg, k0 // GROUP, HAS_ZEROS)
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0.0).to(DOT_DTYPE)
            if BLOCK_M > 16:  # prefill: each weight dequantised, two an instruction
                scale = scale.to(DOT_DTYPE)[:, None]
                biased = (zero + base).to(DOT_DTYPE)[:, None]  # B + z: an integer under 2^11, exact in 16 bits
                x_0, x_1, x_2, x_3 = x_quarters(x, 0)
                w_0 = (pair_floats(words, 0, nibble_mask, exponents, X_DTYPE, DOT_DTYPE) - biased) * scale
                acc = tl.dot(x_0, tl.trans(w_0), acc=acc, out_dtype=tl.float32)
                w_1 = (pair_floats(words, 1, nibble_mask, exponents, X_DTYPE, DOT_DTYPE) - biased) * scale
                acc = tl.dot(x_1, tl.trans(w_1), acc=acc, out_dtype=tl.float32)
                w_2 = (pair_floats(words, 2, nibble_mask, exponents, X_DTYPE, DOT_DTYPE) - biased) * scale
                acc = tl.dot(x_2, tl.trans(w_2), acc=acc, out_dtype=tl.float32)
                w_3 = (pair_floats(words, 3, nibble_mask, exponents, X_DTYPE, DOT_DTYPE) - biased) * scale
                acc = tl.dot(x_3, tl.trans(w_3), acc=acc, out_dtype=tl.float32)
            else:
                x_sum = tl.sum(x.to(tl.float32), axis=1)  # as the tensor cores see x
                x_0, x_1, x_2, x_3 = x_quarters(x, K_WIDTH)
                part = tl.dot(x_0, tl.trans(pair_floats(words, 0, nibble_mask, exponents, X_DTYPE, DOT_DTYPE)), out_dtype=tl.float32)
                part = tl.dot(x_1, tl.trans(pair_floats(words, 1, nibble_mask, exponents, X_DTYPE, DOT_DTYPE)), acc=part, out_dtype=tl.float32)
                part = tl.dot(x_2, tl.trans(pair_floats(words, 2, nibble_mask, exponents, X_DTYPE, DOT_DTYPE)), acc=part, out_dtype=tl.float32)
                part = tl.dot(x_3, tl.trans(pair_floats(words, 3, nibble_mask, exponents, X_DTYPE, DOT_DTYPE)), acc=part, out_dtype=tl.float32)
                acc += (part - x_sum[:, None] * (zero + base)[None, :]) * scale[None, :]
    return acc


@triton.jit
def turned_word_dots(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, pid_k, M, N, K, stride_xm, stride_wn, stride_sn,
                     stride_sg, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, DOT_DTYPE: tl.constexpr, X_PAIRS: tl.constexpr,
                     X_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, K_WIDTH: tl.constexpr, STACK: tl.constexpr, STAGES: tl.constexpr,
                     STEPS: tl.constexpr = 1):
    """word_dots turned round (TRANSPOSED): out^T = W x^T, returned as [BLOCK_M, BLOCK_N] in fp32.

    The weights become the dots' first operand (16 rows of the tensor cores' m16n8k16 tile) and
    x^T the second (8 columns), so a tile of BLOCK_M = 8 carries up to 8 rows of x where word_dots'
    carries 16: at decode that halves the accumulators, their multiply-adds each step and the
    activations' split, which every warp does for its whole step. Same words, pairs and sums.

    STACK K steps run side by side, one a warp (num_warps = STACK), as a batch of dots whose
    partial sums meet once, after the loop: more warps a program without splitting K over programs
    (whose partial sums meet through atomics and a counter a tile, in memory). The
    words are loaded as [BLOCK_N / 8, STACK, 8, J], which Triton lays out with a warp's lanes on 8
    columns x J words and the warps on the steps, as the batched dot wants them: loaded as
    [STACK, BLOCK_N, J], the lanes took columns across steps and the unpacked pairs went through
    shared memory to their warps (Triton 3.9: 4.2 instructions per weight byte at 4 x 128 wide
    against 3.9). With more than one warp on one step (the unbatched form) they went there too,
    and from 4 warps Triton took Hopper's warpgroup MMA, which reads them from there.

    One warp (STACK 1) takes STEPS consecutive K steps a pass instead (turned_step for each): 64 x
    STEPS bytes of each row a pass from one warp, without the batch Triton 3.6 compiles badly."""
    J: tl.constexpr = BLOCK_K // 8
    steps = tl.arange(0, STACK)
    x_rows = (activation_rows(x_ptr, offs_m, stride_xm, X_PAIRS, X_DTYPE)[None, :, None]
              + steps[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :])  # [STACK, BLOCK_M, BLOCK_K]
    nibble_mask, exponents, base = pair_constants(N, X_DTYPE)
    mask_m = (offs_m < M)[None, :, None]
    mask_n = offs_n < N
    acc = tl.zeros((STACK, BLOCK_N, BLOCK_M), dtype=tl.float32)
    if STACK == 1:  # one warp, STEPS consecutive K steps a pass (STEPS x BLOCK_K divides K: no mask along it)
        words_ptr = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_wn // 4) + tl.arange(0, J)[None, :]
        for k_pass in tl.range(pid_k * STEPS * BLOCK_K, K, STEPS * BLOCK_K * SPLIT_K, num_stages=STAGES):
            for step in tl.static_range(STEPS):
                acc += turned_step(words_ptr, x_rows, s_ptr, z_ptr, offs_n, mask_n, mask_m, k_pass + step * BLOCK_K,
                                   stride_sn, stride_sg, nibble_mask, exponents, base, GROUP, HAS_ZEROS, DOT_DTYPE,
                                   X_DTYPE, BLOCK_N, BLOCK_K, K_WIDTH)
    else:  # STACK warps side by side, a batch of dots
        columns = tl.reshape(offs_n, (BLOCK_N // 8, 1, 8, 1))
        words_ptr = (w_ptr.to(tl.pointer_type(tl.int32)) + columns * (stride_wn // 4) + steps[None, :, None, None] * J
                     + tl.arange(0, J)[None, None, None, :])  # [BLOCK_N / 8, STACK, 8, J]
        for k0 in tl.range(pid_k * STACK * BLOCK_K, K, STACK * BLOCK_K * SPLIT_K, num_stages=STAGES):
            step_k = k0 + steps * BLOCK_K
            in_k = step_k < K  # a step past K reads nothing, and its scale, 0, takes it out of the sum
            words = tl.load(words_ptr + k0 // 8, mask=(columns < N) & in_k[None, :, None, None], other=0)
            x = tl.load(x_rows + k0, mask=mask_m & in_k[:, None, None], other=0.0).to(DOT_DTYPE)
            scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n[None, :], in_k[:, None] & mask_n[None, :], stride_sn,
                                           stride_sg, (step_k // GROUP)[:, None], HAS_ZEROS)
            acc += turned_dots(words, x, scale, zero, base, nibble_mask, exponents, DOT_DTYPE, X_DTYPE, K_WIDTH)
    return tl.trans(tl.sum(acc, axis=0))


@triton.jit
def turned_step(words_ptr, x_rows, s_ptr, z_ptr, offs_n, mask_n, mask_m, k0, stride_sn, stride_sg, nibble_mask, exponents,
                base, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, DOT_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_WIDTH: tl.constexpr):
    """One K step of turned_word_dots on one warp (STACK 1), [1, BLOCK_N, BLOCK_M] in fp32: what its
    loop adds for the step at k0 (inside K). A batch of one through turned_dots, as the STACK warps'
    steps go: as plain 2-D dots over words loaded [BLOCK_N, J], Triton 3.6 took 12-14% more instructions (618
    against 554 a step at 64 wide, 1047 against 917 at 128; benchmarks/kernels_compile.py)."""
    J: tl.constexpr = BLOCK_K // 8
    words = tl.reshape(tl.load(words_ptr + k0 // 8, mask=mask_n[:, None], other=0), (BLOCK_N // 8, 1, 8, J))
    x = tl.load(x_rows + k0, mask=mask_m, other=0.0).to(DOT_DTYPE)  # [1, BLOCK_M, BLOCK_K]
    scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n[None, :], mask_n[None, :], stride_sn, stride_sg,
                                   tl.full((1, 1), k0 // GROUP, tl.int32), HAS_ZEROS)
    return turned_dots(words, x, scale, zero, base, nibble_mask, exponents, DOT_DTYPE, X_DTYPE, K_WIDTH)


@triton.jit
def turned_dots(words, x, scale, zero, base, nibble_mask, exponents, DOT_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr,
                K_WIDTH: tl.constexpr):
    """The sums of S K steps turned round, [S, BLOCK_N, BLOCK_M] in fp32, from the steps' words as
    loaded ([BLOCK_N / 8, S, 8, J]: a warp's lanes on 8 columns x J words, the warps on the steps),
    their activations x [S, BLOCK_M, BLOCK_K] in DOT_DTYPE and their scales and zero points
    [S, BLOCK_N]: one warp's step (turned_step, S = 1) or STACK warps' side by side."""
    S: tl.constexpr = x.shape[0]
    BLOCK_M: tl.constexpr = x.shape[1]
    BLOCK_K: tl.constexpr = x.shape[2]
    BLOCK_N: tl.constexpr = words.shape[0] * 8
    J: tl.constexpr = words.shape[3]
    words = tl.reshape(tl.permute(words, (1, 0, 2, 3)), (S * BLOCK_N, J, 1))
    words = tl.reshape(operand_order(words, K_WIDTH), (S * BLOCK_N, J))
    x_sum = tl.sum(x.to(tl.float32), axis=2)  # [S, BLOCK_M], as the tensor cores see x
    x_0, x_1, x_2, x_3 = x_quarters(tl.reshape(x, (S * BLOCK_M, BLOCK_K)), K_WIDTH)
    part = tl.dot(stacked(pair_floats(words, 0, nibble_mask, exponents, X_DTYPE, DOT_DTYPE), S),
                  tl.permute(stacked(x_0, S), (0, 2, 1)), out_dtype=tl.float32)
    part = tl.dot(stacked(pair_floats(words, 1, nibble_mask, exponents, X_DTYPE, DOT_DTYPE), S),
                  tl.permute(stacked(x_1, S), (0, 2, 1)), acc=part, out_dtype=tl.float32)
    part = tl.dot(stacked(pair_floats(words, 2, nibble_mask, exponents, X_DTYPE, DOT_DTYPE), S),
                  tl.permute(stacked(x_2, S), (0, 2, 1)), acc=part, out_dtype=tl.float32)
    part = tl.dot(stacked(pair_floats(words, 3, nibble_mask, exponents, X_DTYPE, DOT_DTYPE), S),
                  tl.permute(stacked(x_3, S), (0, 2, 1)), acc=part, out_dtype=tl.float32)
    return (part - (zero + base)[:, :, None] * x_sum[:, None, :]) * scale[:, :, None]


@triton.jit
def turned_tiles(x_ptr, w_ptr, s_ptr, z_ptr, offs_m, offs_n, mask_n, pid_k, M, N, K, stride_xm, stride_wn, stride_sn,
                 stride_sg, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, DOT_DTYPE: tl.constexpr, X_PAIRS: tl.constexpr,
                 X_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, STAGES: tl.constexpr):
    """Prefill turned round (runs_turned_tiles): out^T = W x^T, returned as [BLOCK_M, BLOCK_N] in fp32.

    The word tiles (word_dots' prefill branch) give Hopper's warpgroup MMA the dequantised weights as
    its second operand, which must come from shared memory: each K step stores them there, and since
    that buffer is written in the loop rather than filled by the pipeline, Triton waits for every MMA
    to finish before the loop goes on (wgmma.wait_group 0 after each of the step's four dots, with
    Triton 3.6 and 3.9: benchmarks/kernels_compile.py's mma_in_flight), so a warpgroup's dequantisation
    and its MMAs take turns. Turned round, the weights are the first operand, which the MMA takes from
    registers, and x^T the second, read from the shared memory the pipeline filled: the MMA then
    stays in flight while the next step's weights are dequantised (waits leave 1 pending with 3.9, 3
    with 3.6). CUTLASS's mixed-input GEMMs for Hopper are built the same way round.

    K in its natural order: thread t of a quad holds inputs 2t and 2t + 1 of each 8 in the operand's
    layout, which is byte t of each word, so the step's words are broadcast along the byte axis and
    x is copied as it lies (16 bytes a copy); a byte becomes two 16-bit floats B + q by one multiply
    and one AND-OR (byte_pair), and the weight (B + q - (B + z)) * s in 16 bits, two an instruction,
    as in the word tiles (the reference's weight rounded to bf16 bit for bit; fp32 under the
    interpreter). The scales are read unmasked at clamped columns (a column past N reads the last
    one, and its output is never stored): with the mask Triton 3.6 laid their load out as the
    store's, 48 ISETP a step more. BLOCK_K is one group's step or less (check_k_step) and divides K.
    """
    J: tl.constexpr = BLOCK_K // 8
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_wn // 4) + tl.arange(0, J)[None, :]
    scale_columns = tl.minimum(offs_n, N - 1)
    x_rows = activation_rows(x_ptr, offs_m, stride_xm, X_PAIRS, X_DTYPE)
    mask_m = offs_m < M
    _, exponents, base = pair_constants(N, X_DTYPE)
    half: tl.constexpr = tl.float16 if X_DTYPE == tl.float16 else tl.bfloat16
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K, num_stages=STAGES):
        words = tl.load(words_ptr + k0 // 8, mask=mask_n[:, None], other=0)  # [BLOCK_N, J]
        if HAS_ZEROS == ZEROS_PAIRED:
            scale, zero = pairs_loaded_twice(s_ptr, scale_columns, stride_sg, k0 // GROUP)
        else:
            scale, zero = group_scale_zero(s_ptr, z_ptr, scale_columns, None, stride_sn, stride_sg, k0 // GROUP, HAS_ZEROS)
        x = tl.load(x_rows[:, None] + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mask_m[:, None], other=0.0)
        pairs = tl.reshape(byte_pair(words[:, :, None], tl.arange(0, 4)[None, None, :], exponents), (BLOCK_N, 4 * J))
        halves = tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)).to(half, bitcast=True)  # [BLOCK_N, 4J, 2]
        w = tl.reshape(halves, (BLOCK_N, BLOCK_K)).to(DOT_DTYPE)
        w = (w - (zero + base).to(DOT_DTYPE)[:, None]) * scale.to(DOT_DTYPE)[:, None]
        acc = tl.dot(w, tl.trans(x.to(DOT_DTYPE)), acc=acc, out_dtype=tl.float32)
    return tl.trans(acc)


@triton.jit
def byte_pair(words, b, exponents):
    """Byte b of each word (its nibbles q0, q1: inputs 8j + 2b, 8j + 2b + 1) as one register of two
    16-bit floats, B + q0 in the low half and B + q1 in the high: times 0x1001 copies the byte 12
    bits up, so q1 lands in bits 16..19 while q0 stays in 0..3, and the mask drops the rest."""
    byte = (words >> (8 * b)) & 0xFF
    return ((byte * 0x1001) & 0x000F000F) | exponents


@triton.jit
def stacked(t, STACK: tl.constexpr):
    """[STACK * R, C] -> [STACK, R, C]: rows of the STACK steps apart, for a batched dot."""
    return tl.reshape(t, (STACK, t.shape[0] // STACK, t.shape[1]))


@triton.jit
def activation_rows(x_ptr, offs_m, stride_xm, X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr):
    """The start of each row of x as 16-bit values (x arrives as int32 pairs) or fp32 ones."""
    if X_PAIRS:
        rows = x_ptr.to(tl.pointer_type(X_DTYPE)) + offs_m * (2 * stride_xm)
    else:
        rows = x_ptr + offs_m * stride_xm
    return rows


@triton.jit
def pair_constants(N, X_DTYPE: tl.constexpr):
    """pair_floats' mask and exponent bits, and B. As registers the compiler cannot see are constant
    (N >> 31 is 0), as in single_row: as immediates, ptxas materialised the mask again before each
    use (IMAD.MOV)."""
    unknown_zero = N >> 31
    if X_DTYPE == tl.float16:
        exponents = unknown_zero + 0x64006400
        base = 1024.0
    else:
        exponents = unknown_zero + 0x43004300
        base = 128.0
    return unknown_zero + 0x000F000F, exponents, base


@triton.jit
def x_quarters(x, K_WIDTH: tl.constexpr):
    """A step's activations [R, BLOCK_K] as the four dots take them, [R, BLOCK_K / 4] each: in the
    words' operand order, x[:, 8j + 4h + 2a + b] goes to quarter 2a + b at column 2j + h, the input
    of nibble 2a + b (h = 0) or 2a + b + 4 (h = 1) of word j."""
    rows: tl.constexpr = x.shape[0]
    j: tl.constexpr = x.shape[1] // 8
    x = operand_order(tl.reshape(x, (rows, j, 8)), K_WIDTH)
    x_b0, x_b1 = tl.split(tl.reshape(x, (rows, j, 2, 2, 2)))
    x_0, x_2 = tl.split(x_b0)
    x_1, x_3 = tl.split(x_b1)
    return tl.reshape(x_0, (rows, 2 * j)), tl.reshape(x_1, (rows, 2 * j)), tl.reshape(x_2, (rows, 2 * j)), \
        tl.reshape(x_3, (rows, 2 * j))


@triton.jit
def operand_order(t, K_WIDTH: tl.constexpr):
    """A step's words [N, J, 1] (or their activations [M, J, 8]) relabelled along J so that the words
    each thread loads are, once unpacked, its tensor-core operand registers: a relabelling Triton
    does in registers, with no data moved.

    A dot's operand gives the four threads of a column a share of each 16-deep slice of K: with
    K_WIDTH = 2 (Triton 3.8 and later) thread a holds the pairs a and a + 4 of a slice, with 4 (3.4
    to 3.6) the pairs 2a and 2a + 1. As they lie, a thread loads four adjacent words (16 bytes) of a
    column, so its unpacked pairs went through shared memory to reach their threads (with 3.6 at
    16 x 256 x 128: 16 STS.128, 32 LDS.64 and 8 BAR a step, and ~50 register moves). Here the loaded
    word a * J/4 + b becomes pair index 4b + a (K_WIDTH 2: J/4 words a thread), or word 4a + 2c + d
    pair index 8c + 2a + d (K_WIDTH 4), which is where the operand layout wants them; the dot sums
    over K in any order as long as the activations are relabelled alike, which this does to them too.
    7.36 -> 5.72 instructions per weight byte there with 3.6, 5.98 -> 5.31 with 3.9 (the other order
    helps neither: benchmarks/kernels_compile.py). K steps of 64 (J = 8) keep the order as loaded:
    there a thread loads 4 words where the operand gives it 2, and neither order removes the trip
    (with 3.9, K_WIDTH 2 cost 0.2 instructions a byte more). K_WIDTH = 0 keeps it too."""
    rows: tl.constexpr = t.shape[0]
    j: tl.constexpr = t.shape[1]
    w: tl.constexpr = t.shape[2]
    if j < 16:
        return t
    elif K_WIDTH == 2:
        return tl.reshape(tl.permute(tl.reshape(t, (rows, 4, j // 4, w)), (0, 2, 1, 3)), (rows, j, w))
    elif K_WIDTH == 4:
        return tl.reshape(tl.permute(tl.reshape(t, (rows, 4, j // 8, 2, w)), (0, 2, 1, 3, 4)), (rows, j, w))
    else:
        return t


@triton.jit
def pair_floats(words, i: tl.constexpr, nibble_mask, exponents, X_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Nibbles i and i + 4 of each word [N, J] (a row of words per output column, as they lie in
    memory) as 16-bit floats B + q, [N, 2J] with column 2j + h holding nibble i + 4h of word j: one
    AND-OR per word makes both, and the rest only relabels. Joining the halves along a last axis
    keeps each register's pair together in Triton 3.6 too; from a [J, N] tile, joined and permuted,
    3.6 moved the halves between threads (about 200 SHFL and SEL a step at 128 wide: 9.1
    instructions per weight byte against 7.7; the same 6.4 in 3.9)."""
    floats = ((words >> (4 * i)) & nibble_mask) | exponents  # >> is arithmetic: the mask drops the sign bits
    half = tl.float16 if X_DTYPE == tl.float16 else tl.bfloat16
    pairs = tl.join(floats.to(tl.int16), (floats >> 16).to(tl.int16)).to(half, bitcast=True)  # [N, J, 2]
    return tl.reshape(pairs, (words.shape[0], 2 * words.shape[1])).to(DOT_DTYPE)


@triton.jit
def byte_floats(shifted, exp256, exp16):
    """The nibbles of the byte in bits 15..22 of `shifted` as floats 256 + q (low) and 16 + q
    (high): each nibble lands in the mantissa where that float's spacing is 1."""
    low = ((shifted & 0x78000) | exp256).to(tl.float32, bitcast=True)
    high = ((shifted & 0x780000) | exp16).to(tl.float32, bitcast=True)
    return low, high


@triton.jit
def load_x_words(x_ptr, word_index, X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr):
    """x[8j + i] (i = 0 .. 7) in fp32 for the weight words j, each word's eight in one load: 16 bytes
    a word of 16-bit x (int32 pairs; bf16 widens by bit moves alone), 32 of fp32. A load a pair (four
    loads of [J] values four words apart) could not be vectorised, and Triton 3.6 lays out a load of
    fewer values than threads as its use wants: 16 4-byte loads a step a thread, or 16 4-byte copies
    under PIPELINE, where these are 4 loads of 16 bytes (kernels_compile.py, K steps of 128, Triton
    3.6: 208 -> 193 instructions a step at 32 columns, 300 -> 288 at 64, under PIPELINE 301 -> 239 at
    32; 3.9: 205 -> 193, 300 -> 287)."""
    J: tl.constexpr = word_index.shape[0]
    if X_PAIRS:
        quads = tl.load(x_ptr + 4 * word_index[:, None] + tl.arange(0, 4)[None, :])  # [J, 4]: pair p, x 2p and 2p + 1
        pairs_02, pairs_13 = tl.split(tl.reshape(quads, (J, 2, 2)))
        pair_0, pair_2 = tl.split(pairs_02)
        pair_1, pair_3 = tl.split(pairs_13)
        x0, x1 = pair_halves(pair_0, X_DTYPE)
        x2, x3 = pair_halves(pair_1, X_DTYPE)
        x4, x5 = pair_halves(pair_2, X_DTYPE)
        x6, x7 = pair_halves(pair_3, X_DTYPE)
    else:
        eights = tl.load(x_ptr + 8 * word_index[:, None] + tl.arange(0, 8)[None, :]).to(tl.float32)  # [J, 8]
        even, odd = tl.split(tl.reshape(eights, (J, 4, 2)))  # x 8j + 2i and 8j + 2i + 1
        x_04, x_26 = tl.split(tl.reshape(even, (J, 2, 2)))
        x_15, x_37 = tl.split(tl.reshape(odd, (J, 2, 2)))
        x0, x4 = tl.split(x_04)
        x2, x6 = tl.split(x_26)
        x1, x5 = tl.split(x_15)
        x3, x7 = tl.split(x_37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def pair_halves(pairs, X_DTYPE: tl.constexpr):
    """The two 16-bit activations of int32 pairs, the even (low half) and the odd, in fp32."""
    if X_DTYPE == tl.bfloat16:
        even = (pairs << 16).to(tl.float32, bitcast=True)
        odd = (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        even = (pairs & 0xFFFF).to(tl.uint16).to(X_DTYPE, bitcast=True).to(tl.float32)
        odd = (pairs >> 16).to(tl.uint16).to(X_DTYPE, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def nibbles_minus_zero(packed, zero):
    """q - z in fp32 for the low and high nibble of each byte, without an int-to-float conversion
    (a reduced-rate instruction, one per weight): OR-ing the low nibble q into the mantissa of 2^23
    makes the float 2^23 + q, and one subtraction of 2^23 + z leaves q - z exactly. The high nibble
    stays in place (2^23 + 16 q), saving the shift; a fused multiply-add by 1/16 takes 2^19 + z off
    2^19 + q. The exponent is OR-ed in once per byte and each mask keeps it, so every logic
    instruction has one constant: with two (mask, then exponent) ptxas reloaded a register per nibble."""
    biased = packed.to(tl.int32) | 0x4B000000
    w_lo = (biased & 0x4B00000F).to(tl.float32, bitcast=True) - (zero + 8388608.0)[None, :]
    w_hi = (biased & 0x4B0000F0).to(tl.float32, bitcast=True) * 0.0625 - (zero + 524288.0)[None, :]
    return w_lo, w_hi


@triton.jit
def nibble_floats(packed, X_DTYPE: tl.constexpr):
    """The low and high nibble q of each byte as the 16-bit float B + q, and B, in the dtype the
    tensor cores take for these activations (fp16 for fp16, bf16 otherwise: dot_dtype): the nibble
    OR-ed into the mantissa of B, the power of two at which that float's spacing is 1 (bf16: 128,
    fp16: 1024). No conversion instruction; the 16-bit logic runs two values per 32-bit instruction."""
    wide = packed.to(tl.int16)  # zero-extended: the high nibble shifts down with nothing above it
    if X_DTYPE == tl.float16:
        w_lo = ((wide | 0x6400) & 0x640F).to(tl.float16, bitcast=True)
        w_hi = ((wide >> 4) | 0x6400).to(tl.float16, bitcast=True)
        base = 1024.0
    else:
        w_lo = ((wide | 0x4300) & 0x430F).to(tl.bfloat16, bitcast=True)
        w_hi = ((wide >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        base = 128.0
    return w_lo, w_hi, base


@triton.jit
def load_x_halves(x_ptr, offs_m, mask_m, stride_xm, pair_index, X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr):
    """x[:, 2j] and x[:, 2j + 1] for the packed byte indices j. 16-bit activations arrive as int32
    pairs (x_pairs), so one 4-byte load per byte of weights brings both, in the weights' layout;
    fp32 activations are read as two strided halves."""
    if X_PAIRS:
        pairs = tl.load(x_ptr + offs_m[:, None] * stride_xm + pair_index[None, :], mask=mask_m[:, None], other=0)
        x_even = (pairs & 0xFFFF).to(tl.uint16).to(X_DTYPE, bitcast=True)
        x_odd = (pairs >> 16).to(tl.uint16).to(X_DTYPE, bitcast=True)
    else:
        row = x_ptr + offs_m[:, None] * stride_xm + 2 * pair_index[None, :]
        x_even = tl.load(row, mask=mask_m[:, None], other=0.0)
        x_odd = tl.load(row + 1, mask=mask_m[:, None], other=0.0)
    return x_even, x_odd


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


def x_pairs(x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The activation argument and its constexprs: a 16-bit x as int32 pairs (a view; a copy
    only when its storage starts at an odd element), an fp32 x as it is."""
    if x.element_size() != 2:
        return x, {"X_PAIRS": False, "X_DTYPE": tl.float32}
    if x.storage_offset() % 2:
        x = x.clone()
    return x.view(torch.int32), {"X_PAIRS": True, "X_DTYPE": tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16}


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) for a 2-D x. `config` pins the tile sizes (tests, interpreter)."""
    out = _launch(x, qweight, scales, zeros, group_size, config)
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def w4a16_grouped(x: torch.Tensor, slots: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor | None, group_size: int, config: dict | None = None) -> torch.Tensor:
    """y[p] = x[p] @ dequant(W[slots[p]])^T for every row p of x, in one launch: a mixture's experts
    of one format stacked (qweight [E, N, K/2], scales and zeros [E, N, K/G]), each row of x a token
    routed to the expert in slot slots[p] (int32 [P]; -1: an expert this stack does not hold, whose
    row of y is 0). For decode, where a launch per expert costs more than its weights take to read."""
    check_stacks(x, slots, (qweight, scales, zeros))
    return _launch(x, qweight, scales, zeros, group_size, config, slots)


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            group_size: int, config: dict | None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """One launch: of one layer, or (slots given) of stacked experts, whose leading dimension goes."""
    n, half_k = qweight.shape[-2:]
    k = 2 * half_k
    check_activation(x, k)
    if k % group_size or scales.shape[-2:] != (n, k // group_size):
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a {n}x{k} weight in groups of {group_size}")
    scale_strides = scales.stride()  # read once: each read of a tensor's strides costs host time on every launch
    if zeros is not None and zeros.stride() != scale_strides:
        # one pair of strides serves both (column-major, as a Triton layer keeps them, or row-major)
        raise ValueError(f"zeros {zeros.stride()} and scales {scales.stride()} must share a layout")
    weight_strides = qweight.stride()
    if k % 8 or weight_strides[-1] != 1 or weight_strides[-2] % 4 or qweight.data_ptr() % 4:
        # single_row reads each row of qweight as int32 words; mpq sends only groups of 32 or more
        raise ValueError(f"W4A16 reads qweight rows as int32 words: K must be a multiple of 8 and each row start on a "
                         f"4-byte boundary (K={k}, strides {weight_strides}, address % 4 = {qweight.data_ptr() % 4})")
    x = x.contiguous()
    if config is None and interpreting():
        config = interpreter_config(x.shape[0], k_step_for(group_size), grouped=slots is not None)
    if config is not None and not config.get("DENSE"):
        check_k_step(config, group_size, k)
    if config is not None and config.get("BLOCK_M") == 1 and config["BLOCK_K"] < 8:
        raise ValueError(f"BLOCK_K={config['BLOCK_K']}: the single-row path reads K steps of whole int32 words (8+)")
    check_grouped_config(config, slots)
    # symmetric: the zeros pointer goes unused; one layer: the slots pointer and expert strides do
    pointers = (qweight, scales, zeros if zeros is not None else scales, scales if slots is None else slots)
    x_arg, x_meta = x_pairs(x)
    expert_strides = (0, 0) if slots is None else (weight_strides[0], scale_strides[0])
    scalars = (x.shape[0], n, k, x_arg.stride(0), weight_strides[-2], scale_strides[-2], scale_strides[-1], *expert_strides)
    has_zeros = zeros_layout(scales, zeros, scale_strides) if slots is None else int(zeros is not None)  # stacks: row-major, apart
    meta = {"GROUP": group_size, "HAS_ZEROS": has_zeros, "GROUPED": slots is not None, "K_WIDTH": K_WIDTH, **x_meta}
    shape_key = scales_key(k, group_size, scale_strides, has_zeros) + (() if slots is None else ("grouped", qweight.shape[0]))
    candidates = (lambda: _candidates(x.shape[0], group_size, k)) if slots is None else (lambda: _grouped_candidates(group_size))
    # prefill's dense route, timed beside the fused configs (kernels/triton_dequant.py)
    dense = (lambda: F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype))) if slots is None and dense_route_fits(x, n, k) else None
    return launch(_w4a16_kernel, x, n, pointers, scalars, meta, config, shape_key=shape_key, candidates=candidates,
                  x_arg=x_arg, dense=dense)
