"""Compile every launch config the kernels would time on a GPU, for a GPU, on any machine.

The interpreter tests prove the kernels' arithmetic but accept programs a GPU compiler rejects
(tl.dot under 16 rows, more shared memory than a block may have). This script sends each
candidate config of each regime through Triton's real compiler down to a cubin (ptxas included),
specialised as a launch specialises it (pointers and multiples of 16 marked aligned, an M of 1 a
constant), for a target such as sm_90 (H100/H200), and reads the PTX for what the design relies
on: tensor cores in the tl.dot paths, atomics exactly when split-K, weight bytes loaded several
at a time, the shared memory each config needs, and no register spills in the K loop; and from
the cubin (cuobjdump) its registers a thread and so how many of its programs an SM holds at once
(programs_per_sm, and whether registers, shared memory, warps or blocks bound it). It also
disassembles each cubin (nvdisasm, bundled with Triton) and counts the instructions in the K loop per weight byte a thread reads:
decode is memory-bound only while the SMs can issue that many instructions in the time the
memory delivers the byte (an H100 SXM issues about 3.3e13 thread-instructions a second, 132 SMs
x 128 lanes x 1.98 GHz, against 3.35e12 B/s of HBM: about 10 per byte is where the two cross).
No GPU is needed. Prints a table, writes JSON.

    python benchmarks/kernels_compile.py                  # sm_90, Llama 4096x4096 INT4-g128 / INT8
    python benchmarks/kernels_compile.py --arch 80        # an A100
    python benchmarks/kernels_compile.py --group 32 --activations fp32 --symmetric --batches 1
    python benchmarks/kernels_compile.py --batches 1,16 --byte-path   # INT4 tensor-core decode widening bytes
    python benchmarks/kernels_compile.py --batches 16 --words-as-loaded  # word_dots without operand_order

mpq runs its kernels with Triton 3.4 or newer (mpq.qlinear.TRITON_MIN); to check another version,
run this script in a venv that has it (older Triton's interpreter needs numpy < 2.4 for the tests):
    pip install triton==3.4.0 'numpy<2.4' && python benchmarks/kernels_compile.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, whatever the caller's environment says
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mpq.kernels import triton_dense_grouped, triton_w4a16, triton_w8a16  # noqa: E402
from mpq.kernels import triton_w4a16_configs as w4_configs  # noqa: E402
from mpq.kernels.triton_w4a16_scales import ZEROS_PAIRED  # noqa: E402
from mpq.kernels.triton_tuning import usable_cores  # noqa: E402
from sass_reading import (INSTRUCTION, MMA_A_IN_REGISTERS, dependent_launch_order, k_loop, load_waits,  # noqa: E402
                          mma_in_flight, opcode_counts)

GROUPED_ROWS = 8  # the grouped kernels' rows: (token, expert) pairs
SHARED_LIMIT = {90: 232448, 89: 101376, 86: 101376, 80: 166912}  # bytes of dynamic shared memory per block
# What one SM holds, by compute capability (CUDA's occupancy rules): 32-bit registers, shared memory
# (each block also takes RESERVED_SHARED), warps, blocks
SM_LIMITS = {90: {"registers": 65536, "shared": 233472, "warps": 64, "blocks": 32},
             89: {"registers": 65536, "shared": 102400, "warps": 48, "blocks": 24},
             86: {"registers": 65536, "shared": 102400, "warps": 48, "blocks": 16},
             80: {"registers": 65536, "shared": 167936, "warps": 64, "blocks": 32}}
RESERVED_SHARED = 1024
REGISTER_UNIT = 256  # registers are given to a warp in blocks of 256 (8 a thread)
LOADS = re.compile(r"\b(?:ld\.global|cp\.async\.c[ag]|atom|red|mma|wgmma)[\w.]*")


def compile_for(kernel, runtime: dict[str, tuple[str, int]], constexprs: dict, num_warps: int, num_stages: int,
                arch: int, launch_pdl: bool = False):
    """triton.compile for cuda sm_`arch` without a GPU. `runtime`: argument -> (Triton type, value);
    `launch_pdl`: Triton's option for a launch with programmatic dependent launch, as the launcher
    passes it with PDL (triton_common._grid_and_arguments)."""
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name not in constexprs and name not in runtime:  # a constexpr the launch leaves at its default
            constexprs = {**constexprs, name: kernel.params[index].default}
        if name in constexprs or (runtime[name][0].startswith("i") and runtime[name][1] == 1):
            signature[name] = "constexpr"
            constants[(index,)] = constexprs.get(name, 1)
            continue
        kind, value = runtime[name]
        signature[name] = kind
        if kind.startswith("*") or value % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"launch_pdl": True} if launch_pdl else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def cubin_tool(tool: str, option: str, cubin: bytes) -> str:
    """What one of the CUDA tools bundled with Triton (beside its nvdisasm: nvdisasm, cuobjdump)
    prints for a cubin."""
    path = Path(triton.knobs.nvidia.nvdisasm.path).with_name(tool)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(path), option, file.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> list[str]:
    """The SASS lines of a cubin (nvdisasm)."""
    return cubin_tool("nvdisasm", "-c", cubin).splitlines()


def resource_usage(cubin: bytes) -> dict[str, int]:
    """What the cubin's kernel asks of an SM, as cuobjdump reports it: registers a thread (REG),
    static shared memory (SHARED), local memory a thread (LOCAL: spills), in bytes."""
    text = cubin_tool("cuobjdump", "-res-usage", cubin)
    return {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL):(\d+)", text.split("Function", 1)[-1])}


def programs_per_sm(registers: int, shared: int, num_warps: int, arch: int) -> tuple[int, str]:
    """How many programs (blocks) of a kernel one SM holds at once, and which resource bounds it:
    `registers` a thread, `shared` bytes a block (dynamic and static). Fewer warps a scheduler
    leave fewer to issue while one waits (on memory, or on its own MMAs and shared loads)."""
    limits = SM_LIMITS.get(arch, SM_LIMITS[80])
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    bounds = {"blocks": limits["blocks"], "warps": limits["warps"] // num_warps,
              "registers": limits["registers"] // (per_warp * num_warps) if registers else limits["blocks"],
              "shared": limits["shared"] // (shared + RESERVED_SHARED)}
    bound = min(bounds, key=bounds.get)
    return bounds[bound], bound


def weight_bytes_per_thread(name: str, config: dict) -> float:
    """Weight bytes one thread reads per pass of the K loop (one K step, or STACK x STEPS of them)."""
    per_column = {"w4a16": config["BLOCK_K"] // 2, "w8a16": config["BLOCK_K"], "dense": 2 * config["BLOCK_K"]}[
        name.split("-")[0]]
    # a TRANSPOSED INT4 tile runs STACK K steps a pass, one a warp, and each warp STEPS of them
    return config["BLOCK_N"] * per_column * config.get("STACK", 1) * config.get("STEPS", 1) / (32 * config["num_warps"])


DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def compile_candidate(name: str, m: int, config: dict, n: int, k: int, group: int, arch: int,
                      activations: str = "bf16", symmetric: bool = False) -> dict:
    """One launch config, specialised as w4a16_linear / w8a16_linear would launch it for these
    activations (16-bit ones reach W4A16 as int32 pairs) and weights (zero points or symmetric);
    a name ending in -grouped: as w4a16_grouped / w8a16_grouped would, over stacked experts
    (dense-grouped: dense_grouped's 16-bit experts, bf16 weights)."""
    tiles = {key: value for key, value in config.items() if key.isupper()}
    atomic = tiles["SPLIT_K"] > 1
    int4, dense = name.startswith("w4a16"), name.startswith("dense")
    grouped = name.endswith("-grouped")
    pairs = int4 and activations != "fp32"
    row_bytes = k // 2 if int4 else k  # strides count elements: an int8 or a 16-bit weight is one
    runtime = {"x_ptr": ("*i32" if pairs else f"*{activations}", 0),
               "w_ptr": ("*bf16" if dense else "*u8" if int4 else "*i8", 0),
               "s_ptr": ("*bf16", 0), "z_ptr": ("*bf16", 0), "slot_ptr": ("*i32" if grouped else "*bf16", 0),
               "out_ptr": (f"*{activations}", 0), "sums_ptr": ("*fp32", 0), "counts_ptr": ("*i32", 0),
               "M": ("i32", m), "N": ("i32", n), "K": ("i32", k),
               "stride_xm": ("i32", k // 2 if pairs else k), "stride_wn": ("i32", row_bytes),
               # a Triton layer keeps its scales and zeros column-major, each zero point right after its scale where
               # it has them (mpq/qlinear.py: scale_zero_pairs), a stack of experts row-major
               "stride_sn": ("i32", k // group if grouped else 1 if symmetric else 2),
               "stride_sg": ("i32", 1 if grouped else n if symmetric else 2 * n),
               "stride_om": ("i32", n),
               "stride_we": ("i32", n * row_bytes if grouped else 0),
               "stride_se": ("i32", (n * k // group if int4 else n) if grouped else 0)}
    half = DTYPES["fp16" if activations == "fp16" else "bf16"]  # the tensor cores' dtype (fp32 x goes as bf16)
    constexprs = {**tiles, "ATOMIC": atomic, "DOT_DTYPE": half, "GROUPED": grouped}
    if int4:
        constexprs.update(GROUP=group, HAS_ZEROS=0 if symmetric else 1 if grouped else ZEROS_PAIRED, X_PAIRS=pairs,
                          X_DTYPE=DTYPES[activations])
        constexprs.setdefault("K_WIDTH", w4_configs.K_WIDTH)  # as the launcher passes it, unless the config pins it
        constexprs["STAGES"] = config["num_stages"]  # as the launcher passes it (triton_common.takes_stages)
    kernel = (triton_dense_grouped._dense_grouped_kernel if dense else triton_w4a16._w4a16_kernel if int4
              else triton_w8a16._w8a16_kernel)
    row = {"kernel": name, "M": m, "config": config}
    try:
        compiled = compile_for(kernel, runtime, constexprs, config["num_warps"], config["num_stages"], arch,
                               launch_pdl=config.get("PDL", False))
    except Exception as error:  # noqa: BLE001 - a config the compiler refuses is a finding, not a crash
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    ops = Counter(LOADS.findall(compiled.asm["ptx"]))
    sass = disassemble(compiled.asm["cubin"])
    loop_lines = k_loop(sass)
    loop = opcode_counts(loop_lines)
    per_byte = sum(loop.values()) / weight_bytes_per_thread(name, config) if loop else None
    usage = resource_usage(compiled.asm["cubin"])
    resident, bound = programs_per_sm(usage.get("REG", 0), compiled.metadata.shared + usage.get("SHARED", 0),
                                      config["num_warps"], arch)
    return {**row, "cubin": "cubin" in compiled.asm, "shared": compiled.metadata.shared, "ops": dict(ops),
            "registers": usage.get("REG"), "programs_per_sm": resident, "occupancy_bound": bound,
            "loop_instructions": sum(loop.values()), "loop_opcodes": dict(loop.most_common()),
            "instructions_per_weight_byte": per_byte, "load_waits": load_waits(loop_lines),
            "mma_in_flight": mma_in_flight(loop_lines),
            "tensor_cores": any(op.startswith(("mma", "wgmma")) for op in ops),
            "mma_a_from_registers": any(MMA_A_IN_REGISTERS.search(line) for line in loop_lines),
            "atomics": any(op.startswith(("atom", "red")) for op in ops),
            "byte_loads": any(op.startswith(("ld.global.b8", "ld.global.u8", "ld.global.s8")) for op in ops),
            **({"dependent_launch": {**dependent_launch_order(sass), "launch_pdl": compiled.metadata.launch_pdl}}
               if config.get("PDL") else {})}


def compile_dequant(name: str, n: int, k: int, group: int, arch: int, activations: str = "bf16",
                    symmetric: bool = False) -> dict:
    """Prefill's dense route (kernels/triton_dequant.py): its dequantisation kernel for one format,
    specialised as dequantize_int4 / dequantize_int8 launch it, writing 16-bit weights (bf16 for
    fp32 activations, which never take the route). Counts the SASS per weight written: the kernel
    has no loop, so every instruction of the program."""
    from mpq.kernels import triton_dequant

    int4 = name.startswith("w4a16")
    half = "fp16" if activations == "fp16" else "bf16"
    runtime = {"w_ptr": ("*u8" if int4 else "*i8", 0), "s_ptr": ("*bf16", 0), "z_ptr": ("*bf16", 0),
               "out_ptr": (f"*{half}", 0), "N": ("i32", n), "K": ("i32", k),
               "stride_wn": ("i32", k // 2 if int4 else k),
               "stride_sn": ("i32", 1 if int4 else 0), "stride_sg": ("i32", n if int4 else 0)}  # INT4: column-major
    block_k = triton_dequant.k_step(group if int4 else None)
    constexprs = {"INT4": int4, "GROUP": group if int4 else 1, "HAS_ZEROS": int4 and not symmetric,
                  "BLOCK_N": triton_dequant.BLOCK_ROWS, "BLOCK_K": block_k}
    row = {"kernel": name, "config": {"BLOCK_N": triton_dequant.BLOCK_ROWS, "BLOCK_K": block_k}}
    try:
        compiled = compile_for(triton_dequant._dequant_kernel, runtime, constexprs, 4, 1, arch)
    except Exception as error:  # noqa: BLE001 - reported as the row's problem
        return {**row, "problems": [f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"]}
    ptx = compiled.asm["ptx"]
    instructions = sum(1 for line in disassemble(compiled.asm["cubin"]) if INSTRUCTION.search(line))
    found = []
    if not re.search(r"\bst\.global\.v4", ptx):
        found.append("16-bit weights not stored 16 bytes at a time")
    if re.search(r"\bld\.global\.[us]8", ptx):
        found.append("weights loaded one byte at a time")
    return {**row, "instructions_per_weight": instructions / (triton_dequant.BLOCK_ROWS * block_k / 128),
            "problems": found}


def problems(row: dict, arch: int) -> list[str]:
    """What would break or undo the design on that GPU."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row["shared"] > SHARED_LIMIT.get(arch, SHARED_LIMIT[80]):
        found.append(f"needs {row['shared']} B of shared memory")
    if row["tensor_cores"] != (row["config"]["BLOCK_M"] > 1):
        found.append("tensor cores " + ("unused on a tl.dot path" if row["config"]["BLOCK_M"] > 1 else "on the M = 1 path"))
    if row["atomics"] != (row["config"]["SPLIT_K"] > 1):
        found.append("atomics " + ("missing under split-K" if row["config"]["SPLIT_K"] > 1 else "without split-K"))
    if row["atomics"] and not any(op.startswith("atom.global.gpu.acq_rel") for op in row["ops"]):
        # the count that orders a tile's partial sums before its last program reads them (store_tile)
        found.append("split-K's count is not an acquire-release atomic at the GPU's scope")
    if row["byte_loads"]:
        found.append("weights loaded one byte at a time")
    local = row["loop_opcodes"].get("LDL", 0) + row["loop_opcodes"].get("STL", 0)
    if local > 8:  # a reloaded loop constant or two is cheap; a spilled accumulator costs one per element
        found.append(f"{local} local-memory (register spill) instructions in the K loop")
    if not row["cubin"]:
        found.append("no cubin")
    if not row["loop_instructions"]:
        found.append("no K loop found in the SASS")
    if "dependent_launch" in row:
        order = row["dependent_launch"]
        if not (order["waits"] and order["prefetches_before_wait"] and order["launches_dependents_after_wait"]
                and order["launch_pdl"]):
            found.append(f"PDL: a wait, prefetches before it, dependents launched after it and Triton's launch_pdl "
                         f"expected, got {order}")
        if order["memory_before_wait"]:
            found.append(f"PDL: {order['memory_before_wait']} before the wait for the kernel ahead")
    return found


def dependent_launch_samples(jobs: list[tuple]) -> list[tuple]:
    """One launch of each code path (kernel, M and the config's path: single row, loading ahead or
    pipelined, with long steps or not; 16-row tiles or turned round, how many warps along K and K
    steps a pass; word tiles or bytes; split or not), compiled again with PDL (MPQ_PDL=1) for dependent_launch_order. Not the grouped launches, which
    never take it (triton_common.pdl_launch)."""
    seen, samples = set(), []
    for name, m, config, *rest in jobs:
        if name.endswith("-grouped"):
            continue
        group = rest[2]
        path = (name, m, config["BLOCK_M"] == 1, config.get("PREFETCH", False), config.get("PIPELINE", False),
                name.startswith("w4a16") and w4_configs.long_steps(config, group), config.get("TRANSPOSED", False),
                config.get("STACK", 1), config.get("STEPS", 1), config.get("WORD_DOTS", True), config["SPLIT_K"] > 1)
        if path not in seen:
            seen.add(path)
            samples.append((name, m, {**config, "PDL": True}, *rest))
    return samples


def smallest_splits(jobs: list[tuple]) -> list[tuple]:
    """The jobs less each config that differs from another only in a larger split of K (SPLIT_K > 1).
    A split is a constant of the loop's stride and of the store: in every family of this script's
    full runs (kernels-compile-sm90*.json) the splits' K loops take the same instructions, except a
    few whose shorter trip counts unroll differently (within 11%), with registers within 2 and the
    same shared memory, so the smallest stands for the others where compile time counts (the tests)."""
    family = lambda job: (job[0], job[1], json.dumps({key: value for key, value in job[2].items() if key != "SPLIT_K"},
                                                     sort_keys=True))
    smallest: dict[tuple, int] = {}
    for job in jobs:
        if job[2]["SPLIT_K"] > 1:
            smallest[family(job)] = min(job[2]["SPLIT_K"], smallest.get(family(job), job[2]["SPLIT_K"]))
    return [job for job in jobs if job[2]["SPLIT_K"] == 1 or job[2]["SPLIT_K"] == smallest[family(job)]]


def leanest_loops(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (kernel, M): the config whose K loop spends the fewest instructions per weight byte."""
    best: dict[tuple[str, int], dict] = {}
    for row in rows:
        if row.get("instructions_per_weight_byte") is None:
            continue
        key = (row["kernel"], row["M"])
        if key not in best or row["instructions_per_weight_byte"] < best[key]["instructions_per_weight_byte"]:
            best[key] = row
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--batches", default="1,16,64,512",
                        help="values of M: one per code path (M = 1, tl.dot gemv, gemm; 512: the tiles kept for over 128 rows)")
    parser.add_argument("--group", type=int, default=128, help="INT4 group size (32, 64, 128)")
    parser.add_argument("--activations", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--symmetric", action="store_true", help="INT4 without zero points")
    parser.add_argument("--byte-path", action="store_true",
                        help="INT4's tensor-core decode configs on the byte path (WORD_DOTS=False), to compare with word_dots "
                             "(only INT4's decode configs are compiled)")
    parser.add_argument("--words-as-loaded", action="store_true",
                        help="INT4's tensor-core decode configs with each step's words in the order loaded (K_WIDTH=0), "
                             "to compare with the operand order the launcher asks for (only INT4's decode configs are compiled)")
    parser.add_argument("--one-split", action="store_true",
                        help="of the configs that differ only in a split of K over 2 or more programs, compile the smallest "
                             "split alone (the tests' run: a larger split changes only the loop's stride)")
    parser.add_argument("--jobs", type=int, default=usable_cores(), help="configs compiled at once (default: one per core this process may use)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    n, k, group = 4096, 4096, args.group
    start = time.perf_counter()
    decode_int4 = {"WORD_DOTS": False} if args.byte_path else {"K_WIDTH": 0} if args.words_as_loaded else {}
    # A comparison mode compiles only what it changes, INT4's decode configs; a plain run, every kernel's.
    comparing = bool(decode_int4)
    jobs = [(name, m, {**config, **decode_int4} if name == "w4a16" and m <= 16 else config,
             n, k, group, args.arch, args.activations, args.symmetric)
            for name in ("w4a16",) + (() if comparing else ("w8a16",)) for m in map(int, args.batches.split(","))
            if not comparing or m <= 16
            # (a comparison compiles INT4's whole decode space: the 16-row tiles its tuner leaves out up to 8 rows too)
            for config in (triton_w8a16.tuner_space(m) if name == "w8a16" else
                           w4_configs.decode_space(m, group, k) if comparing else w4_configs.tuner_space(m, group, k))
            if not (args.byte_path and config.get("STEPS", 1) > 1)]  # several steps a pass: int32 words only
    every_split = len(jobs)
    if args.one_split:
        jobs = smallest_splits(jobs)
    left_out_splits = every_split - len(jobs)
    # a mixture's experts at decode: top-8 routes of one token, one row each, in one launch per format
    grouped = {} if comparing else {"w4a16": w4_configs.grouped_space(group),
                                    "w8a16": triton_w8a16.grouped_space(), "dense": triton_dense_grouped.grouped_space()}
    jobs += [(f"{name}-grouped", GROUPED_ROWS, config, n, k, group, args.arch, args.activations, args.symmetric)
             for name, configs in grouped.items() for config in configs]
    # Each config compiles on its own (Triton's passes, then ptxas and nvdisasm): one process per core.
    # PDL only from sm_90 (griddepcontrol; triton_common.pdl_capable), so an A100's launches never take it
    pdl_jobs = [] if comparing or args.arch < 90 else dependent_launch_samples(jobs)
    workers = max(1, min(args.jobs, len(jobs)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(compile_candidate, *zip(*jobs)))
        pdl_rows = list(pool.map(compile_candidate, *zip(*pdl_jobs))) if pdl_jobs else []
    for row in rows + pdl_rows:
        row["problems"] = problems(row, args.arch)
    dequant = [] if comparing else [compile_dequant(name, n, k, group, args.arch, args.activations, args.symmetric)
                                    for name in ("w4a16-dequant", "w8a16-dequant")]
    print(f"# sm_{args.arch}, {n}x{k}, INT4 group {group}{' symmetric' if args.symmetric else ''}, {args.activations} "
          f"activations: {len(rows)} configs compiled in {time.perf_counter() - start:.0f} s ({workers} processes)")
    print("| kernel | M | BLOCK M/N/K | split | warps/stages | shared B | registers | programs / SM (bound) | tensor cores | "
          "atomics | loop instr / weight B | problems |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        per_byte = r.get("instructions_per_weight_byte")
        resident = f"{r['programs_per_sm']} ({r['occupancy_bound']})" if "programs_per_sm" in r else "-"
        print(f"| {r['kernel']} | {r['M']} | {c['BLOCK_M']}/{c['BLOCK_N']}/{c['BLOCK_K']} | {c['SPLIT_K']} | "
              f"{c['num_warps']}/{c['num_stages']} | {r.get('shared', '-')} | {r.get('registers', '-')} | {resident} | "
              f"{r.get('tensor_cores', '-')} | {r.get('atomics', '-')} | {'-' if per_byte is None else f'{per_byte:.2f}'} | "
              f"{'; '.join(r['problems']) or '-'} |")
    for r in dequant:
        print(f"\n{r['kernel']} (prefill's dense route): "
              + (f"{r['instructions_per_weight']:.1f} instructions per 16-bit weight written; " if "instructions_per_weight" in r else "")
              + ("; ".join(r["problems"]) or "no problems"))
    if pdl_rows:
        bad_pdl = [r for r in pdl_rows if r["problems"]]
        print(f"\nWith PDL (MPQ_PDL=1), one config per code path: {len(pdl_rows)} compiled; L2 prefetch instructions before the wait "
              f"{min(r.get('dependent_launch', {}).get('prefetches_before_wait', 0) for r in pdl_rows)} to "
              f"{max(r.get('dependent_launch', {}).get('prefetches_before_wait', 0) for r in pdl_rows)}; "
              + ("; ".join(f"{r['kernel']} M={r['M']} {r['config']}: {'; '.join(r['problems'])}" for r in bad_pdl)
                 or "no memory instruction before it, dependents launched after it in every one"))
    print("\nLeanest K loop per kernel and M (instructions per weight byte, per thread):")
    for (kernel, m), r in leanest_loops(rows).items():
        c = r["config"]
        print(f"  {kernel} M={m}: {r['instructions_per_weight_byte']:.2f} with BLOCK {c['BLOCK_M']}/{c['BLOCK_N']}/"
              f"{c['BLOCK_K']}, split {c['SPLIT_K']}")
    args.out.mkdir(parents=True, exist_ok=True)
    variant = "" if (group, args.activations, args.symmetric) == (128, "bf16", False) else \
        f"-g{group}-{args.activations}" + ("-sym" if args.symmetric else "")
    variant += "-bytes" if args.byte_path else "-as-loaded" if args.words_as_loaded else ""
    path = args.out / f"kernels-compile-sm{args.arch}{variant}.json"
    leanest = [{"kernel": kernel, "M": m, "instructions_per_weight_byte": r["instructions_per_weight_byte"],
                "config": r["config"]} for (kernel, m), r in leanest_loops(rows).items()]
    path.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "k_width": w4_configs.K_WIDTH, "group": group,
                                "activations": args.activations, "symmetric": args.symmetric,
                                "left_out_splits": left_out_splits,
                                "leanest": leanest, "dequant": dequant, "rows": rows, "dependent_launch": pdl_rows},
                               indent=2) + "\n")
    print(f"wrote {path}")
    bad = [r for r in rows + dequant + pdl_rows if r["problems"]]
    if bad and comparing:
        # configs the launcher never runs, compiled for comparison: a spill there is a finding, not a failure
        print(f"{len(bad)} of {len(rows)} configs have problems (in {variant.lstrip('-')}, which the launcher does not run)")
    elif bad:
        raise SystemExit(f"{len(bad)} of {len(rows)} configs have problems")


if __name__ == "__main__":
    main()
