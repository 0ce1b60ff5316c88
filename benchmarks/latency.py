"""Latency prediction against measurement: compile each demo in each regime and compare, for every
config the compile measured (the Pareto set and the uniform configs), the predicted step time
(sum of profiled layer times + the rest of the model) with the emitted model's measured step.
Prints a table per run and writes JSON.

    python benchmarks/latency.py                          # demo decode + prefill, minilm prefill
    python benchmarks/latency.py --runs demo:decode --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mpq.compile import CompileOptions, compile_model
from mpq.environment import hardware, versions

DEFAULT_RUNS = "demo:decode,demo:prefill,minilm:prefill"
BUDGETS = {"demo": "8MB", "minilm": None}


def bench(model: str, regime: str, work: Path, trials: int) -> dict:
    start = time.time()
    summary = compile_model(CompileOptions(model=model, max_mem=BUDGETS.get(model), out=work / f"{model}-{regime}",
                                           regime=regime, trials=trials, progress=False))
    rows = []
    for kind, entries in (("pareto", summary["configs"]), ("uniform", summary["uniform"])):
        for row in entries:
            rows.append({"config": row["name"], "kind": kind, "bytes": row["bytes"],
                         "predicted_ms": row["latency_predicted_s"] * 1e3, "measured_ms": row["latency_measured_s"] * 1e3,
                         "error": row["latency_error"], "predicted_speedup": row["speedup_predicted"],
                         "measured_speedup": row["speedup_measured"], "speedup_error": row["speedup_error"]})
    lat = summary["latency"]
    pareto = [r for r in rows if r["kind"] == "pareto"]
    return {"model": model, "regime": lat["describe"], "baseline_ms": lat["baseline_seconds"] * 1e3,
            "baseline_now_ms": lat["baseline_now_seconds"] * 1e3, "rest_ms": lat["rest_seconds"] * 1e3,
            "profile_seconds": lat["profile_seconds"], "rows": rows,
            "pareto_max_abs_error": max(abs(r["error"]) for r in pareto),
            "pareto_max_abs_speedup_error": max(abs(r["speedup_error"]) for r in pareto),
            "all_max_abs_error": max(abs(r["error"]) for r in rows),
            "compile_seconds": round(time.time() - start, 1)}


def print_table(result: dict) -> None:
    print(f"\n## {result['model']}: {result['regime']}; unquantised {result['baseline_ms']:.3f} ms at profiling, "
          f"{result['baseline_now_ms']:.3f} ms beside the configs (rest {result['rest_ms']:.3f} ms); worst error over the "
          f"Pareto set: step time {result['pareto_max_abs_error']:.1%}, speedup {result['pareto_max_abs_speedup_error']:.1%}")
    print("| config | kind | MB | predicted ms | measured ms | error | predicted speedup | measured speedup | error |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['config']} | {r['kind']} | {r['bytes'] / 1e6:.3f} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | "
              f"{r['error']:+.1%} | {r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {r['speedup_error']:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="model:regime pairs")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs.split(","):
            model, regime = run.split(":")
            result = bench(model, regime, Path(tmp), args.trials)
            print_table(result)
            results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "latency.json"
    path.write_text(json.dumps({"hardware": hardware(), "versions": versions(), "results": results}, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
