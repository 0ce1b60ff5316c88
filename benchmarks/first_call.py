"""How long a layer shape's first call on a GPU spends compiling its launch candidates, measured without a GPU.

On a GPU, the first call of each layer shape (per M bucket) compiles every launch candidate, then
times them (mpq.kernels.triton_tuning). This script makes that first call through the real
launchers and Triton's real compiler, for sm_90, on a machine with no GPU: a stand-in driver names
the target and cannot launch, and the timer only records whether the kernel it was handed had to
be compiled then. Each thread count (MPQ_COMPILE_THREADS) runs in a fresh process with an empty
Triton cache: 0 compiles each candidate when it is first timed, as the tuner did before it
compiled ahead; 1 compiles them ahead one after another; more, side by side. Prefill (M > 16)
also times the dense route (kernels/triton_dequant.py), whose one small kernel compiles when it is
first timed (and then serves every layer of that format). Prints a table, writes JSON.

    python benchmarks/first_call.py                              # 4096x4096, M = 1 and 16, full candidate spaces
    python benchmarks/first_call.py --configs 3 --threads 0,2    # three candidates per space (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FORMATS = ("int4-g128", "int8")


def first_calls(m: int, n: int, k: int, configs: int) -> list[dict]:
    """In this process: one first call per format, with Triton's JIT on a driver that cannot launch."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    import torch
    import triton.compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class NoGPU:
        """What Triton's JIT asks a driver before it compiles; nothing that loads or launches."""

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(NoGPU())
    compiles: list[str] = []
    real_compile = triton.compiler.compile

    def counting_compile(*args, **kwargs):
        compiles.append(threading.current_thread().name)
        return real_compile(*args, **kwargs)

    triton.compiler.compile = counting_compile  # the JIT looks it up when it first compiles

    from mpq.formats import get_format
    from mpq.kernels import triton_tuning, triton_w4a16, triton_w8a16
    from mpq.qlinear import triton_layout
    from mpq.quantize import quantize_weight

    timings: list[list] = []

    def timer(run) -> float:
        before = len(compiles)
        try:
            run()
        except Exception as error:  # noqa: BLE001 - no GPU: the launch fails after the JIT found its kernel
            timings.append([before, len(compiles) - before, type(error).__name__])
        return 1.0

    triton_tuning.gpu_time_ms = timer
    if configs:  # an evenly spread subset of each space, split-K and not
        for module in (triton_w4a16, triton_w8a16):
            def spread(*key, space=module.tuner_space) -> list[dict]:
                full = space(*key)
                return full[::max(1, len(full) // configs)][:configs]

            module.tuner_space = spread
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    rows = []
    for fmt_name in FORMATS:
        fmt = get_format(fmt_name)
        t = triton_layout(quantize_weight(torch.randn(n, k) * 0.02, fmt), fmt)  # as a layer holds it: the kernels it compiles
        compiles.clear()
        timings.clear()
        start = time.perf_counter()
        try:
            if fmt.bits == 8:
                triton_w8a16.w8a16_linear(x, t["qweight"], t["scales"])
            else:
                triton_w4a16.w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], fmt.group_along(k))
        except Exception:  # noqa: BLE001,S110 - the chosen config's launch: no GPU to run it on
            pass
        rows.append({"format": fmt_name, "M": m, "N": n, "K": k, "seconds": time.perf_counter() - start,
                     "configs": len(timings), "compiles": len(compiles),
                     "compiled_on_workers": sum(name.startswith("mpq-compile") for name in compiles),
                     "compiled_while_timing": sum(added for _, added, _ in timings)})
    return rows


def run_mode(threads: int, args: argparse.Namespace) -> list[dict]:
    """first_calls in a fresh process with an empty Triton cache and tuning store, MPQ_COMPILE_THREADS=threads."""
    rows = []
    for m in map(int, args.batches.split(",")):
        with tempfile.TemporaryDirectory() as cache:
            # an empty tuning store too: a choice stored by an earlier child would skip the first call's work
            env = {**os.environ, "TRITON_CACHE_DIR": cache, "MPQ_CACHE_DIR": cache, "MPQ_COMPILE_THREADS": str(threads)}
            child = [sys.executable, __file__, "--child", str(m), "--shape", args.shape, "--configs", str(args.configs)]
            proc = subprocess.run(child, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"first call at M={m}, {threads} threads failed:\n{proc.stderr[-3000:]}")
            cubins = [path.name for path in Path(cache).rglob("*.cubin")]
        for row in json.loads(proc.stdout.splitlines()[-1]):
            kernel = "_w8a16_kernel" if row["format"] == "int8" else "_w4a16_kernel"
            rows.append({**row, "threads": threads, "cubins_in_cache": cubins.count(f"{kernel}.cubin")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="N x K of the layer")
    parser.add_argument("--batches", default="1,16", help="values of M (1: the single-row path, 16: the tl.dot GEMV)")
    parser.add_argument("--configs", type=int, default=0, help="candidates per space (0: all of them)")
    parser.add_argument("--threads", default=None, help="thread counts to compare (default: 0, 1 and every usable core)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, k = map(int, args.shape.split("x"))
    if args.child is not None:
        print(json.dumps(first_calls(args.child, n, k, args.configs)))
        return
    from mpq.environment import hardware, versions
    from mpq.kernels.triton_tuning import usable_cores
    from mpq.qlinear import triton_version

    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({0, 1, usable_cores()})
    report = {"versions": {**versions(), "triton": triton_version()}, "hardware": hardware(), "usable_cores": usable_cores(), "target": "cuda sm_90 (compiled, not run)",
              "rows": [row for count in threads for row in run_mode(count, args)]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "first_call.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"# first call of a {n}x{k} layer: compiling its launch candidates for sm_90 "
          f"({report['usable_cores']} usable cores)")
    print("| format | M | candidates | threads | first call s | compiled on workers | compiled while timing | cubins |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['format']} | {r['M']} | {r['configs']} | {r['threads']} | {r['seconds']:.1f} | "
              f"{r['compiled_on_workers']} | {r['compiled_while_timing']} | {r['cubins_in_cache']} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
