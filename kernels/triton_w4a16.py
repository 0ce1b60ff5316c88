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
takes to deliver it (benchmarks/kernels_compile.py counts them). The bit work that keeps these
loops lean (nibbles into floats by bit tricks, 16-bit activations read as int32 pairs, each K
step in the order the tensor cores' operands want it) is in kernels/triton_w4a16_bits.py; how
scales and zero points lie and are read, in kernels/triton_w4a16_scales.py; which configs the
tuner times, and what a config's path and K steps are (turned_serves, long_steps,
runs_word_tiles, check_k_step), in kernels/triton_w4a16_configs.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mpq.kernels.triton_common import (check_activation, check_grouped_config, check_stacks, dense_route_fits, grouped_row,
                                       interpreter_config, interpreting, launch, launch_dependents, prefetch_then_wait,
                                       PDL_PREFETCH_PASSES, store_tile, tile_offsets)
from mpq.kernels.triton_dequant import dequantize_int4
from mpq.kernels.triton_w4a16_bits import (activation_rows, byte_floats, byte_pair, load_x_halves, load_x_words, nibble_floats,
                                           nibbles_minus_zero, operand_order, pair_constants, pair_floats, stacked, x_pairs,
                                           x_quarters)
from mpq.kernels.triton_w4a16_configs import K_WIDTH, check_k_step, grouped_space, k_step_for, tuner_space
from mpq.kernels.triton_w4a16_scales import ZEROS_PAIRED, group_scale_zero, pairs_loaded_twice, scales_key, zeros_layout


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
    candidates = (lambda: tuner_space(x.shape[0], group_size, k)) if slots is None else (lambda: grouped_space(group_size))
    # prefill's dense route, timed beside the fused configs (kernels/triton_dequant.py)
    dense = (lambda: F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype))) if slots is None and dense_route_fits(x, n, k) else None
    return launch(_w4a16_kernel, x, n, pointers, scalars, meta, config, shape_key=shape_key, candidates=candidates,
                  x_arg=x_arg, dense=dense)
