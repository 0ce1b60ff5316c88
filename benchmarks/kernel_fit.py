"""Fixed cost and streaming rate of each kernel, fitted to a GPU kernel table (no GPU needed).

A call's time is a fixed part (launches inside the graph, the first bytes' latency, the last wave
of programs) plus its bytes over the rate at which the kernel streams them. The kernel table of
`gpu_kernels.py` has every format and M on five layer shapes of 8.9 to 117 MB, so a least-squares
line through (bytes, time) per format and M separates the two: where the line's slope is near the
copy bandwidth and the intercept is large, a kernel streams well and loses its time in fixed costs
(extra launches, tails); where the slope is poor, the loop itself is slow. FP16 cuBLAS, fitted the
same way on the same shapes, is the yardstick for the fixed part. Also: the time the issue's 75%-of-
copy-bandwidth aim allows each shape, against the fitted fixed cost of cuBLAS alone. The line
describes memory-bound calls (decode, M <= 16); at M = 512 the calls are compute-bound and the fit
says nothing (negative intercepts).

With --counts, the SASS instruction counts of the same code (`kernels_compile.py`'s JSON, compiled
with the Triton the GPU ran) turn each decode row's streaming time into the rate at which the GPU
issued that kernel's K-loop instructions: where every path issues at about the same rate, the
kernels are issue-bound and instructions per weight byte predict their streaming rate. With
--predict, another compile JSON (the code as it is now) gets that prediction for its leanest configs.

    python benchmarks/kernel_fit.py benchmarks/results/kernels-NVIDIA_H200-int4-g128_int8-bf16.json
    python benchmarks/kernel_fit.py REPORT --counts COUNTS_OF_ITS_COMMIT.json --predict COUNTS_NOW.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

AIM_SHARE_OF_COPY = 0.75  # the issue's aim for INT4 at M = 1
SMS = 132  # an H100/H200 SXM's SMs (a report from gpu_kernels.py names its own: "sms")
SCHEDULERS = 4  # warp schedulers an SM
# Thread-instructions an H100/H200 SXM can issue per second: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz.
ISSUE_PEAK = SMS * SCHEDULERS * 32 * 1.98e9
KERNELS = {"int4": ("_w4a16_kernel", "w4a16", 0.5), "int8": ("_w8a16_kernel", "w8a16", 1.0)}  # weight bytes per weight


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least-squares y = a + b x through (x, y) points: (a, b, r2). Needs two distinct x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        raise ValueError("a line needs at least two distinct byte counts")
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    syy = sum((y - mean_y) ** 2 for _, y in points)
    r2 = 1.0 if syy == 0 else sxy * sxy / (sxx * syy)
    return intercept, slope, r2


def fp16_bytes(row: dict) -> int:
    """What cuBLAS's F.linear moves for the row's shape: fp16 weights, activations and outputs."""
    return 2 * (row["N"] * row["K"] + row["M"] * row["K"] + row["M"] * row["N"])


def fits(report: dict) -> list[dict]:
    """One fit per (format, M) of the timed rows, and one per M of FP16 cuBLAS on the same shapes:
    fixed µs (the intercept), streaming GB/s (1 / slope) and its share of the copy bandwidth, r2."""
    series: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    fp16: dict[int, dict[str, tuple[float, float]]] = defaultdict(dict)
    for row in report["rows"]:
        if "ms" not in row:
            continue
        series[(row["format"], row["M"])].append((row["bytes_moved"], row["ms"] * 1e3))
        fp16[row["M"]][row["shape"]] = (fp16_bytes(row), row["fp16_ms"] * 1e3)
    series.update({("fp16 cuBLAS", m): list(shapes.values()) for m, shapes in fp16.items()})
    copy = report.get("copy_GBps")
    out = []
    for (fmt, m), points in series.items():
        if len({x for x, _ in points}) < 2:
            continue
        intercept, slope, r2 = line_fit(points)
        gbps = 1e-3 / slope if slope > 0 else float("inf")  # bytes per µs -> GB/s
        out.append({"format": fmt, "M": m, "shapes": len(points), "fixed_us": intercept, "stream_GBps": gbps,
                    "stream_pct_of_copy": 100 * gbps / copy if copy else None, "r2": r2})
    return sorted(out, key=lambda f: (f["format"], f["M"]))


def aim_times(report: dict) -> list[dict]:
    """Per INT4 shape at M = 1: the time 75% of the copy bandwidth allows, the time measured, and
    FP16 cuBLAS's fitted fixed cost at M = 1 (what any one call in that graph pays before a byte)."""
    copy = report.get("copy_GBps")
    cublas = next((f for f in fits(report) if f["format"] == "fp16 cuBLAS" and f["M"] == 1), None)
    rows = []
    for row in report["rows"]:
        if "ms" in row and row["M"] == 1 and row["format"].startswith("int4") and copy:
            rows.append({"shape": row["shape"], "format": row["format"], "MB": row["bytes_moved"] / 1e6,
                         "aim_us": row["bytes_moved"] / (AIM_SHARE_OF_COPY * copy * 1e3), "measured_us": row["ms"] * 1e3,
                         "cublas_fixed_us": cublas["fixed_us"] if cublas else None})
    return rows


def tiles(config: dict) -> str:
    """A launch config as a key: its tile constexprs and launch options, in a fixed order."""
    return json.dumps({key: value for key, value in config.items()}, sort_keys=True)


def chosen_config(report: dict, row: dict) -> dict | None:
    """The launch config the tuner chose for a row: the row's own (newer reports), else the
    report's chosen_configs entry for the row's kernel, decode regime, M bucket and shape."""
    if row.get("config"):
        return row["config"]
    from mpq.kernels.triton_tuning import m_bucket  # the tuner's own key: its M bucket

    kernel = KERNELS[row["format"][:4]][0]
    prefix = f"{kernel} gemv {m_bucket(row['M'])} {row['N']} {row['K']} "
    return next((config for key, config in report.get("chosen_configs", {}).items() if key.startswith(prefix)), None)


def issue_rates(report: dict, counts: dict) -> list[dict]:
    """Per timed decode row (M <= 16) whose chosen config `counts` (a kernels_compile.py JSON) has
    compiled: instructions per weight byte of its K loop, the weight bytes streamed per second past
    the series' fixed cost, and their product, the thread-instructions issued per second."""
    fixed = {(f["format"], f["M"]): f["fixed_us"] for f in fits(report)}
    compiled = {(r["kernel"], r["M"], tiles(r["config"])): r for r in counts["rows"] if r.get("instructions_per_weight_byte")}
    out = []
    for row in report["rows"]:
        if "ms" not in row or row["M"] > 16 or (row["format"], row["M"]) not in fixed:
            continue
        config = chosen_config(report, row)
        _, name, bytes_per_weight = KERNELS[row["format"][:4]]
        counted = compiled.get((name, 1 if row["M"] == 1 else 16, tiles(config))) if config else None
        streaming_us = row["ms"] * 1e3 - fixed[(row["format"], row["M"])]
        if counted is None or streaming_us <= 0:
            continue
        per_byte = counted["instructions_per_weight_byte"]
        weight_rate = row["N"] * row["K"] * bytes_per_weight / (streaming_us * 1e-6)
        out.append({"format": row["format"], "shape": row["shape"], "M": row["M"], "config": config,
                    "instructions_per_weight_byte": per_byte, "weight_GBps": weight_rate / 1e9,
                    "issued_per_s": weight_rate * per_byte, "share_of_issue_peak": weight_rate * per_byte / ISSUE_PEAK,
                    **occupancy(row, config, counted, report.get("sms", SMS))})
    return out


def occupancy(row: dict, config: dict, counted: dict, sms: int) -> dict:
    """How many programs a row's launch has, how many an SM holds at once (`programs_per_sm` of its
    compiled config, where kernels_compile.py recorded it), the waves that makes, and the warps each
    scheduler has to choose from in the first: with one or two, a warp's own stalls (shared loads,
    MMAs, conversion chains) go unhidden, whatever the memory does."""
    programs = -(-row["M"] // config["BLOCK_M"]) * -(-row["N"] // config["BLOCK_N"]) * config["SPLIT_K"]
    found = {"programs": programs}
    if counted.get("programs_per_sm"):
        held = counted["programs_per_sm"]
        found.update({"programs_per_sm": held, "waves": programs / (held * sms),
                      "warps_per_scheduler": min(programs / sms, held) * config["num_warps"] / SCHEDULERS})
    return found


def predictions(rates: list[dict], counts_now: dict) -> list[dict]:
    """The streaming rate each leanest config of `counts_now` would reach at the median issue rate
    the measured rows showed: weight GB/s = issued per second / instructions per weight byte."""
    median = sorted(r["issued_per_s"] for r in rates)[len(rates) // 2]
    return [{"kernel": lean["kernel"], "M": lean["M"], "config": lean["config"],
             "instructions_per_weight_byte": lean["instructions_per_weight_byte"],
             "predicted_weight_GBps": median / lean["instructions_per_weight_byte"] / 1e9, "issued_per_s": median}
            for lean in counts_now["leanest"]]


def print_issue_rates(rates: list[dict]) -> None:
    print(f"\nIssue rate of each decode row's K loop (peak: {ISSUE_PEAK:.2e} thread-instructions/s):")
    print("| format | shape | M | instr / weight byte | weight GB/s past the fixed cost | issued / s | of peak | "
          "programs | an SM holds | waves | warps a scheduler |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rates:
        held = (f"{r['programs_per_sm']} | {r['waves']:.2f} | {r['warps_per_scheduler']:.1f}" if "programs_per_sm" in r
                else "- | - | -")
        print(f"| {r['format']} | {r['shape']} | {r['M']} | {r['instructions_per_weight_byte']:.2f} | "
              f"{r['weight_GBps']:.0f} | {r['issued_per_s']:.2e} | {r['share_of_issue_peak']:.0%} | {r['programs']} | {held} |")


def print_predictions(rows: list[dict]) -> None:
    print(f"\nAt the median issue rate ({rows[0]['issued_per_s']:.2e}/s), the leanest configs now would stream:")
    print("| kernel | M | config | instr / weight byte | weight GB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        print(f"| {r['kernel']} | {r['M']} | {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} split {c['SPLIT_K']}, "
              f"{c['num_warps']} warps | {r['instructions_per_weight_byte']:.2f} | {r['predicted_weight_GBps']:.0f} |")


def print_fits(report: dict) -> None:
    print("| format | M | shapes | fixed µs | streaming GB/s | % of copy BW | r2 |")
    print("|---|---|---|---|---|---|---|")
    for f in fits(report):
        share = f"{f['stream_pct_of_copy']:.0f}%" if f["stream_pct_of_copy"] is not None else "-"
        print(f"| {f['format']} | {f['M']} | {f['shapes']} | {f['fixed_us']:.1f} | {f['stream_GBps']:.0f} | {share} | {f['r2']:.3f} |")
    aims = aim_times(report)
    if aims:
        print(f"\nINT4 at M = 1 against the aim ({AIM_SHARE_OF_COPY:.0%} of {report['copy_GBps']:.0f} GB/s):")
        print("| shape | MB | aim µs | measured µs | FP16 cuBLAS fixed µs |")
        print("|---|---|---|---|---|")
        for a in aims:
            fixed = f"{a['cublas_fixed_us']:.1f}" if a["cublas_fixed_us"] is not None else "-"
            print(f"| {a['shape']} | {a['MB']:.1f} | {a['aim_us']:.1f} | {a['measured_us']:.1f} | {fixed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a kernels-*.json written by benchmarks/gpu_kernels.py on a GPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default: beside the report, -fit.json)")
    parser.add_argument("--counts", type=Path, default=None,
                        help="kernels_compile.py JSON of the code and Triton the report was measured with")
    parser.add_argument("--predict", type=Path, default=None,
                        help="kernels_compile.py JSON of other code (needs --counts): its leanest configs' streaming rates")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    if not any("ms" in row for row in report.get("rows", [])):
        raise SystemExit(f"{args.report}: no timed rows (a smoke run?); fit a report from a GPU run")
    if args.predict and not args.counts:
        raise SystemExit("--predict needs --counts: the issue rate it predicts from is measured against those counts")
    print(f"# {report.get('device')}: {args.report.name}")
    print_fits(report)
    result = {"source": args.report.name, "device": report.get("device"), "copy_GBps": report.get("copy_GBps"),
              "fits": fits(report), "int4_m1_aim": aim_times(report)}
    if args.counts:
        counts = json.loads(args.counts.read_text())
        result["counts"] = {"source": args.counts.name, "triton": counts.get("triton")}
        result["issue_rates"] = issue_rates(report, counts)
        if not result["issue_rates"]:
            raise SystemExit(f"{args.counts}: none of the report's chosen decode configs is compiled there")
        print_issue_rates(result["issue_rates"])
        if args.predict:
            now = json.loads(args.predict.read_text())
            result["predicted"] = {"source": args.predict.name, "triton": now.get("triton"),
                                   "rows": predictions(result["issue_rates"], now)}
            print_predictions(result["predicted"]["rows"])
    out = args.out or args.report.with_name(args.report.stem + "-fit.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
