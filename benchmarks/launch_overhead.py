"""Host time of mpq's Triton launchers, without the launch itself (any machine, no GPU).

An eager decode step is bound by the host: on the H200 machine an eager INT4 call at M <= 16 took
84-154 us against 10-35 us of kernel (benchmarks/results/kernels-NVIDIA_H200-*.json). That time is
mpq's launcher (checks, the tuner's cache, the output buffer and, then, split-K's zeroing and cast) plus
Triton's. This script times the first part: w4a16_linear and w8a16_linear on CPU tensors, a 4096 x
4096 layer at M = 1 with a chosen config (with and without split-K), each kernel replaced by a stub
that takes the launch's arguments and does nothing. Beside them, the same torch calls a split-K
launch made before it finished the sum in the kernel (zeros, cast) and a tiny F.linear, as yardsticks of this machine's per-op cost.
Prints a table and writes JSON.

    python benchmarks/launch_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions (the stub replaces their launch), whatever the caller says

import torch  # noqa: E402

CONFIGS = {"no split": 1, "split-K 8": 8}


class StubKernel:
    """Takes `kernel[grid](*args, **meta)` as a Triton JIT function does, and launches nothing."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean wall time of `calls` calls in a row, in microseconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    from mpq.formats import get_format
    from mpq.kernels import triton_common, triton_tuning, triton_w4a16, triton_w8a16
    from mpq.qlinear import triton_layout
    from mpq.quantize import quantize_weight

    n = k = 4096
    torch.manual_seed(0)
    x = torch.randn(1, k).to(torch.bfloat16)
    # laid out as a Triton layer holds it (scale and zero point one word, column-major): zeros_layout's checks run in full
    int4_format = get_format("int4-g128")
    int4 = triton_layout(quantize_weight(torch.randn(n, k) * 0.02, int4_format), int4_format)
    int8 = quantize_weight(torch.randn(n, k) * 0.02, get_format("int8"))
    triton_w4a16._w4a16_kernel = StubKernel("_w4a16_kernel")
    triton_w8a16._w8a16_kernel = StubKernel("_w8a16_kernel")
    calls = {"w4a16_linear (INT4-g128)": lambda: triton_w4a16.w4a16_linear(x, int4["qweight"], int4["scales"], int4["zeros"], 128),
             "w8a16_linear (INT8)": lambda: triton_w8a16.w8a16_linear(x, int8["qweight"], int8["scales"])}
    rows = []
    for label, split in CONFIGS.items():
        config = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split, "num_warps": 4, "num_stages": 3}
        # the tuner's cache answers every shape with this config, as after a shape's first call
        triton_tuning._CHOSEN.clear()
        triton_common.choose_config = lambda key, candidates, run, timer=None, compile_one=None, c=config: \
            triton_tuning._CHOSEN.setdefault(key, c)
        for name, fn in calls.items():
            rows.append({"call": name, "config": label, "host_us": per_call_us(fn, args.calls)})
    yardsticks = {"torch.zeros + .to (what split-K adds)": lambda: torch.zeros((1, n)).to(torch.bfloat16),
                  "F.linear, bf16, 1 x 64 by 8 x 64": lambda w=torch.randn(8, 64).to(torch.bfloat16): torch.nn.functional.linear(x[:, :64], w)}
    for name, fn in yardsticks.items():
        rows.append({"call": name, "config": "-", "host_us": per_call_us(fn, args.calls)})
    report = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
              "layer": f"{n}x{k}, M = 1, bf16", "rows": rows}
    print(f"\n# launcher host time, Triton's launch stubbed; {report['layer']}; {report['cores']} cores, torch {report['torch']}")
    print("| call | config | host µs per call |\n|---|---|---|")
    for row in rows:
        print(f"| {row['call']} | {row['config']} | {row['host_us']:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "launch_overhead.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
