"""Kernel benchmark (GPU): mpq's Triton W4A16 / W8A16 against FP16 cuBLAS on Llama-7B/8B shapes.

For each layer shape and M in 1, 4, 16, 64, 512: median device time, achieved
GB/s counting packed weights + scales + zeros + activations + outputs, percent of the device's
measured copy bandwidth, TFLOP/s, speedup over torch.nn.functional.linear in fp16, and the
relative error against the dequantise reference. Times are the device's: one CUDA graph runs the
call on each of enough weight copies to overflow the L2 cache (mpq.kernels.triton_tuning.
rotating_time_ms), so weights come from DRAM and the host's launch cost stays out. INT4 layers are
laid out as a loaded Triton layer holds them (mpq.qlinear.triton_layout). Beside them, the
wall time per call of eager calls in a row, which adds the host's Python launch cost that a caller
without CUDA graphs pays. Each decode row is timed again with its weights in L2 (time_from_l2:
the same kernel and grid on rows that overlap), which says how much of its time DRAM takes.
Then greedy-decode tokens/s of a demo
config against the unquantised demo, after every emitted demo config is loaded on the GPU and
checked against the CPU reference (kernel per layer, logits): with generate() as a caller runs it,
and through a static KV cache eagerly and with each step replayed from a CUDA graph
(benchmarks/graph_decode.py), which takes the host's launch cost out. Prints a table and writes JSON.

    python benchmarks/gpu_kernels.py                 # on a CUDA machine
    python benchmarks/gpu_kernels.py --smoke         # tiny shapes, correctness only (CPU: TRITON_INTERPRET=1)
    python benchmarks/gpu_kernels.py --smoke --configs demo-out   # and the first demo config on the Triton kernels
    mpq compile demo --max-mem 8MB -o demo-out   # anywhere (optuna), then on the GPU machine, which needs none:
    python benchmarks/gpu_kernels.py --configs demo-out --out $OUT

The JSON is rewritten after every row, so a run cut off by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

if str(Path(__file__).parent) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(Path(__file__).parent))
import kernel_fit  # noqa: E402

SHAPES = {  # name: (N out, K in)
    "attn 4096x4096": (4096, 4096),
    "up 4096->11008": (11008, 4096),
    "up 4096->14336": (14336, 4096),
    "down 14336->4096": (4096, 14336),
    "fused qkv 4096->6144": (6144, 4096),
}
SMOKE_SHAPES = {"smoke 96x256": (96, 256), "smoke odd 40x384": (40, 384)}
BATCHES = (1, 4, 16, 64, 512)
ROTATE_BYTES = 512 * 2**20  # weight copies per timed graph: several times the L2 of any current GPU


def benchmark_device(script: str, smoke: bool) -> str:
    """cuda where there is one; else a smoke run's kernels run in Triton's interpreter on the CPU
    (set before they are imported), and a full run is refused."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        raise SystemExit(f"{script} times GPU kernels: run it on a CUDA machine, or use --smoke")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def device_ms(calls: list, smoke: bool) -> float | None:
    """Median device time per call of `calls` (one per weight copy) in a CUDA graph; None in a smoke run."""
    if smoke:
        calls[0]()
        return None
    from mpq.kernels.triton_tuning import rotating_time_ms

    return rotating_time_ms(calls)


def eager_ms(fn, calls: int = 200) -> float:
    """Wall time per call of `calls` eager calls in a row: the larger of the host's launch cost and
    the device time (the weights stay in L2 here, so this is mostly the host's share)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def launch_floors_us(columns: int = 4096, calls: int = 64) -> dict[str, float]:
    """Device time per call, in a CUDA graph of `calls` in a row, of the two ops split-K added around
    its kernel before it finished the sum in the kernel (zeroing the fp32 sum, casting it back; run
    1's tables include them) on one decode row of a 4096-wide layer: what
    a launch costs when it moves next to nothing, beside the fixed part kernel_fit.py finds in each
    kernel's time."""
    from mpq.kernels.triton_tuning import rotating_time_ms

    total = torch.zeros((1, columns), device="cuda")
    return {f"zeros (1 x {columns} fp32)": 1e3 * rotating_time_ms(
                [lambda: torch.zeros((1, columns), device="cuda")] * calls),
            f"cast to bf16 (1 x {columns})": 1e3 * rotating_time_ms([lambda: total.to(torch.bfloat16)] * calls)}


@functools.cache
def quantised_on_cpu(n: int, k: int, fmt_name: str) -> dict:
    """The random [n, k] weight (seed 0) quantised in `fmt_name`, once a run: the table, the split-K
    check, the PDL rows and the L2 rows each take a layer (a 14336 x 4096 one takes seconds on the CPU)."""
    from mpq.formats import get_format
    from mpq.quantize import quantize_weight

    torch.manual_seed(0)
    return quantize_weight(torch.randn(n, k) * 0.02, get_format(fmt_name))


def quantised_layer(n: int, k: int, fmt, device: str, smoke: bool) -> tuple[list[dict], torch.Tensor, int]:
    """A random [n, k] weight (seed 0) quantised in `fmt` (a FormatSpec) once: its tensors on `device` in as
    many copies as overflow the L2 cache (one in a smoke run), each laid out as a Triton layer holds
    it (mpq.qlinear.triton_layout), the float32 weight they stand for (on the device: the reference is plain
    torch), and the bytes of one copy."""
    from mpq.qlinear import triton_layout
    from mpq.quantize import dequantize_weight

    base = quantised_on_cpu(n, k, fmt.name)
    weight_bytes = sum(t.numel() * t.element_size() for t in base.values())
    copies = 1 if smoke else max(2, ROTATE_BYTES // weight_bytes + 1)
    # as a Triton layer holds them (until 2026-12-04 INT4 was timed with quantize_weight's row-major scales and
    # zeros apart: run 2's layers' layout, no loaded layer's since the scales went column-major and paired)
    sets = [triton_layout({key: value.to(device) for key, value in base.items()}, fmt) for _ in range(copies)]
    return sets, dequantize_weight(sets[0], fmt), weight_bytes


def quantised_linear(fmt, x: torch.Tensor, tensors: dict, config: dict | None = None) -> torch.Tensor:
    """x through the layer `tensors` on mpq's Triton kernel for `fmt` (a FormatSpec; `config`: a pinned launch config)."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w8a16 import w8a16_linear

    if fmt.bits == 8:
        return w8a16_linear(x, tensors["qweight"], tensors["scales"], config=config)
    return w4a16_linear(x, tensors["qweight"], tensors["scales"], tensors.get("zeros"), fmt.group_along(x.shape[1]),
                        config=config)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, got in any dtype, expected the float32 reference."""
    return ((got.float() - expected).norm() / expected.norm()).item()


def one_line(error: Exception) -> str:
    """An exception as a report keeps it: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def split_configs(fmt_name: str, smoke: bool) -> dict[str, dict]:
    """Split-K launch configs to check call after call (split_sums_check): INT4's 16-row tile and,
    where this Triton takes them, its tiles turned round with one warp and with 4 along K; INT8's."""
    from mpq.kernels.triton_w4a16_configs import TURNED_STACKS

    wide, split = (16, 2) if smoke else (128, 8)
    common = {"BLOCK_N": wide, "BLOCK_K": 128, "SPLIT_K": split, "num_stages": 3}
    if fmt_name == "int8":
        return {"int8 16-row": {**common, "BLOCK_M": 16, "num_warps": 4}}
    configs = {"int4 16-row": {**common, "BLOCK_M": 16, "num_warps": 4}}
    for stack in TURNED_STACKS:
        configs[f"int4 turned, {stack} along K"] = {**common, "BLOCK_M": 8, "num_warps": stack, "TRANSPOSED": True,
                                                     "STACK": stack}
    return configs


def split_sums_check(device: str, smoke: bool, calls: int = 3, pdl: bool = False) -> dict[str, dict]:
    """Split-K configs whose last program per tile finishes the sum and zeroes its buffers
    (kernels/split_sums.py), called again and again: each call eagerly and each replay of one CUDA
    graph (on a GPU) against the reference, and the buffers all zero after. A lost count or an
    unordered read would show as a wrong call, or as sums left for the next one. `pdl`: the calls
    launched with PDL (labels end in " PDL"), where a call's programs start before the one ahead
    has finished, and the buffers it shares with that call are what the wait must guard."""
    from mpq.formats import get_format
    from mpq.kernels import split_sums
    from mpq.kernels.triton_common import dependent_launch

    n, k = SMOKE_SHAPES["smoke odd 40x384"] if smoke else SHAPES["attn 4096x4096"]
    results = {}
    for fmt_name in ("int4-g128", "int8"):
        fmt = get_format(fmt_name)
        sets, reference, _ = quantised_layer(n, k, fmt, device, smoke=True)
        for label, config in split_configs(fmt_name.split("-")[0], smoke).items():
            for m in (1, 5):
                x = torch.randn(m, k, device=device).to(torch.bfloat16)
                expected = torch.nn.functional.linear(x.float(), reference)

                with dependent_launch(pdl):
                    errors = [relative_error(quantised_linear(fmt, x, sets[0], config), expected) for _ in range(calls)]
                    if device == "cuda":
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            # two calls: the second's programs wait on the first's (with PDL)
                            quantised_linear(fmt, x, sets[0], config)
                            out = quantised_linear(fmt, x, sets[0], config)
                        for _ in range(calls):
                            graph.replay()
                            torch.cuda.synchronize()
                            errors.append(relative_error(out, expected))
                left = [bool(t.any()) for pair in split_sums._BUFFERS.values() for t in pair]
                results[f"{label} M={m}{' PDL' if pdl else ''}"] = {
                    "config": config, "calls": len(errors), "worst_rel_err": max(errors), "buffers_zeroed": not any(left)}
    return results


def route(config: dict, fmt_name: str) -> str:
    """A launch config in words: which code path of the kernel it runs, its tile and split."""
    if config.get("DENSE"):
        return code_path(config, fmt_name)
    return (f"{code_path(config, fmt_name)} {config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
            + (f" split {config['SPLIT_K']}" if config["SPLIT_K"] > 1 else ""))


def takes_long_steps(config: dict, fmt_name: str) -> bool:
    """Whether an INT4 launch config of a group-wise format runs single_row's long steps (several
    groups a K step: triton_w4a16_configs.long_steps). Never an INT8 one, whose single row also takes K steps of 256."""
    from mpq.formats import get_format
    from mpq.kernels.triton_w4a16_configs import long_steps

    group = get_format(fmt_name).group_size if fmt_name.startswith("int4") else None
    return group is not None and long_steps(config, group)


def code_path(config: dict, fmt_name: str) -> str:
    """Which code path of the kernel a launch config runs, without its tile."""
    from mpq.kernels.triton_w4a16_configs import runs_turned_tiles, runs_word_dots, runs_word_tiles

    int4 = fmt_name.startswith("int4")
    if config.get("DENSE"):
        return "dequantise + cuBLAS"
    if config["BLOCK_M"] == 1:
        return ("single row" + (", long steps" if takes_long_steps(config, fmt_name) else "")
                + (", loading ahead" if config.get("PREFETCH") else ", pipelined" if config.get("PIPELINE") else ""))
    if config["BLOCK_M"] > 16:
        if runs_turned_tiles(config):
            return "tiled GEMM, W x^T"
        return "tiled GEMM" + (", int32 words" if int4 and runs_word_tiles(config) else "")
    steps = f", {config['STEPS']} steps a pass" if config.get("STEPS", 1) > 1 else ""
    if int4 and config.get("TRANSPOSED"):
        return f"tensor cores, int32 words, W x^T, {config.get('STACK', 1)} warp(s) along K{steps}"
    warps = config.get("num_warps", 4)
    few = f", {warps} warp{'s' if warps > 1 else ''}" if warps < 4 else ""  # triton_common.few_warp_tiles
    if int4 and runs_word_dots(config):
        return f"tensor cores, int32 words{few}{steps}"
    return f"tensor cores{few}"


def fastest_by_path(timed: list, fmt_name: str) -> dict[str, float]:
    """The tuner's times of one shape ([config, ms] each: triton_tuning.tuning_costs) as the fastest of
    each code path, fastest first: how far the path it did not choose was behind (its timer: one call
    in a graph, L2 flushed)."""
    best: dict[str, float] = {}
    for config, ms in timed:
        path = code_path(config, fmt_name)
        best[path] = min(ms, best.get(path, ms))
    return dict(sorted(best.items(), key=lambda item: item[1]))


def bench_layer(name: str, n: int, k: int, fmt_name: str, batches: tuple[int, ...], device: str, smoke: bool,
                dtype: torch.dtype = torch.bfloat16) -> Iterator[dict]:
    """One row per M for an [n, k] layer in `fmt_name`: the weight is quantised and dequantised
    for the reference once, then each M is checked and timed. The kernel's activations are
    `dtype`; the baseline is torch's F.linear on fp16 weights."""
    from mpq.formats import get_format

    from mpq.kernels.triton_tuning import chosen_configs, tuning_costs

    fmt = get_format(fmt_name)
    sets, reference_weight, weight_bytes = quantised_layer(n, k, fmt, device, smoke)
    dense = [torch.randn(n, k, dtype=torch.float16, device=device) * 0.02
             for _ in range(1 if smoke else max(2, ROTATE_BYTES // (2 * n * k) + 1))]
    for m in batches:
        x = torch.randn(m, k, device=device).to(dtype)
        x16 = x.to(torch.float16)

        def quantized(t: dict = sets[0]) -> torch.Tensor:
            return quantised_linear(fmt, x, t)

        def fp16(weight: torch.Tensor = dense[0]) -> torch.Tensor:
            return torch.nn.functional.linear(x16, weight)

        expected = torch.nn.functional.linear(x.float(), reference_weight)
        chosen_before = set(chosen_configs())
        rel_err = relative_error(quantized(), expected)
        # the launch config the tuner chose on that first call (none when pinned: the interpreter)
        chosen = [config for key, config in chosen_configs().items() if key not in chosen_before]
        timed = [costs["timed"] for key, costs in tuning_costs().items() if key not in chosen_before]
        ms = device_ms([lambda t=t: quantized(t) for t in sets], smoke)
        ms_fp16 = device_ms([lambda w=w: fp16(w) for w in dense], smoke)
        moved = weight_bytes + x.numel() * x.element_size() + m * n * x.element_size()
        row = {"shape": name, "N": n, "K": k, "M": m, "format": fmt_name, "activations": str(dtype).removeprefix("torch."),
               "rel_err": rel_err, "bytes_moved": moved, "config": chosen[0] if chosen else None,
               "route": route(chosen[0], fmt_name) if chosen else None}
        if timed:
            row["fastest_by_path_ms"] = fastest_by_path(timed[0], fmt_name)
        if ms is not None:
            row.update({"ms": ms, "fp16_ms": ms_fp16, "GBps": moved / (ms * 1e-3) / 1e9,
                        "TFLOPs": 2 * m * n * k / (ms * 1e-3) / 1e12, "speedup_vs_fp16": ms_fp16 / ms,
                        "eager_ms": eager_ms(quantized), "fp16_eager_ms": eager_ms(fp16)})
        yield row


def pdl_capable(device: torch.device) -> bool:
    from mpq.kernels.triton_common import pdl_capable as capable

    return capable(device)


def decode_rows_by_layer(rows: list[dict], timed_only: bool) -> dict[tuple, list[dict]]:
    """The decode rows (M <= 16; with `timed_only`, those with a time) per layer: (format, N, K,
    activations) -> rows, so that a second pass over them quantises each layer once."""
    by_layer: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["M"] <= 16 and ("ms" in row or not timed_only):
            by_layer.setdefault((row["format"], row["N"], row["K"], row["activations"]), []).append(row)
    return by_layer


def time_with_pdl(rows: list[dict], device: str, smoke: bool, on_row=lambda: None) -> None:
    """Each timed decode row (M <= 16) again with its layer's launches under PDL (MPQ_PDL=1), the
    shape's chosen config: `pdl_ms`, device time per call in the same kind of graph, one layer's
    calls back to back, where each call's launch and first weight reads overlap the tail of the
    call before (in a model the kernel ahead is a norm or an attention kernel, which lets it
    launch only as it ends: scaled_decode.py times that); `pdl_rel_err`; and `pdl_speedup_vs_fp16`.
    Run after everything else a session measures, since a driver that refuses PDL in a graph
    fails here: such a row gets `pdl_error` and the rest go on. `on_row` after each row."""
    from mpq.formats import get_format
    from mpq.kernels.triton_common import dependent_launch

    for (fmt_name, n, k, activations), layer_rows in decode_rows_by_layer(rows, timed_only=True).items():
        fmt = get_format(fmt_name)
        sets, reference_weight, _ = quantised_layer(n, k, fmt, device, smoke)
        for row in layer_rows:
            x = torch.randn(row["M"], k, device=device).to(getattr(torch, activations))
            expected = torch.nn.functional.linear(x.float(), reference_weight)
            try:
                with dependent_launch():
                    row["pdl_rel_err"] = relative_error(quantised_linear(fmt, x, sets[0]), expected)
                    row["pdl_ms"] = device_ms([lambda t=t: quantised_linear(fmt, x, t) for t in sets], smoke)
            except Exception as error:  # noqa: BLE001 - reported in the row, and the next rows still tried
                row["pdl_error"] = one_line(error)
            if row.get("pdl_ms"):
                row["pdl_speedup_vs_fp16"] = row["fp16_ms"] / row["pdl_ms"]
            on_row()
        del sets


OVERLAP_STRIDE = 16  # bytes from one weight row to the next in overlapping_rows: a multiple of 16, as a real row's length is
L2_CALLS = 8  # calls of one layer per graph in time_from_l2


def overlapping_rows(tensors: dict) -> dict:
    """The layer's tensors with its packed weight rows OVERLAP_STRIDE bytes apart instead of a row's
    length: the same shape, and a stride the launchers pass on as it is and Triton specialises as it
    does a real row's (divisible by 16), so a call runs the same kernel, instructions and grid,
    while all its weight reads fall in N x 16 + K bytes (at most a few hundred KB) that stay in L2
    (cp.async's 16-byte copies skip L1; a plain load may hit there, sooner still)."""
    q = tensors["qweight"]
    return {**tensors, "qweight": q.as_strided(q.shape, (OVERLAP_STRIDE, 1))}


def time_from_l2(rows: list[dict], device: str, smoke: bool, on_row=lambda: None) -> None:
    """Each decode row (M <= 16) again with its chosen config on the layer's weights read from L2
    (overlapping_rows), in the same kind of graph as its `ms` (L2_CALLS calls of the one layer):
    `l2_ms`, and `l2_share`, l2_ms / ms. The loops of these rows wait on something (run 2: INT4's
    tensor-core tiles issued at 16-24% of the peak rate and streamed at 1.1-1.8 TB/s): a share near 1
    says DRAM is not what they wait on (their own instructions' latency, too few warps, the launch and
    split-K's finish), a share well under 1 that it is. `l2_rel_err` against the weight the
    overlapping rows stand for (dequantised as they lie); a smoke run checks that alone."""
    from mpq.formats import get_format
    from mpq.quantize import dequantize_weight

    for (fmt_name, n, k, activations), layer_rows in decode_rows_by_layer(rows, timed_only=not smoke).items():
        fmt = get_format(fmt_name)
        sets, _, _ = quantised_layer(n, k, fmt, device, smoke=True)
        view = overlapping_rows(sets[0])
        reference_weight = dequantize_weight(view, fmt)
        for row in layer_rows:
            x = torch.randn(row["M"], k, device=device).to(getattr(torch, activations))
            config = row["config"]  # the shape's choice (None in a smoke run: the interpreter's)
            row["l2_rel_err"] = relative_error(quantised_linear(fmt, x, view, config),
                                               torch.nn.functional.linear(x.float(), reference_weight))
            ms = device_ms([lambda: quantised_linear(fmt, x, view, config)] * L2_CALLS, smoke)
            if ms is not None:
                row.update({"l2_ms": ms, "l2_share": ms / row["ms"]})
            on_row()
        del sets, view


def compiled_demo() -> Path:
    """`mpq compile demo` into a temporary folder (this needs the compiler's dependencies, optuna)."""
    import tempfile

    from mpq.compile import CompileOptions, compile_model

    out = Path(tempfile.mkdtemp(prefix="mpq-kbench-"))
    compile_model(CompileOptions(model="demo", out=out, trials=100, progress=False))
    return out


def demo_summary(out: Path) -> dict:
    """The summary.json of `mpq compile demo`'s output `out`; anything else is refused before any timing."""
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"--configs {out}: no summary.json there; give the -o folder of `mpq compile demo`")
    summary = json.loads(summary_path.read_text())
    if summary.get("model") != "demo":
        raise SystemExit(f"--configs {out}: compiled from {summary.get('model')!r}; the decode comparison needs `mpq compile demo`")
    return summary


def end_to_end(device: str, out: Path, tokens: int = 64, smoke: bool = False) -> dict:
    """Each config of the demo's compile output `out` loaded on `device` and checked against the
    CPU reference (which kernel runs each layer, relative error of the logits), and greedy-decode
    tokens/s of the first config against the unquantised model. `smoke`: the first config only,
    its layers on the Triton kernels wherever `device` is (the CPU: the interpreter), no timing."""
    import mpq
    from mpq.device_check import check_on_device, describe_check
    from mpq.models import load_model

    summary = demo_summary(out)
    folders = [out / "configs" / c["name"] for c in summary["configs"]]
    checks = []
    for folder in folders[:1] if smoke else folders:
        # under the interpreter a 32-token prompt, which still reaches the tiled GEMM
        checks.append(check_on_device(folder, device, backend="triton" if smoke else None, tokens=32 if smoke else 128))
        print(describe_check(checks[-1]), flush=True)
    if smoke:
        return {"checks": checks}
    contenders = {"unquantised bf16": load_model("demo").model.to(device),
                  f"mpq {folders[0].name}": mpq.load(folders[0], device=device)}
    prompt = torch.tensor([[1, 2, 3, 4]], device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    speed = {}
    for name, model in contenders.items():
        model.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up and config choice
        runs = []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            sync()
            runs.append(tokens / (time.perf_counter() - start))
        speed[name] = statistics.median(runs)
    # the same decoding through a static cache, eager and with each step replayed from a CUDA graph
    from graph_decode import decode_report

    static = {name: decode_report(model, prompt, tokens) for name, model in contenders.items()}
    return {"checks": checks, "decode_tokens_per_s": speed, "static_decode": static}


def failures(report: dict) -> list[str]:
    """What the run must not show: a kernel off the reference by 1e-2 (with PDL, on overlapping rows too), a split-K call
    off by 1e-2 or leaving its sums, a loaded config off by 2e-2 or with a layer left on the
    reference path."""
    bad = [f"{r['format']} {r['shape']} M={r['M']}{label}: rel err {r[key]:.1e}" for r in report["rows"]
           for key, label in (("rel_err", ""), ("pdl_rel_err", " with PDL"), ("l2_rel_err", " on overlapping rows"))
           if key in r and not r[key] < 1e-2]
    for label, check in report.get("split_sums", {}).items():
        if not check["worst_rel_err"] < 1e-2 or not check["buffers_zeroed"]:
            bad.append(f"split-K {label}: rel err {check['worst_rel_err']:.1e} over {check['calls']} calls, "
                       f"buffers zeroed after: {check['buffers_zeroed']}")
    for check in report.get("end_to_end", {}).get("checks", []):
        if check["fallback_layers"] or not all(e < 2e-2 for e in check["rel_err"].values()):
            bad.append(f"{check['config']} on {check['device']}: {check['fallback_layers'] or check['rel_err']}")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no timing: checks the script and kernels")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--formats", default="int4-g128,int8")
    parser.add_argument("--activations", choices=("bf16", "fp16"), default="bf16",
                        help="the kernels' activation dtype (the fp16 cuBLAS baseline stays fp16)")
    parser.add_argument("--batches", default=None, help="comma-separated M values (default 1,4,16,64,512)")
    parser.add_argument("--no-e2e", action="store_true", help="kernels only: skip the demo's compile, check and decode")
    parser.add_argument("--no-pdl", action="store_true",
                        help="skip the decode rows' second timing with PDL (MPQ_PDL=1; run last, on Hopper and later)")
    parser.add_argument("--configs", type=Path, default=None,
                        help="an `mpq compile demo` output folder to check and time, instead of compiling the demo here")
    args = parser.parse_args()
    if args.configs is not None:
        demo_summary(args.configs)  # refused now, not after the kernel rows
    device = benchmark_device("benchmarks/gpu_kernels.py", args.smoke)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    batches = tuple(int(m) for m in args.batches.split(",")) if args.batches else (1, 3, 17) if args.smoke else BATCHES
    from mpq.models import DTYPES
    from mpq.qlinear import triton_version

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "triton": triton_version(), "activations": args.activations, "rows": []}
    if not args.smoke:
        report["copy_GBps"] = copy_bandwidth() / 1e9
        report["sms"] = torch.cuda.get_device_properties(device).multi_processor_count  # kernel_fit.py's occupancy
    args.out.mkdir(parents=True, exist_ok=True)
    filename = ("kernels-smoke.json" if args.smoke else
                f"kernels-{report['device'].replace(' ', '_')}-{args.formats.replace(',', '_')}-{args.activations}.json")
    path = args.out / filename
    for fmt_name in args.formats.split(","):
        for name, (n, k) in shapes.items():
            for row in bench_layer(name, n, k, fmt_name, batches, device, args.smoke, DTYPES[args.activations]):
                if "GBps" in row:
                    row["pct_of_copy_bw"] = 100 * row["GBps"] / report["copy_GBps"]
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                write_report(path, report)
    print_table(report)
    print_paths(report)
    report["split_sums"] = split_sums_check(device, args.smoke)
    print("\nsplit-K calls in a row (eager" + (", then a CUDA graph's replays" if device == "cuda" else "") + "): "
          + "; ".join(f"{label} worst rel err {c['worst_rel_err']:.1e}, buffers zeroed {c['buffers_zeroed']}"
                      for label, c in report["split_sums"].items()), flush=True)
    write_report(path, report)
    if not args.smoke:
        report["launch_floors_us"] = launch_floors_us()
        report["fits"] = kernel_fit.fits(report)
        print("\nper-call floors in the same kind of graph: "
              + ", ".join(f"{name} {us:.1f} us" for name, us in report["launch_floors_us"].items()))
        kernel_fit.print_fits(report)
        write_report(path, report)
    time_from_l2(report["rows"], device, args.smoke, on_row=lambda: write_report(path, report))
    if not args.smoke:
        print_l2_table(report)
    write_report(path, report)
    if args.smoke and args.configs is not None:
        report["end_to_end"] = end_to_end(device, args.configs, smoke=True)
        write_report(path, report)
    elif not args.smoke and not args.no_e2e:
        report["end_to_end"] = end_to_end(device, args.configs or compiled_demo())
        print("\ndecode tokens/s (demo, batch 1): "
              + ", ".join(f"{k} {v:.0f}" for k, v in report["end_to_end"]["decode_tokens_per_s"].items()))
        for name, static in report["end_to_end"]["static_decode"].items():
            print(f"  {name}, static cache: eager {static['static_eager_tokens_per_s']:.0f} tokens/s, "
                  + (f"CUDA graph {static['graph_tokens_per_s']:.0f}" if "graph_tokens_per_s" in static
                     else f"no CUDA graph ({static['graph_error']})")
                  + f"; tokens as generate's: {static['static_eager_matches_generate']}, {static.get('graph_matches_generate')}")
        write_report(path, report)
    if not args.smoke and not args.no_pdl and pdl_capable(torch.device(device)):
        # last: a driver that refuses PDL in a graph, or a wrong result with it, must not cost the rest
        try:
            report["split_sums"].update(split_sums_check(device, args.smoke, pdl=True))
        except Exception as error:  # noqa: BLE001 - reported; the timed rows below are still tried
            report["split_sums_pdl_error"] = one_line(error)
        time_with_pdl(report["rows"], device, args.smoke, on_row=lambda: write_report(path, report))
        print_pdl_table(report)
        write_report(path, report)
    print(f"wrote {path}")
    bad = failures(report)
    if bad:
        raise SystemExit(f"{len(bad)} failures: " + "; ".join(bad))


def write_report(path: Path, report: dict) -> None:
    """The report so far, with the launch configs the tuner has chosen so far."""
    from mpq.io import write_json_atomic
    from mpq.kernels.triton_tuning import chosen_configs, tuning_costs

    report["chosen_configs"] = {" ".join(map(str, key)): config for key, config in chosen_configs().items()}
    report["tuning_costs"] = {" ".join(map(str, key)): costs for key, costs in tuning_costs().items()}
    write_json_atomic(path, report)


def print_table(report: dict) -> None:
    print(f"\n# {report['device']}" + (f", measured copy bandwidth {report['copy_GBps']:.0f} GB/s" if "copy_GBps" in report else ""))
    print(f"Triton {report['triton']}, torch {report['torch']}; activations {report['activations']}, "
          "the cuBLAS baseline (F.linear) fp16")
    print("ms: device time per call (CUDA graph over weight copies that overflow L2); eager ms: wall time per call of eager calls in a row")
    cells = []
    for r in report["rows"]:
        timed = ([f"{r['ms']:.4f}", f"{r['fp16_ms']:.4f}", f"{r['speedup_vs_fp16']:.2f}x", f"{r['GBps']:.0f}",
                  f"{r['pct_of_copy_bw']:.0f}%", f"{r['TFLOPs']:.1f}"] if "ms" in r else ["-"] * 6)
        eager = [f"{r['eager_ms']:.4f}", f"{r['fp16_eager_ms']:.4f}"] if "ms" in r else ["-"] * 2
        cells.append([r["format"], r["shape"], r["M"], *timed, f"{r['rel_err']:.1e}", *eager, r.get("route") or "-"])
    print_markdown_table(["format", "shape", "M", "ms", "fp16 ms", "speedup", "GB/s", "% copy BW", "TFLOP/s", "rel err",
                          "eager ms", "fp16 eager ms", "route"], cells)


def print_paths(report: dict) -> None:
    """Per row the tuner timed, the fastest config of each code path, as the tuner timed it."""
    print("\nThe fastest of each code path as the tuner timed it (one call in a graph, L2 flushed), fastest first")
    for r in report["rows"]:
        if len(r.get("fastest_by_path_ms", {})) > 1:
            first = next(iter(r["fastest_by_path_ms"].values()))
            print(f"  {r['format']} {r['shape']} M={r['M']}: " + "; ".join(
                f"{path} {ms:.4f} ms ({ms / first:.2f}x)" for path, ms in r["fastest_by_path_ms"].items()))


def print_markdown_table(headers: list[str], cells: list[list]) -> None:
    """A table as the README and the notes hold them: a header row, a rule, a row of cells each."""
    for line in ([headers, ["---"] * len(headers)] + cells):
        print("| " + " | ".join(map(str, line)) + " |")


def print_l2_table(report: dict) -> None:
    """The decode rows timed again with their weights in L2 (time_from_l2)."""
    print("\nThe decode rows again, their weights in L2 (rows 16 bytes apart: the same kernel and grid); share = from L2 / ms")
    print_markdown_table(["format", "shape", "M", "ms", "from L2 ms", "share", "route"],
                         [[r["format"], r["shape"], r["M"], f"{r['ms']:.4f}", f"{r['l2_ms']:.4f}", f"{r['l2_share']:.2f}",
                           r.get("route") or "-"] for r in report["rows"] if "l2_ms" in r])


def print_pdl_table(report: dict) -> None:
    """The decode rows timed again with PDL (time_with_pdl), and any that could not be."""
    print("\nThe decode rows launched with PDL (MPQ_PDL=1). The graph replays one layer's calls back to back,")
    print("so each call's launch and first weight reads overlap the call before: more overlap than a model gives")
    cells = []
    for r in report["rows"]:
        if "pdl_ms" in r:
            cells.append([r["format"], r["shape"], r["M"], f"{r['ms']:.4f}", f"{r['pdl_ms']:.4f}", f"{r['speedup_vs_fp16']:.2f}x",
                          f"{r['pdl_speedup_vs_fp16']:.2f}x", f"{r['pct_of_copy_bw'] * r['ms'] / r['pdl_ms']:.0f}%",
                          f"{r['pdl_rel_err']:.1e}"])
        elif "pdl_error" in r:
            cells.append([r["format"], r["shape"], r["M"], f"{r['ms']:.4f}", r["pdl_error"], "", "", "", ""])
    print_markdown_table(["format", "shape", "M", "ms", "with PDL ms", "speedup", "with PDL speedup", "% copy BW with PDL",
                          "rel err with PDL"], cells)
    if "split_sums_pdl_error" in report:
        print(f"split-K with PDL: {report['split_sums_pdl_error']}")


if __name__ == "__main__":
    main()
