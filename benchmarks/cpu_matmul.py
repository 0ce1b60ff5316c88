"""What computing 16-bit products in float32 (mpq.cpu_matmul) does to mpq's quality passes on this
CPU: the demo's held-out evaluation (the pass compile runs for every config it measures) and one
4096x4096 bf16 linear layer at 2048 tokens, timed with MPQ_CPU_MATMUL=native (torch's own 16-bit
GEMM) and =fp32, with the perplexities both give and the peak RSS each run adds over its loaded
inputs (each run in a process of its own). Prints a table and writes JSON.

    python benchmarks/cpu_matmul.py                 # benchmarks/results/cpu_matmul.json
    python benchmarks/cpu_matmul.py --repeats 1 --out /tmp/cpu_matmul.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpq import cpu_matmul
from mpq.environment import hardware, versions
from mpq.models import load_model
from mpq.tasks import CausalLMTask

ROOT = Path(__file__).resolve().parent
SETTINGS = ("native", "fp32")


def _best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_one(setting: str, what: str, repeats: int) -> dict:
    """Child process: one MPQ_CPU_MATMUL setting and one workload, its inputs made before the peak
    RSS is sampled (so that the peak is what the products hold, not what an earlier run left)."""
    from mpq.evaluate import PeakMemory

    os.environ["MPQ_CPU_MATMUL"] = setting
    metrics = {}
    if what == "eval":
        loaded = load_model("demo")
        task = CausalLMTask(loaded.tokenizer, None, 0, 0)

        def run() -> None:
            metrics.update(task.evaluate(loaded.model))
    else:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2048, 4096, generator=gen).bfloat16()
        w = torch.randn(4096, 4096, generator=gen).bfloat16()

        def run() -> None:
            with cpu_matmul.float32_products():
                F.linear(x, w)

    run()  # warm-up: a GEMM's first call faults its library's code pages in, which RSS counts
    start_rss = PeakMemory.rss()
    with PeakMemory() as memory:
        seconds = _best_seconds(run, repeats)
    return {"seconds": seconds, "peak_rss_mb": (memory.peak - start_rss) / 2**20, **metrics}


def measure(repeats: int) -> dict:
    rows = []
    for setting in SETTINGS:
        row = {"setting": setting}
        for what in ("eval", "layer"):
            child = subprocess.run([sys.executable, __file__, "--child", setting, what, "--repeats", str(repeats)],
                                   capture_output=True, text=True, check=True)
            out = json.loads(child.stdout.strip().splitlines()[-1])
            row[f"{what}_s"], row[f"{what}_peak_rss_mb"] = out.pop("seconds"), out.pop("peak_rss_mb")
            row.update({k: v for k, v in out.items() if k in ("ppl", "ppl_text", "ppl_code")})
        rows.append(row)
    return {"hardware": hardware(), "native_bf16_gemm": cpu_matmul.native_gemm(torch.bfloat16),
            "auto_routes_bf16": cpu_matmul.routes(torch.bfloat16), "versions": versions(), "repeats": repeats,
            "eval": "demo, held-out validation half: 24 x 256 tokens of text and 24 of code, batches of 8",
            "layer": "F.linear, x [2048, 4096] bf16, W [4096, 4096] bf16 (its output alone is 16 MB)",
            "peak_rss": "above the process's RSS with the model (or x and W) loaded and one warm-up run done; "
                        "each run in a process of its own",
            "rows": rows}


def table(result: dict) -> str:
    native, fp32 = result["rows"]
    lines = [f"hardware: {result['hardware']}; oneDNN bf16 GEMM: {result['native_bf16_gemm']}; "
             f"auto routes bf16: {result['auto_routes_bf16']}",
             "| MPQ_CPU_MATMUL | demo held-out eval (s) | its peak RSS (MB) | 4096x4096 layer, 2048 tokens (s) | "
             "its peak RSS (MB) | ppl | ppl text | ppl code |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['setting']} | {row['eval_s']:.2f} | {row['eval_peak_rss_mb']:.0f} | {row['layer_s']:.3f} | "
                     f"{row['layer_peak_rss_mb']:.0f} | {row['ppl']:.4f} | {row['ppl_text']:.4f} | {row['ppl_code']:.4f} |")
    lines.append(f"speedup of fp32 products: eval {native['eval_s'] / fp32['eval_s']:.2f}x, layer "
                 f"{native['layer_s'] / fp32['layer_s']:.2f}x; perplexity ratio {fp32['ppl'] / native['ppl']:.6f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the fastest is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "cpu_matmul.json")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(*args.child, args.repeats)))
        return
    result = measure(args.repeats)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
