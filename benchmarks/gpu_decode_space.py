"""Decode launch space (GPU): every config of a wider space than the tuner's, timed, per layer shape.

The tuner (mpq.kernels.triton_tuning) picks among a small space: tile width, K step, split and
(INT4 at M = 1) loading ahead, with 4 warps (8 for INT4's 256 x 128 tensor-core tiles, 1 or 4 for
its 8-row tiles turned round, 1 or 2 for the few-warp 16-row tiles: triton_common.few_warp_tiles)
and 3 pipeline stages. This script times that space (INT4: its whole decode space, with the 16-row
tiles its tuner leaves to the tiles turned round up to 8 rows: triton_w4a16_configs.turned_serves) crossed
with 2, 4 and 8 warps (each config also on its own; tiles turned round keep theirs: one a K step)
and 3 or 4 stages, for W4A16 (INT4 groups of 128) and W8A16 at decode sizes (M = 1 and 16) on
Llama-shaped layers, with the tuner's own timer (one call in a CUDA graph, L2 flushed before each
replay). Per shape and M it reports:
- the tuner's best, the wider space's best, the best per warp count;
- the best single-row INT4 config at M = 1 with and without PREFETCH, and in Triton's pipeline (PIPELINE);
  and with long steps (2-4 groups a K step: 128-256 bytes of each row, triton_w4a16_configs.long_steps) against
  steps of one group (64 bytes);
- the best INT4 tensor-core config reading int32 words (word_dots) against the same configs on the
  byte path (WORD_DOTS=False) and with each step's words in the order they were loaded (K_WIDTH=0,
  not in the tensor cores' operand order: triton_w4a16_bits.operand_order), both at the tuner's warps
  and stages only;
- the best 8-row tile turned round (TRANSPOSED, M <= 8) against the best 16-row word_dots tile;
- the time of the old split-K wrapper alone (zero an fp32 buffer, cast it back: the two launches a
  config with SPLIT_K > 1 added before its last program finished the sum in the kernel).
The three fastest of each are timed again as gpu_kernels.py times a layer (weights rotated through
DRAM), so the rows compare with its table.
Prints a table and writes JSON (rewritten after every shape, so a run cut off keeps its rows).

    python benchmarks/gpu_decode_space.py --out $OUT      # on a CUDA machine (run 2: INT4 at M = 1 on the H200)
    python benchmarks/gpu_decode_space.py --smoke         # tiny shape, two configs, correctness only (CPU: interpreter)
    python benchmarks/gpu_decode_space.py --read benchmarks/results/decode-space-NVIDIA_H200.json
                                                          # a sweep's K steps per code path (no GPU)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpu_kernels import benchmark_device, code_path, quantised_layer, quantised_linear, relative_error, takes_long_steps  # a sibling script: run as one, this folder is first on sys.path

SHAPES = {"attn 4096x4096": (4096, 4096), "up 4096->14336": (14336, 4096), "down 14336->4096": (4096, 14336)}
SMOKE_SHAPES = {"smoke 96x256": (96, 256)}
WARPS = (2, 4, 8)
STAGES = (3, 4)


def tuner_space(fmt_name: str, m: int, k: int) -> list[dict]:
    """The tuner's candidates for (format, M) on a layer of K inputs (W8A16's before its single-row filter)."""
    from mpq.kernels import triton_w4a16_configs, triton_w8a16

    if fmt_name == "int8":
        return triton_w8a16.decode_space(m)  # filtered in space(), per warp count
    return triton_w4a16_configs.tuner_space(m, 128, k)


def base_space(fmt_name: str, m: int, k: int) -> list[dict]:
    """The configs the sweep crosses with warps and stages: the tuner's, and for INT4 its whole decode
    space, with the 16-row tiles its tuner leaves out up to 8 rows (triton_w4a16_configs.turned_serves), so
    that each sweep weighs them against the tiles turned round again."""
    from mpq.kernels import triton_w4a16_configs

    return tuner_space(fmt_name, m, k) if fmt_name == "int8" else triton_w4a16_configs.decode_space(m, 128, k)


def space(fmt_name: str, m: int, k: int, smoke: bool) -> list[dict]:
    """base_space for (format, M, K) crossed with WARPS x STAGES (W8A16's single-row configs kept
    only where their accumulator fits the warps' registers, as the tuner keeps them), and for INT4
    its word_dots configs again on the byte path (WORD_DOTS=False) and with their words in the order
    loaded (K_WIDTH=0)."""
    from mpq.kernels.triton_common import accumulator_fits
    from mpq.kernels.triton_w4a16_configs import runs_word_dots

    base = base_space(fmt_name, m, k)
    configs = []
    for config in base:
        # tiles turned round keep their warps: one a K step (STACK); the others run their own and 2, 4 and 8
        for warps in (config["num_warps"],) if config.get("TRANSPOSED") else sorted({config["num_warps"], *WARPS}):
            for stages in STAGES:
                varied = {**config, "num_warps": warps, "num_stages": stages}
                if fmt_name == "int8" and varied["BLOCK_M"] == 1 and not accumulator_fits(varied):
                    continue
                if varied not in configs:
                    configs.append(varied)
    if smoke:  # one tuner config and one of another warp count
        return [c for c in configs if c["num_warps"] == 4 and c["num_stages"] == 3][:1] + \
               [c for c in configs if c["num_warps"] == 8][:1]
    if fmt_name != "int8":
        configs += [{**config, "WORD_DOTS": False} for config in base if runs_word_dots(config)]
        configs += [{**config, "K_WIDTH": 0} for config in base if runs_word_dots(config)]
    return configs


def without_ms(config: dict) -> dict:
    return {key: value for key, value in config.items() if key != "ms"}


def bests(timed: list[dict], tuner: list[dict], fmt_name: str, base: list[dict] | None = None) -> dict:
    """The fastest config of each kind among `timed` (configs of `fmt_name` with their "ms", fastest
    first); `base`: the configs the sweep crossed with warps and stages (base_space; the tuner's if None)."""
    from mpq.kernels.triton_w4a16_configs import runs_word_dots

    base = tuner if base is None else base
    in_tuner = [c for c in timed if without_ms(c) in tuner] or timed
    return {"tuner_best": in_tuner[0], "wide_best": timed[0],
            "best_per_warps": {w: next(c for c in timed if c["num_warps"] == w) for w in sorted({c["num_warps"] for c in timed})},
            # INT4 at M = 1: the single-row loop loading a step ahead against the one that does not
            "best_prefetch": next((c for c in timed if c.get("PREFETCH")), None),
            "best_single_row_without_prefetch": next((c for c in timed if c["BLOCK_M"] == 1 and not c.get("PREFETCH")
                                                      and not c.get("PIPELINE")), None),
            # and in Triton's pipeline (PIPELINE), against both
            "best_pipelined_single_row": next((c for c in timed if c.get("PIPELINE")), None),
            # single_row's long steps (2-4 groups of 128 a step: 128-256 bytes of a row), against those of one group
            "best_long_steps": next((c for c in timed if takes_long_steps(c, fmt_name)), None),
            "best_single_row_one_group_a_step": next((c for c in timed if c["BLOCK_M"] == 1
                                                      and not takes_long_steps(c, fmt_name)), None),
            # INT4 on the tensor cores: int32 words against bytes, over the same configs (base's, at their own
            # warps and stages, as the byte path and the words as loaded are swept)
            "best_word_dots": next((c for c in timed if runs_word_dots(c) and without_ms(c) in base), None),
            "best_byte_path": next((c for c in timed if c.get("WORD_DOTS") is False), None),
            "best_words_as_loaded": next((c for c in timed if c.get("K_WIDTH") == 0), None),
            # word_dots turned round (8-row tiles, M <= 8), against best_word_dots' 16-row tiles
            "best_transposed": next((c for c in timed if c.get("TRANSPOSED")), None),
            "all": timed}


def sweep(name: str, n: int, k: int, fmt_name: str, m: int, device: str, smoke: bool) -> dict:
    """Every config of the space for one shape, format and M: checked against the reference, timed."""
    from mpq.formats import get_format
    from mpq.kernels.triton_tuning import compile_ahead, gpu_time_ms, rotating_time_ms

    fmt = get_format(fmt_name)
    sets, reference, _ = quantised_layer(n, k, fmt, device, smoke)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), reference)
    configs = space(fmt_name, m, k, smoke)

    def on_device(config: dict) -> None:
        with torch.cuda.device(x.device):  # the device is per thread in CUDA
            quantised_linear(fmt, x, sets[0], config)

    compile_s = 0.0 if smoke else compile_ahead(configs, on_device)
    timed, failed, worst_err = [], 0, 0.0
    for config in configs:
        try:
            got = quantised_linear(fmt, x, sets[0], config)
            worst_err = max(worst_err, relative_error(got, expected))
            ms = None if smoke else gpu_time_ms(lambda config=config: quantised_linear(fmt, x, sets[0], config))
        except Exception:  # noqa: BLE001 - a config the device cannot run (registers, shared memory) is not a result
            failed += 1
            continue
        timed.append({**config, "ms": ms})
    row = {"shape": name, "N": n, "K": k, "format": fmt_name, "M": m, "configs": len(configs), "failed": failed,
           "worst_rel_err": worst_err, "compile_ahead_s": compile_s}
    if smoke or not timed:  # no timing, or no config the device could run (the row says how many failed)
        return row
    timed.sort(key=lambda c: c["ms"])
    row.update(bests(timed, tuner_space(fmt_name, m, k), fmt_name, base_space(fmt_name, m, k)))
    # the old split-K wrapper alone: zero an fp32 buffer, cast it back (what SPLIT_K > 1 added to a call
    # before the last program of a tile finished the sum in the kernel)
    row["split_wrapper_ms"] = gpu_time_ms(lambda: torch.zeros((m, n), device=device, dtype=torch.float32).to(x.dtype))
    # the three fastest, and the tuner's best, as gpu_kernels.py times a layer: weights rotated through DRAM
    rotated = {}
    for label, config in [("tuner_best", row["tuner_best"])] + [(f"wide_{i}", c) for i, c in enumerate(timed[:3])]:
        launch_config = {key: config[key] for key in config if key != "ms"}
        rotated[label] = {**launch_config, "rotating_ms": rotating_time_ms(
            [lambda t=t, c=launch_config: quantised_linear(fmt, x, t, c) for t in sets])}
    row["rotating"] = rotated
    return row


def by_path_and_step(row: dict) -> dict[str, dict[int, float]]:
    """One sweep row's fastest time of each code path (at any warps) per K step, over the row's
    fastest config: which K steps lose on which path (the tuner's INT4 decode space steps K by 128
    only on this reading of run 2's sweep: benchmarks/GPU_NOTES.md)."""
    timed = [c for c in row["all"] if c.get("ms") is not None]
    fastest = min(c["ms"] for c in timed)
    table: dict[str, dict[int, float]] = {}
    for c in timed:
        path = code_path({**c, "num_warps": 4}, row["format"]) + (", words as loaded" if c.get("K_WIDTH") == 0 else "")
        steps = table.setdefault(path, {})
        steps[c["BLOCK_K"]] = min(c["ms"] / fastest, steps.get(c["BLOCK_K"], float("inf")))
    return table


def print_steps(report: dict) -> None:
    for row in report["rows"]:
        print(f"{row['format']} {row['shape']} M={row['M']} ({report['device']}): fastest of each path per K step, "
              f"over the fastest config")
        for path, steps in sorted(by_path_and_step(row).items()):
            print(f"  {path}: " + ", ".join(f"{k}: {ratio:.2f}" for k, ratio in sorted(steps.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, two configs, no timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--formats", default="int4-g128,int8")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--read", type=Path, help="a sweep's JSON: print each path's best per K step, time nothing")
    args = parser.parse_args()
    if args.read:
        print_steps(json.loads(args.read.read_text()))
        return
    device = benchmark_device("benchmarks/gpu_decode_space.py", args.smoke)
    from mpq.io import write_json_atomic
    from mpq.qlinear import triton_version

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "triton": triton_version(), "activations": "bfloat16", "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("decode-space-smoke.json" if args.smoke else f"decode-space-{report['device'].replace(' ', '_')}.json")
    start = time.perf_counter()
    for fmt_name in args.formats.split(","):
        for m in (int(b) for b in args.batches.split(",")):  # INT4 at M = 1 first: the row issue 3 aims at
            for name, (n, k) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
                report["rows"].append(sweep(name, n, k, fmt_name, m, device, args.smoke))
                report["elapsed_s"] = time.perf_counter() - start
                write_json_atomic(path, report)
                print_row(report["rows"][-1])
    print(f"wrote {path}")
    bad = [r for r in report["rows"] if not r["worst_rel_err"] < 1e-2]
    if bad:
        raise SystemExit(f"{len(bad)} rows with a config off the reference by 1e-2 or more")


def print_row(r: dict) -> None:
    def brief(c: dict | None) -> str:
        if c is None:
            return "-"
        return (f"{c['BLOCK_M']}/{c['BLOCK_N']}/{c['BLOCK_K']} s{c['SPLIT_K']} w{c['num_warps']} st{c['num_stages']}"
                + (" prefetch" if c.get("PREFETCH") else "")
                + (" pipelined" if c.get("PIPELINE") else "")
                + (" long steps" if takes_long_steps(c, r["format"]) else "")
                + (" bytes" if c.get("WORD_DOTS") is False else "")
                + (" words as loaded" if c.get("K_WIDTH") == 0 else "")
                + (f" turned round, {c.get('STACK', 1)} along K" if c.get("TRANSPOSED") else "")
                + (f", {c['STEPS']} steps a pass" if c.get("STEPS", 1) > 1 else "")
                + (f" {c['ms'] * 1e3:.1f}us" if c.get("ms") is not None else "")
                + (f" (rotated {c['rotating_ms'] * 1e3:.1f}us)" if "rotating_ms" in c else ""))

    head = f"{r['format']} {r['shape']} M={r['M']}: {r['configs']} configs, {r['failed']} failed, worst rel err {r['worst_rel_err']:.1e}"
    if "tuner_best" not in r:
        print(head, flush=True)
        return
    print(head + f", compiled ahead in {r['compile_ahead_s']:.0f} s; split-K wrapper alone {r['split_wrapper_ms'] * 1e3:.1f}us", flush=True)
    print(f"  tuner's space best: {brief(r['rotating']['tuner_best'] | {'ms': r['tuner_best']['ms']})}", flush=True)
    for i in range(3):
        if f"wide_{i}" in r["rotating"]:
            print(f"  wide #{i + 1}: {brief(r['rotating'][f'wide_{i}'] | {'ms': r['all'][i]['ms']})}", flush=True)
    print("  best per warps: " + "; ".join(f"{w}: {brief(c)}" for w, c in r["best_per_warps"].items()), flush=True)
    if r["best_prefetch"] is not None:
        print(f"  single row, loading a step ahead: {brief(r['best_prefetch'])}; "
              f"without: {brief(r['best_single_row_without_prefetch'])}", flush=True)
    if r.get("best_long_steps") is not None:
        print(f"  single row, long steps: {brief(r['best_long_steps'])}; one group a step: "
              f"{brief(r['best_single_row_one_group_a_step'])}", flush=True)
    if r["best_byte_path"] is not None:
        print(f"  tensor cores, int32 words: {brief(r['best_word_dots'])}; bytes: {brief(r['best_byte_path'])}; "
              f"words as loaded: {brief(r['best_words_as_loaded'])}", flush=True)
    if r.get("best_transposed") is not None:
        print(f"  word_dots turned round (8 rows): {brief(r['best_transposed'])}; "
              f"16 rows: {brief(r['best_word_dots'])}", flush=True)


if __name__ == "__main__":
    main()
