"""Shared launch helpers for mpq's Triton kernels (imported only when a Triton kernel runs)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from mpq.kernels.split_sums import split_buffers
from mpq.kernels.triton_tuning import choose_config, chosen_config, m_bucket

log = logging.getLogger(__name__)


# Read once: @triton.jit reads it when it decorates the kernels (as this module is imported with
# them), so a later change would not switch them anyway; os.environ took ~2 us a look, twice a launch.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors through numpy."""
    return _INTERPRETING


# Programmatic dependent launch (PDL, Hopper and later): off unless MPQ_PDL=1, until a GPU run has
# timed it (benchmarks/GPU_NOTES.md). Read once, as above; the benchmarks switch it with dependent_launch.
_PDL_WANTED = os.environ.get("MPQ_PDL", "0") == "1"


@contextlib.contextmanager
def dependent_launch(enabled: bool = True):
    """Within the block, whether the layers' launches ask for programmatic dependent launch where
    the device and Triton can (pdl_capable): each program asks L2 for its first weights and waits
    for the kernel ahead of it on the stream to finish before it reads x or writes anything
    (prefetch_then_wait), so its launch and first weight reads overlap that kernel's tail. A CUDA
    graph captured inside keeps the launches' programmatic edges after the block."""
    global _PDL_WANTED
    before, _PDL_WANTED = _PDL_WANTED, enabled
    try:
        yield
    finally:
        _PDL_WANTED = before


@functools.cache
def pdl_capable(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or more, and a Triton with grid dependency control
    (tl.extra.cuda.gdc_wait: 3.6 and 3.9 have it; mpq runs from 3.4). Never the interpreter."""
    from triton.language.extra import cuda

    return (not interpreting() and device.type == "cuda" and hasattr(cuda, "gdc_wait")
            and torch.cuda.get_device_capability(device) >= (9, 0))


def pdl_launch(kernel, x: torch.Tensor, grouped: bool) -> bool:
    """Whether this launch takes PDL: wanted, a capable device, a kernel that takes PDL, one layer (a
    grouped launch reads its rows' experts, which the routing kernel ahead of it writes, before
    it knows which weights to ask for)."""
    return _PDL_WANTED and not grouped and takes_pdl(kernel) and pdl_capable(x.device)


def dot_dtype(x_dtype: torch.dtype):
    """The dtype fed to tl.dot: the activation dtype on a GPU (bf16 for fp32 activations, whose
    range fp16 lacks); fp32 under the interpreter, whose bf16 tl.dot returns garbage (triton 3.6-3.9)."""
    if interpreting():
        return tl.float32
    return tl.float16 if x_dtype == torch.float16 else tl.bfloat16


def regime(m: int) -> str:
    """Decode-sized batches (M <= 16) are memory-bound: split-K GEMV. Larger M: tiled GEMM."""
    return "gemv" if m <= 16 else "gemm"


def block_m_for(m: int) -> int:
    # M == 1 takes the multiply-and-sum path (no tensor cores needed); otherwise tl.dot needs 16+ rows.
    return 1 if m == 1 else 16


def decode_candidates(m: int, k_steps: list[int], dot_k_step: int) -> list[dict]:
    """The decode (M <= 16) launch space both kernels share: tile width, K step and split (1 = no
    atomics), which trade parallelism against atomics and the last program's sum. At M = 1 a few tl.dot configs (15 of
    their 16 rows masked) join the multiply-and-sum ones: the tensor cores do the multiply-adds that
    would otherwise compete with dequantisation for issue slots, and the timer decides which wins
    (INT8's; INT4's tuner drops them where its 8-row tiles turned round serve: triton_w4a16_configs.turned_serves)."""
    space = [{"BLOCK_M": block_m_for(m), "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3}
             for bn in (16, 32, 64, 128) for bk in k_steps for sk in (1, 2, 4, 8)]
    if m == 1:
        space += [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": dot_k_step, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3}
                  for bn in (32, 64, 128) for sk in (1, 2, 4, 8)]
    return space


def few_warp_tiles(tiles: tuple[tuple[int, int, int], ...], **extra) -> list[dict]:
    """16-row decode tiles (BLOCK_N, BLOCK_K, num_warps) on one or two warps, each split 1-16.

    On the H200 (run 2's decode-space sweep: INT4 at M = 1, L2 flushed, one warp not in it) every
    16-row tile of 32 to 128 columns ran faster on 2 warps than on 4 and on 4 than on 8, on all three
    shapes: 16 x 128 x 128 took 32.4 / 36.9 / 48.9 us for 4096 -> 14336, 16 x 64 41.0 / 49.7 / 69.5,
    where the one-warp 8-row tile turned round took 24.9 (wider tiles did not: 16 x 256 x 128 41.4 /
    31.5 / 42.0; benchmarks/results/decode-space-NVIDIA_H200.json). Each warp of a
    tile does the step's activation work (the dot's A operand) for its own columns, so fewer warps
    a tile share it over more columns: with Triton 3.6 for sm_90, INT8's 16 x 32 x 128 takes 3.5
    SASS instructions per weight byte on one warp against 5.5 on four (run 2's choice at M = 1 on
    two shapes), 16 x 64 x 128 3.2 against 4.5; INT4's 16 x 64 x 128 5.7 on one warp, 6.6 on two
    and 8.5 on four, 16 x 128 x 128 5.2 on two against 6.0 on four (benchmarks/kernels_compile.py).

    Up to a split of 16, as the one-warp tiles turned round: a program of fewer warps needs more
    programs to fill the GPU, and in run 2 10 of the 12 decode rows of the layers with 4096 outputs
    (4096 x 4096 and 14336 -> 4096: few column tiles) took the largest split the tuner offered them."""
    return [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": warps, "num_stages": 3, **extra}
            for bn, bk, warps in tiles for sk in (1, 2, 4, 8, 16)]


def prefill_candidates(m: int, k_steps: list[int]) -> list[dict]:
    """The tiled GEMM's launch space (M > 16): tile shape, K step and pipeline depth. Up to 128
    rows, 64-row tiles may also split K over 2 or 4 programs: there a layer has few tiles (M = 64
    of a 4096-wide layer: 64 of them for the H200's 132 SMs), and without a split M = 64 ran at
    0.25-0.38x of FP16 cuBLAS on 4096 and 14336->4096 layers on that GPU (benchmarks/results/
    kernels-NVIDIA_H200-*.json)."""
    space = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "num_warps": w, "num_stages": st}
             for bm, bn, w in ((64, 128, 4), (128, 128, 8), (128, 64, 4)) for bk in k_steps for st in (3, 4)]
    if m <= 128:
        space += [{"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": k_steps[-1], "SPLIT_K": sk, "num_warps": 4, "num_stages": st}
                  for bn in (64, 128) for sk in (2, 4) for st in (3, 4)]
    return space


def turned_prefill_candidates(m: int, k_steps: list[int], square_stages: tuple[int, ...] = (3,)) -> list[dict]:
    """Prefill tiles turned round (TRANSPOSED: out^T = W x^T, the weights the warpgroup MMA's first
    operand, from registers; triton_w4a16.turned_tiles has the why) for the K steps a format allows.
    In K steps of 64: 128 x 128 on 8 warps at each of `square_stages`, and 256 x 128 above 128 rows or
    64 x 128 on 4 warps split 2 and 4 up to 128 (few tiles there: K split for programs). In K steps of
    128, above 128 rows: 128 x 128 on 8 warps (INT4 passes 128 where its groups allow it; triton_w4a16_configs.
    tuner_space has the counts)."""
    tiles = []
    if 64 in k_steps:
        tiles += [(128, 128, 64, 8, 1, st) for st in square_stages]
        tiles += [(256, 128, 64, 8, 1, 3)] if m > 128 else [(64, 128, 64, 4, sk, 3) for sk in (2, 4)]
    if m > 128 and 128 in k_steps:
        tiles += [(128, 128, 128, 8, 1, 3)]
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "num_stages": st,
             "TRANSPOSED": True} for bm, bn, bk, w, sk, st in tiles]


DENSE = {"DENSE": 1}  # the launch config of prefill's dense route (kernels/triton_dequant.py)
# Its 16-bit weight lives for one call; up to an 8192 x 16384 layer. Larger ones keep the fused kernel.
DENSE_MAX_BYTES = 256 << 20


def dense_route_fits(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether a call may take the dense route: prefill (M > 16), 16-bit activations (cuBLAS
    multiplies in their dtype) and a layer whose 16-bit copy stays under DENSE_MAX_BYTES."""
    return regime(x.shape[0]) == "gemm" and x.element_size() == 2 and 2 * n * k <= DENSE_MAX_BYTES


def check_activation(x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"expected x of shape [M, {in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")


def capturing(x: torch.Tensor) -> bool:
    """Whether x's device is capturing a CUDA graph on the current stream (asked only before a
    shape's first choice of launch config, never on the hot path)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def cdiv(a: int, b: int) -> int:
    # not triton.cdiv: a constexpr function in Triton 3.6 and 3.9 (plain in 3.4), whose call from Python unwraps
    # its arguments (about 5 us of host time per launch here, a quarter of the launcher's own)
    return -(-a // b)


def accumulator_fits(config: dict) -> bool:
    """A single-row program on the FMA units (W8A16's and the 16-bit experts') keeps a [BLOCK_K, BLOCK_N]
    fp32 accumulator: beyond 128 values a thread (128 x 256 on 4 warps is 256) the registers spill to
    local memory inside the K loop (kernels_compile.py)."""
    return config["BLOCK_N"] * config["BLOCK_K"] <= 128 * 32 * config["num_warps"]


def grouped_candidates(k_steps: list[int], fits=lambda config: True) -> list[dict]:
    """A grouped launch's space (decode: every program one row of x, on the FMA units): tile width,
    K step and split. Its rows are a few tokens times top-k, over experts whose layers are small
    (Qwen3-30B-A3B's: 768 x 2048), so splitting K is what fills the GPU. `fits` drops configs a
    kernel cannot hold in registers."""
    space = [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3}
             for bn in (64, 128, 256) for bk in k_steps for sk in (1, 2, 4)]
    return [config for config in space if fits(config)]


def check_stacks(x: torch.Tensor, slots: torch.Tensor, stacks: tuple) -> None:
    """A grouped launch's arguments: one int32 slot per row of x, stacks of one expert count (a
    leading dimension over a layer's tensors: [E, N, K] weights, [E, N] per-channel scales)."""
    if slots.dtype != torch.int32 or slots.shape != (x.shape[0],) or not slots.is_contiguous():
        raise ValueError(f"slots must be a contiguous int32 vector of one slot per row of x ({x.shape[0]}), got "
                         f"{slots.dtype} {tuple(slots.shape)}")
    experts = {t.shape[0] for t in stacks if t is not None}
    if stacks[0].dim() != 3 or any(t is not None and t.dim() < 2 for t in stacks) or len(experts) != 1:
        raise ValueError(f"expected stacked [experts, ...] weights, got shapes {[tuple(t.shape) for t in stacks if t is not None]}")


def check_grouped_config(config: dict | None, slots: torch.Tensor | None) -> None:
    if config is not None and slots is not None and config.get("BLOCK_M") != 1:
        raise ValueError(f"a grouped launch runs one row of x per program: BLOCK_M must be 1, got {config}")


def interpreter_config(m: int, k_step: int, grouped: bool = False) -> dict:
    """One fixed config under the interpreter, where autotuning every config would take minutes.

    Wide tiles: the interpreter runs programs one after another at a fixed Python cost each, so a
    model run through it takes time in proportion to the programs (the demo's all-INT4 config,
    prefill and decode checked: 119 s at 32 columns a program, 19 s at 256). The kernels' narrow
    and many-program tilings are the kernel tests' pinned configs."""
    if grouped:
        return {"BLOCK_M": 1, "BLOCK_N": 256, "BLOCK_K": k_step, "SPLIT_K": 2}
    if regime(m) == "gemv":
        return {"BLOCK_M": block_m_for(m), "BLOCK_N": 256, "BLOCK_K": k_step, "SPLIT_K": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": k_step, "SPLIT_K": 1}


def _grid_and_arguments(kernel, x: torch.Tensor, n: int, pointers: tuple, scalars: tuple, meta: dict, config: dict,
                        x_arg: torch.Tensor | None, out: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """The grid, positional and keyword arguments of one launch (run_config's layout)."""
    grid = (cdiv(x.shape[0], config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
    if config["SPLIT_K"] > 1:  # sized for the M bucket, so a later call of it (a graph's, say) fits
        rows = m_bucket(x.shape[0])
        sums, counts = split_buffers(x, rows * n, cdiv(rows, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]))
    else:  # unread
        sums, counts = out, out
    arguments = (x if x_arg is None else x_arg, *pointers, out, *scalars, out.stride(0), sums, counts)
    keywords = {**meta, "ATOMIC": config["SPLIT_K"] > 1, "DOT_DTYPE": dot_dtype(x.dtype), **config}
    if "num_stages" in config and takes_stages(kernel):
        keywords["STAGES"] = config["num_stages"]  # without one, the kernel's default (Triton's, 3)
    if pdl_launch(kernel, x, meta.get("GROUPED", False)):
        keywords.update(PDL=True, launch_pdl=True)  # the kernel's waits, and Triton's launch attribute
    return grid, arguments, keywords


@functools.cache
def takes_stages(kernel) -> bool:
    """Whether a kernel writes its K loop as tl.range(..., num_stages=STAGES), which then takes the
    launch's num_stages: Triton's pipeline takes every load of such a loop (W4A16's scales), not
    only those that feed a tl.dot. Asked once per kernel: a launch must not search its argument
    names (eager decode is host-bound)."""
    return "STAGES" in getattr(kernel, "arg_names", ())


@functools.cache
def takes_pdl(kernel) -> bool:
    """Whether a kernel has the PDL constexpr (prefetch_then_wait and launch_dependents in it)."""
    return "PDL" in getattr(kernel, "arg_names", ())


def run_config(kernel, x: torch.Tensor, n: int, pointers: tuple, scalars: tuple, meta: dict,
               config: dict, x_arg: torch.Tensor | None = None) -> torch.Tensor:
    """Allocate the output and launch one config.

    Kernels take (x, *pointers, out, *scalars, stride of out, sums, counts, **meta); `x_arg`
    replaces x there when a kernel reads it through another view (W4A16's int32 pairs). A config
    with SPLIT_K > 1 meets its partial sums in `sums` and `counts` (kernels/split_sums.py), and its
    last program per tile stores the tile; either way one launch writes the output in the
    activation dtype.
    """
    out = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    grid, arguments, keywords = _grid_and_arguments(kernel, x, n, pointers, scalars, meta, config, x_arg, out)
    kernel[grid](*arguments, **keywords)
    return out


def compile_config(kernel, x: torch.Tensor, n: int, pointers: tuple, scalars: tuple, meta: dict,
                   config: dict, x_arg: torch.Tensor | None = None) -> None:
    """Compile the kernel as run_config would launch it, without running it (Triton's warmup:
    the same specialisation and cache entry as the launch, so the launch then finds it compiled)."""
    out = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    grid, arguments, keywords = _grid_and_arguments(kernel, x, n, pointers, scalars, meta, config, x_arg, out)
    # The device is per thread in CUDA; Triton files the kernel under the current one.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel.warmup(*arguments, grid=grid, **keywords)


def launch(kernel, x: torch.Tensor, n: int, pointers: tuple, scalars: tuple, meta: dict, config: dict | None,
           shape_key: tuple, candidates: Callable[[], list[dict]], x_arg: torch.Tensor | None = None,
           dense: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Run `config` when pinned, else the fastest of `candidates()` for this shape (compiled in
    parallel, then timed, on first use). The list is built only then: building it on every call
    cost ~10 us of host time per layer. `dense`, where given (prefill), is one more candidate, the
    config {"DENSE": 1}: the layer dequantised to 16 bits, then cuBLAS (kernels/triton_dequant.py)."""
    if config is None:
        m = x.shape[0]
        key = (kernel.__name__, regime(m), m_bucket(m), n, *shape_key, x.dtype, x.device)

        def run(c: dict) -> torch.Tensor:
            return dense() if c.get("DENSE") else run_config(kernel, x, n, pointers, scalars, meta, c, x_arg)

        def compile_one(c: dict) -> None:
            if not c.get("DENSE"):  # the dense route's kernel compiles when it is first timed
                compile_config(kernel, x, n, pointers, scalars, meta, c, x_arg)

        config = chosen_config(key)
        if config is None and capturing(x):
            # Timing launches syncs the device, which a CUDA graph capture refuses: run the first
            # candidate untimed, keep nothing, and tune on the first call outside a capture.
            config = candidates()[0]
            log.warning("%s: no launch config chosen yet for this shape while a CUDA graph is captured; running %s "
                        "untuned (run one call before capturing to time the candidates)", kernel.__name__, config)
        config = config or choose_config(
            key, candidates() + ([DENSE] if dense is not None else []), run,
            compile_one=None if interpreting() else compile_one)
    if config.get("DENSE"):
        if dense is None:
            raise ValueError("the dense route (DENSE) was asked for a call that cannot take it: 16-bit activations, "
                             f"more than 16 rows, one layer of at most {DENSE_MAX_BYTES >> 20} MiB in 16 bits")
        return dense()
    return run_config(kernel, x, n, pointers, scalars, meta, config, x_arg)


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of the output tile this program owns (grid axis 0 walks N fastest)."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


# Passes of weights a program asks L2 for before its wait: a pipelined loop has num_stages - 1 = 2
# in flight once it runs; the first two then come from L2. Untimed (no GPU since PDL was written).
PDL_PREFETCH_PASSES = tl.constexpr(2)


@triton.jit
def prefetch_then_wait(w_ptr, offs_n, mask_n, stride_wn, row_bytes, first_byte, pass_stride, SPAN: tl.constexpr,
                       PASSES: tl.constexpr):
    """Under PDL, before anything that the kernel ahead may be writing is read or anything written:
    ask L2 for the first PASSES passes (SPAN bytes a column, pass_stride apart from first_byte) of
    this program's weight rows, then wait for the kernel ahead (gdc_wait: it has finished and its
    writes are visible). The weights are a layer's, written at load time, and a prefetch into L2
    cannot bring a stale line (L2 is where the GPU's writes land), so asking early changes no
    result; x, the sums and the output all come after the wait. Addresses are clamped inside the
    weight (a pass past K asks for the row's last line; a masked column for row 0)."""
    LINES: tl.constexpr = SPAN // 128 if SPAN > 128 else 1  # a prefetch brings a 128-byte line
    row = tl.where(mask_n, offs_n, 0).to(tl.int64) * stride_wn
    offsets = (first_byte + tl.arange(0, PASSES)[:, None] * pass_stride + tl.arange(0, LINES)[None, :] * 128)
    offsets = tl.minimum(offsets, row_bytes - 1)
    lines = w_ptr.to(tl.pointer_type(tl.int8)) + row[:, None, None] + offsets[None, :, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                              is_pure=False, pack=1)
    tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents():
    """Under PDL, once this program's K loop is done: the kernel behind may launch (its programs
    then prefetch and wait) while this one stores its tile. Placed after the loop so that the
    waiting programs of the next kernel do not hold SMs that this kernel's own programs need."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def grouped_row(slot_ptr, M, N, BLOCK_N: tl.constexpr):
    """A grouped launch's program: its row of x (one token routed to one expert; BLOCK_M = 1), the
    row and columns of the output it owns, their mask, and the stack slot of that row's expert. The
    mask is off where the slot is -1 (an expert another stack holds): its loads read nothing and
    its row comes out 0. The rows run fastest through the grid: rows sorted by
    expert then read each of an expert's column tiles back to back, from L2 after the first."""
    pid = tl.program_id(0)
    pair = pid % M
    offs_m = pair + tl.arange(0, 1)
    offs_n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slot_ptr + pair)
    mine = (slot + tl.zeros((BLOCK_N,), tl.int32)) >= 0  # a column mask (a scalar one trips the interpreter)
    return pair, offs_m, offs_n, (offs_n < N) & mine, tl.maximum(slot, 0).to(tl.int64)


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, sums_ptr, counts_ptr, ATOMIC: tl.constexpr,
               SPLIT_K: tl.constexpr):
    """Write the fp32 tile to the output, cast. Under split-K (ATOMIC) the SPLIT_K programs of a
    tile add theirs into `sums` (zeroed, [M, N] as the output) and count themselves in on the
    tile's counter; the last to count stores the total and zeroes the sums and the counter for the
    next call (kernels/split_sums.py). The adds are relaxed, as partial sums need no order among
    themselves; the count orders them: a barrier puts all of a program's adds before its count,
    which releases them at the GPU's scope and, for the last program, acquires everyone's."""
    offsets = offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(sums_ptr + offsets, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        counted = tl.atomic_add(counts_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if counted == SPLIT_K - 1:
            total = tl.load(sums_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offsets, rounded(total, out_ptr.dtype.element_ty), mask=mask)
            tl.store(sums_ptr + offsets, tl.zeros_like(total), mask=mask)
            tl.store(counts_ptr + tl.program_id(0), 0)
    else:
        tl.store(out_ptr + offsets, rounded(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rounded(values, dtype: tl.constexpr):
    """fp32 values in `dtype`, rounded to nearest (ties to even). For bf16 by integer steps: Triton's
    interpreter truncates an fp32 -> bf16 cast (3.6-3.9, with or without fp_downcast_rounding="rtne"),
    a relative error of up to 2^-8 a value that, through a mixture's two layers, took its smoke test
    over 1e-2 once split-K cast in the kernel instead of in torch; a GPU rounds either way. (NaNs stay
    NaNs: arithmetic makes only quiet ones, whose top mantissa bit the carry cannot reach past.)"""
    if dtype == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = values.to(dtype)
    return result
