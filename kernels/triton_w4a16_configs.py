"""Which launch configs W4A16's tuner times on a layer's first call, and the facts about a config
the kernel and the benchmarks share (its path, its K steps).

The space is small on purpose: each candidate is compiled and timed on every layer shape's first
call (benchmarks/first_call.py), so a config stays only where a measurement (the H200 runs in
benchmarks/GPU_NOTES.md) or the compiler's count of its K loop (benchmarks/kernels_compile.py) says
it can win. decode_space is INT4's whole decode space, which the decode-space sweep
(benchmarks/gpu_decode_space.py) crosses; tuner_space leaves out of it what turned_serves says the
8-row tiles turned round do better. The kernel and its paths are in kernels/triton_w4a16.py.
"""

from __future__ import annotations

import triton

from mpq.kernels.triton_common import (decode_candidates, few_warp_tiles, grouped_candidates, prefill_candidates, regime,
                                       turned_prefill_candidates)


def tuner_space(m: int, group: int, k: int) -> list[dict]:
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
    tuner_space leaves them out (turned_serves); gpu_decode_space.py sweeps it whole."""
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
        # a step reads 64 (what STACK 4 does over 4 warps, which Triton 3.6 compiles badly), for 4.1
        # instructions per weight byte at 64 wide against 4.3 a step a pass (Triton 3.6 and 3.9), in 8
        # programs an SM against 14. Not 128 wide: at 255 registers it spills in its loop (3 local
        # loads a pass with Triton 3.6, 6 with 3.9, 15-25 for a symmetric layer; kernels_compile.py)
        # to save 1% of the one-step tile's instructions, and on the H200 the one-step tiles 128 wide
        # lost to 64 wide on all three shapes of run 2's M = 1 sweep (14.1 / 26.0 / 30.7 us against
        # 13.5 / 24.9 / 29.8), where all 7 turned rows the tuner chose were 64 wide.
        if 1 in TURNED_STACKS and k % 256 == 0:
            space += [{"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": 1, "num_stages": 3,
                       "TRANSPOSED": True, "STACK": 1, "STEPS": 2} for sk in (1, 2, 4, 8)]
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


def grouped_space(group: int) -> list[dict]:
    """A stack of experts' configs (grouped_candidates) in the K steps its groups allow."""
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
