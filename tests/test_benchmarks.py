"""The benchmark scripts stay runnable: the kernel benchmark's smoke mode checks every kernel path."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpq.qlinear import QuantizedLinear

ROOT = Path(__file__).parent.parent


def run_benchmark(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """benchmarks/`script`.py with `args`, in its own process (its folder first on sys.path, as a user runs it)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_kernel_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    run_benchmark("gpu_kernels", "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "kernels-smoke.json").read_text())
    assert {r["format"] for r in report["rows"]} == {"int4-g128", "int8"}
    assert len(report["rows"]) == 2 * 2 * 3 and all(r["rel_err"] < 1e-2 for r in report["rows"])
    # split-K calls in a row (the tiles turned round too, where this Triton takes them), each right and
    # leaving the kept sums and counters zeroed; the programs of the 4-along-K tile's second split find no step
    from mpq.kernels.triton_w4a16_configs import TURNED_STACKS

    checks = report["split_sums"]
    assert len(checks) == 2 * (2 + len(TURNED_STACKS)) and all(c["calls"] == 3 for c in checks.values())
    assert all(c["worst_rel_err"] < 1e-2 and c["buffers_zeroed"] for c in checks.values()), checks
    # the decode rows again on overlapping weight rows (time_from_l2): right there too
    assert all(r["l2_rel_err"] < 1e-2 for r in report["rows"] if r["M"] <= 16)


def test_row_reads_benchmark_smoke(tmp_path):
    """row_reads.py's kernel reads every piece of each row a decode tile would, and no other: per
    program and row, the XOR of its steps' words equals numpy's, for every piece size and split."""
    pytest.importorskip("triton")
    run_benchmark("row_reads", "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "row-reads-smoke.json").read_text())
    assert len(report["rows"]) == 4 * 2 and all(r["right"] for r in report["rows"])
    assert {r["chunk"] for r in report["rows"]} == {32, 64, 128, 256}


@pytest.mark.slow
def test_experts_decode_benchmark_smoke(tmp_path):
    """The mixture benchmark's smoke run: grouped and looped decode both match the reference."""
    pytest.importorskip("triton")
    run_benchmark("experts_decode", "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "experts-decode-smoke.json").read_text())
    assert [(r["format"], r["tokens"]) for r in report["rows"]] == [(f, t) for f in ("int4-g128", "int8", "int4-g128+fp16")
                                                                    for t in (1, 4, 16)]
    assert all(r["rel_err_grouped"] < 1e-2 and r["rel_err_loop"] < 1e-2 for r in report["rows"])
    predicted = [r for r in report["rows"] if "predicted_launches_ms" in r]  # the latency model's probes, on one row
    assert [(r["format"], r["tokens"]) for r in predicted] == [("int4-g128+fp16", 1)] and predicted[0]["predicted_launches_ms"] > 0


def test_decode_space_benchmark_smoke(tmp_path):
    """The decode-space sweep's smoke run: two configs of each format and M, each matching the reference."""
    pytest.importorskip("triton")
    run_benchmark("gpu_decode_space", "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "decode-space-smoke.json").read_text())
    assert [(r["format"], r["M"]) for r in report["rows"]] == [(f, m) for f in ("int4-g128", "int8") for m in (1, 16)]
    assert all(r["configs"] == 2 and r["failed"] == 0 and r["worst_rel_err"] < 1e-2 for r in report["rows"])


def test_launch_overhead_benchmark_runs(tmp_path):
    """The launchers' host time with Triton's launch stubbed: every launcher and yardstick timed."""
    pytest.importorskip("triton")
    run_benchmark("launch_overhead", "--calls", "20", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "launch_overhead.json").read_text())["rows"]
    assert len(rows) == 6 and all(row["host_us"] > 0 for row in rows)


@pytest.mark.slow
def test_every_kernel_config_compiles_for_an_h100(tmp_path):
    """Each config a GPU would time (of those that differ only in a split of K, the smallest split:
    --one-split) goes through Triton's compiler to an sm_90 cubin on this CPU machine; the script fails on any config that does not compile, needs more shared memory than
    an H100 block has, misses tensor cores on a tl.dot path, or loads weights byte by byte. The
    leanest decode loops stay near or under the ~10 instructions per weight byte at which an H100
    stops being memory-bound (the byte-wise unpack with int-to-float conversions took 16.8 for
    INT4, two constants per nibble mask 10.5, q - z in fp32 before the tensor cores 10.0, and a
    per-step cross-warp reduction 11.8 for INT8; at M = 1, INT4 read byte by byte took 9.2 on the
    tensor cores and 11.2 on the FMA units, read as int32 words 6.9; at M = 16, the tensor cores'
    byte path 9.1, their int32 words (word_dots) 5.9, in the tensor cores' operand order 5.3, and
    with 64 columns a warp 4.3)."""
    pytest.importorskip("triton")
    from mpq.kernels import triton_dense_grouped, triton_w4a16_configs, triton_w8a16

    run_benchmark("kernels_compile", "--one-split", "--out", str(tmp_path), timeout=1200)
    report = json.loads((tmp_path / "kernels-compile-sm90.json").read_text())
    rows = report["rows"]
    candidates = [("w4a16", m, c) for m in (1, 16, 64, 512) for c in triton_w4a16_configs.tuner_space(m, 128, 4096)]
    candidates += [("w8a16", m, c) for m in (1, 16, 64, 512) for c in triton_w8a16.tuner_space(m)]
    expected = len(candidates) + len(triton_w4a16_configs.grouped_space(128)) + len(triton_w8a16.grouped_space())
    expected += len(triton_dense_grouped.grouped_space())
    assert len(rows) + report["left_out_splits"] == expected and not any(r["problems"] for r in rows)
    # --one-split (to keep this test's time down) compiles each config unsplit and at its smallest split of K
    # alone: every tile, path and pipeline depth is still compiled, split and not
    family = lambda kernel, m, c: (kernel, m, json.dumps({**c, "SPLIT_K": min(c["SPLIT_K"], 2)}, sort_keys=True))
    assert {family(*c) for c in candidates} == {family(r["kernel"], r["M"], r["config"]) for r in rows
                                                            if r["kernel"] in ("w4a16", "w8a16")}
    assert 100 < report["left_out_splits"] < len(rows)
    assert {r["kernel"] for r in rows} == {"w4a16", "w8a16", "w4a16-grouped", "w8a16-grouped", "dense-grouped"}
    # each cubin's registers a thread, and the programs an SM holds at once by the tightest of its limits
    assert all(0 < r["registers"] <= 255 and 1 <= r["programs_per_sm"] <= 32 for r in rows)
    assert {r["occupancy_bound"] for r in rows} <= {"registers", "shared", "warps", "blocks"}
    assert all(r["tensor_cores"] == (r["config"]["BLOCK_M"] > 1) for r in rows)
    # every decode path is timed at M = 1: single_row, and INT4's 8-row tiles turned round (its 16-row ones
    # from 9 rows: triton_w4a16_configs.turned_serves) or INT8's 16-row tiles
    at_one = lambda kernel: {r["config"]["BLOCK_M"] for r in rows if r["M"] == 1 and r["kernel"] == kernel}
    assert at_one("w4a16") == {1, 8} and at_one("w8a16") == {1, 16}
    # (read from the JSON: importing the script here would switch the interpreter off for later tests)
    leanest = {(r["kernel"], r["M"]): r["instructions_per_weight_byte"] for r in report["leanest"]}
    assert leanest[("w4a16", 1)] < 5.0 and leanest[("w4a16", 16)] < 5.0 and leanest[("w8a16", 1)] < 5, leanest
    # at M = 1 the 8-row tile turned round beats every 16-row tile, whose loop is the same at M = 1 and 16
    # (3.56 against 4.63 with Triton 3.9); with 4 warps side by side along K it stays under 4 (3.86), which it
    # does only while the words' [N/8, STACK, 8, J] load keeps the unpacked pairs out of shared memory (4.2
    # loaded as [STACK, N, J])
    int4_decode = [r for r in rows if r["kernel"] == "w4a16" and r["M"] == 1]
    turned = min(r["instructions_per_weight_byte"] for r in int4_decode if r["config"].get("TRANSPOSED"))
    upright = min(r["instructions_per_weight_byte"] for r in rows
                  if r["kernel"] == "w4a16" and r["M"] == 16 and r["config"]["BLOCK_M"] == 16)
    stacked = min(r["instructions_per_weight_byte"] for r in int4_decode if r["config"].get("STACK", 1) > 1)
    assert turned < 3.8 and turned < upright - 0.5 and stacked < 4.0, (turned, upright, stacked)
    # the scales and zeros, column-major as a Triton layer keeps them and each bf16 zero point right after
    # its scale (one 32-bit word a column), come through Triton's cp.async pipeline with the words: no plain
    # global load is left for a pass to wait on (kernels_compile's load_waits) in any tensor-core loop, decode
    # or prefill (before the pairs, the 16-row tiles under 64 columns a warp and every prefill tile kept 2)
    tiles = [r for r in rows if r["kernel"] == "w4a16" and r["config"]["BLOCK_M"] > 1]
    assert len(tiles) >= 80 and not [r["config"] for r in tiles if r["load_waits"]]
    # and the single row in Triton's pipeline (PIPELINE), at M = 1: none either, where the plain loop and
    # PREFETCH keep every load of x and of the scales plain
    pipelined = [r for r in rows if r["config"].get("PIPELINE")]
    assert len(pipelined) == 6 and not [r["config"] for r in pipelined if r["load_waits"]]
    assert all(r["load_waits"] for r in rows if r["kernel"] == "w4a16" and r["config"]["BLOCK_M"] == 1
               and not r["config"].get("PIPELINE"))
    # the single row loads each weight word's eight activations at once (load_x_words: 16 bytes a word),
    # where a load a pair took 16 loads of 4 bytes a step (with Triton 3.6 16 copies under PIPELINE): in K
    # steps of 128 a thread's loads or copies a step are at most 9, 16 to 128 columns (18-21 before)
    single = [r for r in rows if r["kernel"] == "w4a16" and r["config"]["BLOCK_M"] == 1 and r["config"]["BLOCK_K"] == 128]
    assert len(single) >= 10 and all(r["loop_opcodes"].get("LDG", 0) + r["loop_opcodes"].get("LDGSTS", 0) <= 9
                                     for r in single), [(r["config"], r["loop_opcodes"]) for r in single]
    # a mixture's experts in one launch keep the single-row loop: the expert's offset is paid once, before it
    assert leanest[("w4a16-grouped", 8)] < 7.5 and leanest[("w8a16-grouped", 8)] < 5.5, leanest
    assert leanest[("dense-grouped", 8)] < 3, leanest  # 16-bit experts: a multiply-add per 2 bytes, no dequantisation
    assert any(op.startswith("wgmma") for r in rows if r["M"] == 64 for op in r["ops"])  # Hopper's warpgroup MMA
    # with PDL (MPQ_PDL=1), one config of each code path compiled again: in each the program asks L2 for
    # its first weights, waits for the kernel ahead before any other memory instruction, and lets the
    # kernel behind launch after its loop (kernels_compile's problems check every one)
    pdl = report["dependent_launch"]
    assert {(r["kernel"], r["M"], r["config"]["BLOCK_M"], r["config"].get("TRANSPOSED", False)) for r in pdl} >= {
        ("w4a16", 1, 1, False), ("w4a16", 1, 8, True), ("w4a16", 16, 16, False), ("w4a16", 64, 64, False),
        ("w8a16", 1, 1, False), ("w8a16", 16, 16, False), ("w8a16", 64, 64, False)}
    assert any(r["config"].get("PREFETCH") for r in pdl) and any(r["config"].get("PIPELINE") for r in pdl)
    assert any(r["config"].get("WORD_DOTS") is False for r in pdl)
    assert all(r["dependent_launch"]["prefetches_before_wait"] and not r["problems"] for r in pdl)
    # two K steps a pass (STEPS, 128 bytes of each row), on the 16-row tiles and turned round: fewer
    # instructions a weight byte than the same tile a step a pass (Triton 3.6: 5.60 against 6.00 at 16 x
    # 128 x 128, 4.13 against 4.33 at 8 x 64 x 128 turned round)
    per_byte = {(r["M"], json.dumps(r["config"], sort_keys=True)): r["instructions_per_weight_byte"]
                for r in rows if r["kernel"] == "w4a16"}
    two_steps = [r for r in rows if r["kernel"] == "w4a16" and r["config"].get("STEPS", 1) == 2]
    one_step = lambda r: (r["M"], json.dumps({k: v for k, v in r["config"].items() if k != "STEPS"}, sort_keys=True))
    assert len(two_steps) == 8 and all(r["instructions_per_weight_byte"] < per_byte[one_step(r)] for r in two_steps)
    # 16-row tiles on one or two warps (triton_common.few_warp_tiles): fewer instructions a weight byte than
    # the same tile on four, where each warp builds the step's A operand for fewer columns (Triton 3.6:
    # INT8 16 x 32 x 128 3.5 against 5.5, INT4 16 x 64 x 128 5.7 against 8.5)
    on_four = lambda r: (r["kernel"], r["M"], json.dumps({**r["config"], "num_warps": 4}, sort_keys=True))
    fours = {on_four(r): r["instructions_per_weight_byte"] for r in rows if r["config"]["num_warps"] == 4}
    few_warps = [r for r in rows if r["config"]["BLOCK_M"] == 16 and r["config"]["num_warps"] < 4]
    # (no 4-warp twin: a split of 16, and INT8's 256-deep steps at M = 1)
    twinned = [r for r in few_warps if on_four(r) in fours]
    assert len(few_warps) == 6 + 8 * 2 and len(twinned) == 6 + 6 + 8  # INT4 at M = 16, INT8 at 1 and 16
    assert all(r["instructions_per_weight_byte"] < fours[on_four(r)] for r in twinned), \
        [(r["kernel"], r["M"], r["config"]) for r in twinned if r["instructions_per_weight_byte"] >= fours[on_four(r)]]
    # prefill: every tile as word tiles (word_dots) spends fewer instructions a K step than on the byte path
    # (218 against 259 at 128 x 128 x 64 with 8 warps, Triton 3.9 and 3.6)
    prefill = {}
    for r in rows:
        if r["kernel"] == "w4a16" and r["M"] == 64 and r["config"]["BLOCK_K"] >= 64 and not r["config"].get("TRANSPOSED"):
            tile = json.dumps({**r["config"], "WORD_DOTS": True}, sort_keys=True)
            prefill.setdefault(tile, {})[r["config"].get("WORD_DOTS", True)] = r["loop_instructions"]
    assert len(prefill) >= 16 and all(len(paths) == 2 and paths[True] < paths[False] for paths in prefill.values()), prefill
    # but both wait for each warpgroup MMA to finish before going on (kernels_compile's mma_in_flight 0: the
    # weights they multiply were stored to shared memory in the same pass), and so do INT8's upright tiles,
    # while the tiles turned round (turned_tiles, and INT8's TRANSPOSED: the weights from registers, x from the
    # pipeline's buffers) leave one running as they dequantise the next step: why those are in the space
    # though they issue more a step (INT4 at 128 x 128 x 64: 246 against 227); at M = 512 also 256 x 128 and,
    # for INT4, 128 x 128 in K steps of 128
    prefill_rows = [r for r in rows if r["kernel"] in ("w4a16", "w8a16") and r["config"]["BLOCK_M"] > 16]
    turned = [r for r in prefill_rows if r["config"].get("TRANSPOSED")]
    assert sorted((r["kernel"], r["M"]) for r in turned) == [("w4a16", 64)] * 3 + [("w4a16", 512)] * 4 + [
        ("w8a16", 64)] * 2 + [("w8a16", 512)] * 2
    assert all(r["mma_in_flight"] >= 1 and r["mma_a_from_registers"] for r in turned), turned
    # and each thread of theirs copies one word of the step's scale and zero-point pairs (pairs_loaded_twice):
    # a step's cp.async are its words' and x's 16 bytes at a time and one more (6 at 128 x 128 x 64), where with
    # Triton 3.6 each lane of a warp copied the same 32 pairs when they were loaded once (37)
    int4_turned = [r for r in turned if r["kernel"] == "w4a16" and r["config"]["num_warps"] == 8]
    copies = lambda c: (c["BLOCK_N"] * c["BLOCK_K"] // 2 + c["BLOCK_M"] * c["BLOCK_K"] * 2) // (16 * 32 * c["num_warps"]) + 1
    assert len(int4_turned) == 6 and all(r["loop_opcodes"]["LDGSTS"] == copies(r["config"]) for r in int4_turned), [
        (r["config"], r["loop_opcodes"]["LDGSTS"]) for r in int4_turned]
    upright = [r for r in prefill_rows if not r["config"].get("TRANSPOSED")]
    assert len(upright) >= 40 and all(r["mma_in_flight"] == 0 for r in upright)
    # prefill's dense route: its dequantisation kernel writes 16 bytes at a time and stays well under
    # the ~20 instructions per 16-bit weight written (2.5 bytes moved) at which an H100 stops being memory-bound
    dequant = {r["kernel"]: r for r in report["dequant"]}
    assert set(dequant) == {"w4a16-dequant", "w8a16-dequant"} and not any(r["problems"] for r in dequant.values())
    assert all(r["instructions_per_weight"] < 14 for r in dequant.values()), dequant
    # the same M = 16 configs on the byte path: word_dots spends fewer instructions on every one of them
    run_benchmark("kernels_compile", "--batches", "16", "--byte-path", "--one-split", "--out", str(tmp_path), timeout=1200)
    bytes_rows = json.loads((tmp_path / "kernels-compile-sm90-bytes.json").read_text())["rows"]
    on_bytes = {json.dumps({**r["config"], "WORD_DOTS": True}, sort_keys=True): r["instructions_per_weight_byte"]
                for r in bytes_rows if r["kernel"] == "w4a16" and r["config"].get("WORD_DOTS") is False}
    on_words = {json.dumps({**r["config"], "WORD_DOTS": True}, sort_keys=True): r["instructions_per_weight_byte"]
                for r in rows if r["kernel"] == "w4a16" and r["M"] == 16 and r["config"]["BLOCK_K"] >= 64
                and r["config"].get("STEPS", 1) == 1  # several steps a pass: int32 words only
                and r["config"].get("WORD_DOTS", True)}  # (the tuner's own byte-path tiles: below)
    # (every decode tile steps K by 128 now; the two paths tied, at 20-23, only at 32 columns with K steps of 64)
    assert len(on_words) >= 16 and on_words.keys() <= on_bytes.keys()
    assert all(on_words[c] < on_bytes[c] for c in on_words), [(c, on_words[c], on_bytes[c]) for c in on_words]
    # the tuner's own byte-path tiles (M = 9-16, 4 warps, 64 and 128 wide), timed though they issue more than
    # their word twins (12.9 against 8.5 a byte at 64 wide with Triton 3.6): in run 2's sweep they ran faster
    own_bytes = [r for r in rows if r["kernel"] == "w4a16" and r["M"] == 16 and r["config"].get("WORD_DOTS") is False]
    twin = lambda r: json.dumps({**r["config"], "WORD_DOTS": True}, sort_keys=True)
    assert len(own_bytes) == 2 and all(r["instructions_per_weight_byte"] > on_words[twin(r)] for r in own_bytes)
    # and with each step's words in the order loaded (K_WIDTH=0): operand_order spends fewer on every K step
    # of 128 at least 32 wide, where it keeps the unpacked pairs out of shared memory; and the tiles of 64
    # columns a warp, which it keeps from spilling, spill without it
    proc = run_benchmark("kernels_compile", "--batches", "16", "--words-as-loaded", "--one-split", "--out", str(tmp_path), timeout=1200)
    loaded_rows = json.loads((tmp_path / "kernels-compile-sm90-as-loaded.json").read_text())["rows"]
    spilled = [r["config"] for r in loaded_rows if r["problems"]]
    assert spilled and all(c["BLOCK_N"] // c["num_warps"] == 64 for c in spilled) and "which the launcher does not run" in proc.stdout
    as_loaded = {json.dumps({k: v for k, v in r["config"].items() if k != "K_WIDTH"}, sort_keys=True):
                 r["instructions_per_weight_byte"] for r in loaded_rows if r["kernel"] == "w4a16"}
    ordered = {json.dumps(r["config"], sort_keys=True): r["instructions_per_weight_byte"] for r in rows
               if r["kernel"] == "w4a16" and r["M"] == 16 and r["config"]["BLOCK_K"] == 128 and r["config"]["BLOCK_N"] >= 32
               and r["config"].get("WORD_DOTS", True)}
    assert len(ordered) >= 16 and ordered.keys() <= as_loaded.keys()
    assert all(ordered[c] < as_loaded[c] for c in ordered), [(c, ordered[c], as_loaded[c]) for c in ordered]


@pytest.mark.slow
@pytest.mark.parametrize("variant,batches", [(["--group", "32", "--activations", "fp32", "--symmetric"], "1"),
                                             (["--group", "64", "--activations", "fp16"], "16,64")])
def test_kernel_configs_compile_for_other_groups_and_activations(tmp_path, variant, batches):
    """The specialisations the default run does not reach compile too: fp32 activations (read as
    they lie instead of as int32 pairs) with symmetric groups of 32, and fp16 activations
    (fp16 tensor cores, nibbles built in fp16) with groups of 64."""
    pytest.importorskip("triton")
    from mpq.kernels import triton_dense_grouped, triton_w4a16_configs, triton_w8a16

    run_benchmark("kernels_compile", *variant, "--batches", batches, "--one-split", "--out", str(tmp_path), timeout=1200)
    (path,) = tmp_path.glob("kernels-compile-sm90-g*.json")
    report = json.loads(path.read_text())
    group = int(variant[1])
    expected = sum(len(triton_w4a16_configs.tuner_space(m, group, 4096)) + len(triton_w8a16.tuner_space(m))
                   for m in map(int, batches.split(",")))
    expected += len(triton_w4a16_configs.grouped_space(group)) + len(triton_w8a16.grouped_space())
    expected += len(triton_dense_grouped.grouped_space())
    assert report["group"] == group and report["activations"] == variant[3]
    assert len(report["rows"]) + report["left_out_splits"] == expected and not any(r["problems"] for r in report["rows"] + report["dequant"])


def test_decode_space_sweeps_and_names_the_transposed_tiles(benchmark_script, monkeypatch):
    """The sweep times the 8-row tiles turned round at their own warps (one a K step: STACK) and
    names the fastest of them beside the fastest 16-row word_dots tile, which at M = 1 it times though
    the tuner does not (turned_serves; crafted times)."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))  # it imports gpu_kernels
    sweep = benchmark_script("gpu_decode_space")
    configs = sweep.space("int4-g128", 1, 4096, smoke=False)
    turned_configs = [c for c in configs if c.get("TRANSPOSED")]
    assert turned_configs and all(c["num_warps"] == c["STACK"] for c in turned_configs)
    assert not any(c.get("TRANSPOSED") and (c.get("WORD_DOTS") is False or c.get("K_WIDTH") == 0) for c in configs)
    tuner, base = sweep.tuner_space("int4-g128", 1, 4096), sweep.base_space("int4-g128", 1, 4096)
    assert not any(c["BLOCK_M"] == 16 for c in tuner) and all(c in base for c in tuner)
    turned = next(c for c in tuner if c.get("TRANSPOSED"))
    upright = next(c for c in base if c["BLOCK_M"] == 16 and c["BLOCK_K"] == 128)
    assert {**upright, "num_stages": 4} in configs and {**upright, "WORD_DOTS": False} in configs
    timed = [{**upright, "K_WIDTH": 0, "ms": 0.009}, {**turned, "ms": 0.010}, {**upright, "ms": 0.012},
             {**turned, "num_warps": 4, "ms": 0.013}]
    found = sweep.bests(timed, tuner, "int4-g128", base)
    assert found["wide_best"]["K_WIDTH"] == 0 and found["tuner_best"]["ms"] == 0.010
    assert found["best_transposed"]["ms"] == 0.010 and found["best_word_dots"]["ms"] == 0.012
    assert sorted(found["best_per_warps"]) == sorted({1, 4, upright["num_warps"]})
    # single rows of K steps of 256: INT4-g128's long steps, an INT8 row's plain steps
    row = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3}
    timed = [{**row, "ms": 0.011}, {**row, "BLOCK_K": 128, "ms": 0.012}]
    long_int4 = sweep.bests(timed, [], "int4-g128")
    assert long_int4["best_long_steps"]["ms"] == 0.011 and long_int4["best_single_row_one_group_a_step"]["ms"] == 0.012
    int8 = sweep.bests(timed, [], "int8")
    assert int8["best_long_steps"] is None and int8["best_single_row_one_group_a_step"]["ms"] == 0.011


def test_run_2s_sweep_is_why_int4_decode_steps_k_by_128(benchmark_script, monkeypatch):
    """Read from the H200's sweep (INT4, M = 1): on each path the tuner runs, the fastest config with K
    steps of 64 was slower than the fastest with steps of 128, on all three shapes, by 9% or more, so the
    tuner's decode space left them out; `--read` prints the same table without a GPU."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))  # it imports gpu_kernels
    sweep = benchmark_script("gpu_decode_space")
    path = Path(__file__).parent.parent / "benchmarks" / "results" / "decode-space-NVIDIA_H200.json"
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 3
    tuner_paths = {"single row", "single row, loading ahead", "tensor cores", "tensor cores, int32 words"}
    for row in rows:
        table = sweep.by_path_and_step(row)
        assert min(min(steps.values()) for steps in table.values()) == 1.0  # over the row's fastest config
        assert tuner_paths <= {p for p, steps in table.items() if 64 in steps}
        assert all(table[p][64] / table[p][128] > 1.08 for p in tuner_paths), (row["shape"], table)
    printed = run_benchmark("gpu_decode_space", "--read", str(path)).stdout
    assert printed.count("single row: 64: 1.") == 3 and "W x^T" in printed


def test_kernel_benchmark_failures_on_crafted_results(benchmark_script):
    """A GPU run fails on a kernel off the reference (with PDL too), a loaded config off it, or a layer on the fallback."""
    kernels = benchmark_script("gpu_kernels")
    good_row = {"format": "int4-g128", "shape": "attn", "M": 1, "rel_err": 3e-3}
    good_check = {"config": "c1", "device": "cuda", "fallback_layers": [], "rel_err": {"prefill": 5e-3, "decode": 4e-3}}
    assert kernels.failures({"rows": [good_row], "end_to_end": {"checks": [good_check]}}) == []
    assert kernels.failures({"rows": [good_row]}) == []
    assert len(kernels.failures({"rows": [good_row, {**good_row, "rel_err": 0.2}]})) == 1
    assert len(kernels.failures({"rows": [{**good_row, "rel_err": float("nan")}]})) == 1
    assert kernels.failures({"rows": [{**good_row, "pdl_rel_err": 4e-3}]}) == []
    (pdl_off,) = kernels.failures({"rows": [{**good_row, "pdl_rel_err": 0.5}]})  # launched with PDL, off
    assert "with PDL" in pdl_off and "5.0e-01" in pdl_off
    off = {**good_check, "rel_err": {"prefill": 5e-3, "decode": 0.3}}
    fallback = {**good_check, "fallback_layers": ["model.layers.0.mlp.down_proj"]}
    found = kernels.failures({"rows": [good_row], "end_to_end": {"checks": [good_check, off, fallback]}})
    assert len(found) == 2 and "0.3" in found[0] and "down_proj" in found[1]
    split = {"config": {}, "calls": 6, "worst_rel_err": 3e-3, "buffers_zeroed": True}
    sums = {"fine": split, "left": {**split, "buffers_zeroed": False}, "off": {**split, "worst_rel_err": 0.4}}
    found = kernels.failures({"rows": [good_row], "split_sums": sums})
    assert len(found) == 2 and "left" in found[0] and "4.0e-01" in found[1]


def row(name, kind, nbytes, ppl, **extra):
    """A benchmark row with crafted numbers (loss = ppl)."""
    return {"contender": name, "kind": kind, "bytes": nbytes, "quality": {"ppl": ppl, "loss": ppl}, **extra}


def test_pareto_targets_on_crafted_numbers(benchmark_script):
    """The benchmark's verdicts (random median, rule, recovery, INT4 size, 1% drop, dominance)."""
    pareto = benchmark_script("pareto")

    rows = [row("int4", "uniform", 400, 32.0, method="gptq", format="int4-g128"),
            row("int8", "uniform", 600, 30.0, method="gptq", format="int8"),
            row("int4 rtn", "uniform", 400, 33.0, method="rtn", format="int4-g128"),
            row("rule", "rule", 700, 30.5),
            row("nf4", "bnb", 390, 31.2),  # dominates mpq a, not b
            row("a", "mpq", 395, 31.5), row("b", "mpq", 420, 30.9), row("c", "mpq", 520, 30.2),
            row("d", "mpq", 560, 30.6)]  # d is dominated by c: not on mpq's front
    randoms = [{"budget": 420, "median_loss": 31.0}, {"budget": 500, "median_loss": 30.8}]
    t = pareto.check_targets(rows, randoms, "gptq", {"ppl": 30.0, "loss": 30.0})
    assert [p["beats_random"] for p in t["random"]] == [True, False]  # b 30.9 < 31.0; at 500 still b: 30.9 > 30.8
    assert t["rule"][0]["mpq_best"] == "c" and t["rule"][0]["beats_rule"]
    rec = t["recovery_at_10pct_extra_bytes"]
    assert rec["budget"] == 420 and rec["mpq_best"] == "b" and abs(rec["recovered"] - 0.55) < 1e-9
    assert t["at_uniform_int4_bytes"]["mpq_best"] == "a" and t["at_uniform_int4_bytes"]["beats_uniform_int4"]
    one = t["one_percent_drop"]  # within 30.3: c
    assert one["smallest_passing"] == "c" and abs(one["smaller_than_int8_by"] - (1 - 520 / 600)) < 1e-9
    assert t["mpq_front"] == ["a", "b", "c"]
    assert t["dominated_mpq_configs"] == [{"mpq": "a", "by": "nf4"}]
    summary = {"budget": 420, "refinement": {"best": {"bytes": 410, "measured": 0.04}},
               "uniform": [{"name": "int4-g128", "metrics": {"calib_divergence": 0.10}},
                           {"name": "int8", "metrics": {"calib_divergence": 0.02}}]}
    assert abs(pareto.calibration_recovery(summary)["recovered"] - 0.75) < 1e-9  # (0.10 - 0.04) / (0.10 - 0.02)
    assert pareto.calibration_recovery({**summary, "refinement": None}) is None


def test_pareto_contenders_start_from_the_model_compile_quantises(benchmark_script):
    """`--dtype` in the benchmark loads the model as `mpq compile --dtype` does: a `.to(dtype)` would
    also round buffers transformers keeps in fp32 (rotary inv_freq), and every in-process contender
    would then run a slightly different model than mpq's configs."""
    import torch

    from mpq.models import load_model

    bench = benchmark_script("pareto").Bench("demo", "rtn", seed=0, dtype="bf16")
    compiled = load_model("demo", torch.bfloat16).model
    ours = dict(bench.loaded.model.named_buffers())
    theirs = dict(compiled.named_buffers())
    assert ours.keys() == theirs.keys() and ours
    for name, buffer in theirs.items():
        assert ours[name].dtype == buffer.dtype and torch.equal(ours[name], buffer), name
    assert all(torch.equal(a, b) for a, b in zip(bench.loaded.model.parameters(), compiled.parameters()))


def test_pareto_targets_take_each_uniform_row_rounded_as_mpq_rounds_that_format(benchmark_script):
    """With a per-format method (int8=rtn,int4=gptq) the yardsticks are uniform INT8 by rtn and
    uniform INT4 by gptq: one row each, shared with the single-method contenders."""
    pareto = benchmark_script("pareto")

    rows = [row("int4 gptq", "uniform", 400, 32.0, method="gptq", format="int4-g128"),
            row("int8 gptq", "uniform", 600, 31.0, method="gptq", format="int8"),
            row("int4 rtn", "uniform", 400, 33.0, method="rtn", format="int4-g128"),
            row("int8 rtn", "uniform", 600, 30.0, method="rtn", format="int8"),
            row("b", "mpq", 420, 30.9)]
    t = pareto.check_targets(rows, [], "int8=rtn,int4=gptq", {"ppl": 30.0, "loss": 30.0})
    rec = t["recovery_at_10pct_extra_bytes"]  # gap 32 -> 30, b recovers 1.1 of 2
    assert rec["mpq_best"] == "b" and abs(rec["recovered"] - 0.55) < 1e-9
    assert t["at_uniform_int4_bytes"]["uniform_loss"] == 32.0 and t["one_percent_drop"]["uniform_int8_bytes"] == 600


def test_kernel_benchmark_refuses_a_configs_folder_that_is_not_the_demos_output(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--smoke", "--configs", str(tmp_path),
               "--out", str(tmp_path / "results")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "no summary.json there" in proc.stderr
    (tmp_path / "summary.json").write_text(json.dumps({"model": "minilm", "configs": []}))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "compiled from 'minilm'" in proc.stderr
    assert not (tmp_path / "results").exists()  # refused before anything was measured or written


def test_kernel_benchmark_timed_rows(monkeypatch, benchmark_script):
    """The GPU-only part of a row (weight copies, bytes moved, GB/s, speedup, eager times) on the
    CPU, with the GPU timers replaced by fakes that call each timed function for real."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = benchmark_script("gpu_kernels")
    monkeypatch.setattr(kernels, "ROTATE_BYTES", 40_000)
    timed, eager = [], []
    times = iter([0.5, 2.0, 0.5, 2.0, 0.4])  # M = 1 and 17: the kernel, the fp16 baseline; then M = 1 with PDL

    def fake_device_ms(calls, smoke):
        assert not smoke
        timed.append([call().shape for call in calls])  # each copy is a real launch: a bad shape fails here
        return next(times)

    def fake_eager_ms(fn):
        eager.append(fn().dtype)
        return 0.25 * len(eager)

    monkeypatch.setattr(kernels, "device_ms", fake_device_ms)
    monkeypatch.setattr(kernels, "eager_ms", fake_eager_ms)
    rows = list(kernels.bench_layer("odd", 40, 384, "int4-g128", (1, 17), "cpu", smoke=False))
    weight_bytes = 40 * 384 // 2 + 2 * 40 * 3 * 2  # packed nibbles, then bf16 scales and zeros of 3 groups per row
    # 40_000 bytes of copies: 5 of the int4 weight, 2 (the minimum) of the fp16 one
    assert timed == [[(1, 40)] * 5, [(1, 40)] * 2, [(17, 40)] * 5, [(17, 40)] * 2]
    assert eager == [torch.bfloat16, torch.float16] * 2  # the kernel's activations, then the fp16 baseline's
    for row, m in zip(rows, (1, 17)):
        assert row["bytes_moved"] == weight_bytes + 2 * m * 384 + 2 * m * 40
        assert row["GBps"] == pytest.approx(row["bytes_moved"] / 0.5e-3 / 1e9)
        assert row["TFLOPs"] == pytest.approx(2 * m * 40 * 384 / 0.5e-3 / 1e12)
    assert [(r["eager_ms"], r["fp16_eager_ms"]) for r in rows] == [(0.25, 0.5), (0.75, 1.0)]
    for row in rows:
        assert row["speedup_vs_fp16"] == 4.0 and row["activations"] == "bfloat16" and row["rel_err"] < 1e-2
    # then the decode rows (M <= 16) again with PDL, on a fresh set of the layer's copies; each row written as it goes
    written = []
    kernels.time_with_pdl(rows, "cpu", smoke=False, on_row=lambda: written.append(1))
    assert timed[4:] == [[(1, 40)] * 5] and written == [1]
    assert rows[0]["pdl_ms"] == 0.4 and rows[0]["pdl_speedup_vs_fp16"] == 5.0 and rows[0]["pdl_rel_err"] < 1e-2
    assert "pdl_ms" not in rows[1]
    # a row whose PDL launch fails (a driver refusing it in a graph) says so, and the others are still timed
    monkeypatch.setattr(kernels, "device_ms", lambda calls, smoke: 1 / 0)
    kernels.time_with_pdl(rows, "cpu", smoke=False)
    assert rows[0]["pdl_error"].startswith("ZeroDivisionError")


def test_kernel_benchmark_prints_the_rows_timed_with_pdl(benchmark_script, capsys):
    """The PDL table (crafted rows): each decode row's time and speedup with and without, its share
    of the copy bandwidth with PDL, a row that could not be launched with it, and a split-K error."""
    kernels = benchmark_script("gpu_kernels")
    timed = {"format": "int8", "shape": "attn", "M": 1, "ms": 0.009, "pdl_ms": 0.0075, "speedup_vs_fp16": 1.45,
             "pdl_speedup_vs_fp16": 1.74, "pct_of_copy_bw": 45.0, "pdl_rel_err": 2e-3}
    refused = {"format": "int4-g128", "shape": "attn", "M": 4, "ms": 0.008, "pdl_error": "RuntimeError: capture"}
    kernels.print_pdl_table({"rows": [timed, refused, {"format": "int8", "shape": "attn", "M": 64, "ms": 0.02}],
                             "split_sums_pdl_error": "RuntimeError: no"})
    lines = capsys.readouterr().out.splitlines()
    assert "| int8 | attn | 1 | 0.0090 | 0.0075 | 1.45x | 1.74x | 54% | 2.0e-03 |" in lines
    assert any("| 4 |" in line and "RuntimeError: capture" in line for line in lines)
    assert not any("| 64 |" in line for line in lines) and lines[-1] == "split-K with PDL: RuntimeError: no"


def test_cpu_kernel_benchmark_finds_where_the_tiles_win_for_good(benchmark_script):
    """The crossover is the M from which the float32 tiles win at every larger M, not the first
    win (timing noise can make one small M look won); the dispatch override is undone."""
    bench = benchmark_script("cpu_kernels")
    from mpq.kernels import cpu as cpu_kernels
    from mpq.kernels.cpu import FLOAT32_FROM_TOKENS

    speedups = {"int8": {16: 0.5, 32: 1.1, 64: 0.9, 128: 1.3, 512: 2.0}, "int4-g128": {16: 0.2, 64: 0.8}}
    rows = [{"format": fmt, "shape": "s", "tokens": m, "speedup": x} for fmt, by_m in speedups.items() for m, x in by_m.items()]
    found = {c["format"]: c["tiles_win_from_tokens"] for c in bench.crossovers(rows)}
    assert found == {"int8": 128, "int4-g128": None}
    shipped = {bits: cpu_kernels.float32_from_tokens(bits) for bits in (8, 4)}
    dense = cpu_kernels.DENSE_FLOAT32_FROM_TOKENS
    layer = QuantizedLinear.from_module(torch.nn.Linear(64, 64), "int8")[0]
    x = torch.randn(4 * shipped[8], 64)
    with bench.float32_from(bench.KERNELS_ONLY):
        assert FLOAT32_FROM_TOKENS == {8: bench.KERNELS_ONLY, 4: bench.KERNELS_ONLY}
        assert cpu_kernels.DENSE_FLOAT32_FROM_TOKENS == bench.KERNELS_ONLY
        kernel = layer(x)
    assert FLOAT32_FROM_TOKENS == shipped and cpu_kernels.DENSE_FLOAT32_FROM_TOKENS == dense
    assert not torch.equal(layer(x), kernel)  # the same layer at the same M, another path


@pytest.mark.slow
def test_every_architecture_of_the_coverage_benchmark_quantises_saves_loads_and_generates(benchmark_script, tmp_path):
    """benchmarks/architectures.py on all its 26 architectures (about 40 s): each traces, takes
    int8 in every layer, loads back equal to the model it was saved from, and generates; the trace's
fallback (hooks on an eager forward) finds the same layers and shared inputs as export; GPTQ/AWQ's
    calibration walks both blocks and gathers a whole float32 copy's statistics exactly (Gemma 2/3
    and GPT-OSS alternate a 16-token sliding window with global attention over 64-token windows)."""
    bench = benchmark_script("architectures")
    rows = {name: bench.check(name, "int8", tmp_path) for name in bench.ARCHITECTURES}
    for name, row in rows.items():
        assert row["trace"] == "export" and row["layers"] >= 9, name
        assert row["hooks_agree"], name  # the trace's fallback finds the same layers and shared inputs
        assert row["loaded_equals_saved"] and row["generates"] and row["cosine_to_unquantised"] > 0.99, name
        assert row["float32_twin_exact"], name  # sensitivities measured in the lazy twin are a float32 copy's
        assert row["calibration"] == "2 blocks walked" and row["calibration_exact"], name
        assert row["smallest_bytes"] < 0.75 * row["unquantised_bytes"], name
    assert "FalconLinear" in rows["falcon"]["layer_types"]
    assert rows["falcon"]["kept_bytes"] < 0.01 * rows["falcon"]["unquantised_bytes"]  # its linears are layers
    for name in ("gemma", "gemma2", "gemma3"):  # a scaled table, tied to the head
        assert rows[name]["table"] == "tied to the head" and rows[name]["table_kernel"].endswith("times 11.3125)")
    mixtures = [name for name in rows if name.endswith(("moe", "mixtral", "gpt_oss"))]
    assert len(mixtures) == 7
    for name in mixtures:  # the experts are layers (mpq.experts), so all but the routers shrink
        assert rows[name]["routed_experts"] == 2 and rows[name]["kept_bytes"] < 0.01 * rows[name]["unquantised_bytes"], name
        assert "3-D" not in (rows[name]["kept_largest"] or ""), name
    assert all(rows[name]["routed_experts"] == 0 for name in rows if name not in mixtures)
    assert "Conv1D" in rows["gpt2"]["layer_types"]
    assert [name for name, row in rows.items() if not row["bytes_as_predicted"]] == []


# RECENT architectures with a mechanism of their own (the benchmark runs all 22, about 70 s; these, about 25 s):
# Llama 4's experts take every token scaled by its router score (mpq.experts.ScoredExperts), Gemma 4 has a
# per-layer token table; Llama 4, HunYuan and HY-V4 read their quantised layers' weight dtype or device (mpq.packed_weight); hybrid linear
# attention with a mixture (Qwen3.5-MoE), with latent attention (Kimi Linear); latent attention and a mixture (DeepSeek-V3)
RECENT_CHECKED = ["llama4", "gemma4", "hunyuan_v1_moe", "hy_v4", "qwen3_5_moe", "deepseek_v3", "kimi_linear"]


@pytest.mark.slow
def test_the_architectures_of_2025_and_2026_quantise_save_load_and_generate(benchmark_script, tmp_path):
    """benchmarks/architectures.py on RECENT_CHECKED. What stays as stored is norms, routers,
    convolutions and biases: Llama 4's experts (stacked, handed every token scaled by its router
    score) are per-expert layers (mpq.experts.ScoredExperts), Gemma 4's per-layer token table a
    table layer (mpq.trace)."""
    bench = benchmark_script("architectures")
    assert set(RECENT_CHECKED) <= set(bench.RECENT)
    rows = {name: bench.check(name, "int8", tmp_path) for name in RECENT_CHECKED}
    for name, row in rows.items():
        assert row["trace"] == "export" and row["hooks_agree"], name
        assert row["loaded_equals_saved"] and row["bytes_as_predicted"] and row["generates"], name
        assert row["cosine_to_unquantised"] > 0.99 and row["float32_twin_exact"], name
        assert row["calibration"] == "2 blocks walked" and row["calibration_exact"], name
    kept = {name: row["kept_bytes"] / row["unquantised_bytes"] for name, row in rows.items()}
    for name, share in kept.items():  # norms, routers, convolutions, biases, HY-V4's hyper-connections (2.0%)
        assert share < 0.025, (name, share)
    mixtures = ["llama4", "qwen3_5_moe", "deepseek_v3", "kimi_linear", "hunyuan_v1_moe", "hy_v4"]
    assert all(rows[name]["routed_experts"] >= 1 for name in mixtures)


@pytest.mark.slow
def test_image_text_models_compile_their_language_model_and_keep_the_vision_tower(benchmark_script, tmp_path):
    """benchmarks/architectures.py on its image-and-text models (Llama 4, Gemma 3 and 4, Mistral 3,
    LLaVA, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and its mixture): loaded as causal LMs (mpq.models), traced
    on text, where both export and the hooks fallback leave the vision tower out (text never runs
    it: kept as stored); saved, loaded back equal, with the bytes predicted, generating, calibrated
    exactly. Where transformers has a causal-LM class (Llama 4, Qwen3.5), it loads the language model alone."""
    bench = benchmark_script("architectures")
    rows = {name: bench.check(name, "int8", tmp_path) for name in bench.IMAGE_TEXT}
    for name, row in rows.items():
        assert row["trace"] == "export" and row["hooks_agree"], name
        assert row["loaded_equals_saved"] and row["bytes_as_predicted"] and row["generates"], name
        assert row["cosine_to_unquantised"] > 0.99 and row["float32_twin_exact"], name
        assert row["calibration"] == "2 blocks walked" and row["calibration_exact"], name
        alone = name in ("llama4-image-text", "qwen3_5-image-text", "qwen3_5_moe-image-text")
        assert row["model_class"].endswith("ForCausalLM" if alone else "ForConditionalGeneration"), name
        if not alone:
            assert "vision" in row["kept_largest"] or "visual" in row["kept_largest"], name
            assert any(why.startswith("not in the traced forward on the example inputs (text)") for why in row["excluded"].values()), name


@pytest.mark.slow
def test_every_encoder_decoder_of_the_coverage_benchmark_holds_the_bytes_predicted_and_generates(benchmark_script, tmp_path):
    """benchmarks/architectures.py on its 14 encoder-decoder families (about 25 s): each takes int8
    in every layer, holds the bytes the memory model predicted (its encoder's and decoder's
    embed_tokens read the quantised shared table), loads back equal, and generates; GPTQ/AWQ's
    calibration walks its encoder's blocks, then its decoder's, and gathers a whole float32 copy's
    statistics exactly."""
    bench = benchmark_script("architectures")
    rows = {name: bench.check(name, "int8", tmp_path) for name in bench.SEQ2SEQ}
    for name, row in rows.items():
        assert row["layers"] >= 33 and row["table"] == "tied to the head", name
        assert row["loaded_equals_saved"] and row["bytes_as_predicted"] and row["generates"], name
        assert row["float32_twin_exact"], name
        assert row["calibration"] == "4 blocks walked" and row["calibration_exact"], name
        assert row["cosine_to_unquantised"] > 0.99 and row["smallest_bytes"] < 0.75 * row["unquantised_bytes"], name
    # LongT5's, SwitchTransformers' and LED's forwards do not export: hooks on an eager forward find
    # their layers and shared inputs (6: each self-attention's q/k/v, each cross-attention's k/v)
    assert {name for name, row in rows.items() if row["trace"] != "export"} <= {"longt5", "switch_transformers", "led"}
    for name, row in rows.items():
        assert row["trace"] in ("export", "hooks") and row["shared_input_groups"] >= 6, name
        assert row["hooks_agree"] is not False, name


@pytest.mark.slow
def test_twin_memory_benchmark_smoke(tmp_path):
    """benchmarks/twin_memory.py on a 2-block model: both twins measure in processes of their own and
    give the same divergences; the lazy one holds fewer bytes of its own."""
    out = tmp_path / "twin_memory.json"
    run_benchmark("twin_memory", "--blocks", "2", "--hidden", "128", "--samples", "4", "--repeats", "1", "--out", str(out),
                  timeout=900)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["same_divergences"] and set(rows) == {"whole float32 copy", "lazy float32 twin"}
    # a whole copy holds every weight again in float32; the lazy twin all but its blocks'
    assert rows["whole float32 copy"]["twin_own_bytes"] >= 2 * result["weights_bytes"]
    assert rows["lazy float32 twin"]["twin_own_bytes"] < rows["whole float32 copy"]["twin_own_bytes"]


@pytest.mark.slow
def test_spill_memory_benchmark_smoke(tmp_path):
    """benchmarks/spill_memory.py on a 2-block model: a compile with its kept tensors in files and one
    with them in memory, each in a process of its own, measure the same sensitivities and configs;
    only the first spilled anything."""
    out = tmp_path / "spill_memory.json"
    run_benchmark("spill_memory", "--blocks", "2", "--hidden", "128", "--vocab", "4096", "--samples", "4", "--repeats", "1",
                  "--out", str(out), timeout=900)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["same_results"] and set(rows) == {"in memory (--no-spill)", "spilled to files (default)"}
    # the reference log-probabilities alone: 4 windows x 128 tokens x 4096 x 4 bytes
    assert rows["spilled to files (default)"]["spilled_bytes"] >= 4 * 128 * 4096 * 4
    assert rows["in memory (--no-spill)"]["spilled_bytes"] == 0
    assert all(0 < a <= r for row in rows.values() for a, r in zip(row["peak_anonymous_mb"], row["peak_rss_mb"]))


@pytest.mark.slow
def test_seq2seq_calibration_memory_benchmark_smoke(tmp_path):
    """benchmarks/seq2seq_calibration_memory.py on a tiny T5: one pass, passes under a 1 MiB bound
    and the walk over its 2+2 blocks all end with every layer's tensors (the child asserts it); the
    bound splits the statistics."""
    run_benchmark("seq2seq_calibration_memory", "--layers", "2", "--d-model", "128", "--samples", "4", "--bound-mb", "1",
                  "--out", str(tmp_path))
    one, bounded, walked = json.loads((tmp_path / "seq2seq_calibration_memory.json").read_text())
    assert one["passes"] == 1 and bounded["passes"] > 1 and walked["variant"] == "block by block" and walked["passes"] == 5
    assert one["statistics_bytes"] == bounded["statistics_bytes"] > bounded["bound_bytes"] == 2**20
    assert all(row["peak_above_loaded_bytes"] > 0 for row in (one, bounded, walked))


@pytest.mark.slow
def test_blockwise_memory_benchmark_smoke(tmp_path):
    """benchmarks/blockwise_memory.py on a 2-block model whose hidden size (256) is not the window
    length (128): the whole-model variant hooks only the linear layers (a lookup's input is token
    ids), and both end with every linear layer's tensors (the child asserts it)."""
    run_benchmark("blockwise_memory", "--blocks", "2", "--hidden", "256", "--samples", "2", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "blockwise_memory.json").read_text())
    assert [row["variant"] for row in rows] == ["whole-model float32 twin", "blockwise"]
    assert all(row["peak_above_loaded_bytes"] > 0 for row in rows)


@pytest.mark.slow
def test_sensitivity_replay_benchmark_smoke(tmp_path):
    """benchmarks/sensitivity_replay.py on the demo with 4 samples: the tables with and without
    block replay are identical (what the benchmark checks; timings are not asserted)."""
    out = tmp_path / "sensitivity_replay.json"
    run_benchmark("sensitivity_replay", "--models", "demo", "--samples", "4", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "demo" and row["identical"] and row["layers"] > 40


@pytest.mark.slow
def test_search_scale_benchmark_smoke(tmp_path):
    """benchmarks/search_scale.py on the Qwen1.5-MoE shape, 10 trials, grouped variables: thousands
    of layers, one variable per mixture projection, and the exact optimum on the front."""
    out = tmp_path / "search_scale.json"
    run_benchmark("search_scale", "--shapes", "qwen1.5-moe", "--trials", "10", "--variants", "grouped",
                  "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["layers"] > 1000 and row["variables"] < row["layers"] / 10
    assert row["least_predicted"] == row["exact_best"] and row["front"] > 1


@pytest.mark.parametrize("fmt_name", [None, "int4-g32", "int8"])
def test_static_cache_decoding_gives_generates_tokens(fmt_name, benchmark_script):
    """graph_decode.py's loop (a StaticCache, each step's token, slot and position worked out on the
    device) on the CPU, eager: the demo's greedy tokens are generate()'s, unquantised and with its
    linear layers quantised, also after the warm-up a capture takes and its rewind; the CUDA-graph
    capture is refused here and reported, not raised."""
    from mpq.apply import set_module
    from mpq.models import load_model
    from mpq.qlinear import QuantizedLinear

    graph_decode = benchmark_script("graph_decode")
    model = load_model("demo").model.eval()
    if fmt_name is not None:
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                set_module(model, name, QuantizedLinear.from_module(module, fmt_name)[0])
    prompt = torch.tensor([[1, 2, 3, 4]])
    ids, seconds = graph_decode.static_greedy(model, prompt, 10)
    assert len(ids) == 10 and seconds > 0 and ids == graph_decode.greedy_generate(model, prompt, 10)
    # the capture's warm-up steps, then the rewind to the prompt: without setting the cache's own
    # count back (transformers >= 5) the timed steps write past the cache, as on the H200
    assert graph_decode.static_greedy(model, prompt, 10, warm_up=True)[0] == ids
    report = graph_decode.decode_report(model, prompt, 6)
    assert report["static_eager_matches_generate"] and report["static_eager_tokens_per_s"] > 0
    assert "graph_tokens_per_s" not in report and report["graph_error"]  # no CUDA here
    with pytest.raises(ValueError, match="at least"):
        graph_decode.static_greedy(model, prompt, 2)


def test_scaled_decode_smoke_quantises_every_block_layer_and_decodes(tmp_path, benchmark_script):
    """scaled_decode.py --smoke: tiny Llama blocks on the CPU, bf16 and each format through the
    static-cache loop; every block linear layer quantised (2 blocks of 7), q/k/v and gate/up fused,
    the blocks' bytes falling with the format's bits. (Random weights give near-tied logits, so
    whether the loop's greedy tokens are generate()'s is reported, not asserted: the demo's are.)"""
    run_benchmark("scaled_decode", "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "scaled-decode-cpu-smoke.json").read_text())
    rows = report["rows"]
    assert list(rows) == ["bf16", "int4-g128", "int8", "int4-g128+pdl"] and report["layers"] == 2
    assert rows["int4-g128+pdl"]["pdl"] is False  # asked for, but the CPU takes no PDL: the same launches
    assert all(row["static_eager_tokens_per_s"] > 0 and "static_eager_matches_generate" in row for row in rows.values())
    assert rows["bf16"]["layers_quantised"] == 0 and rows["int4-g128"]["layers_quantised"] == rows["int8"]["layers_quantised"] == 14
    for fmt_name in ("int4-g128", "int8"):
        kernels = rows[fmt_name]["kernels"]
        assert any(k.endswith("(fused x3)") for k in kernels) and any(k.endswith("(fused x2)") for k in kernels), kernels
    assert rows["int4-g128"]["weight_bytes"] < rows["int8"]["weight_bytes"] < 0.6 * rows["bf16"]["weight_bytes"]
    # the GPU run's blocks, built on the meta device (no memory): Llama 3 8B's, 1.74 GB in bf16 for 4
    from transformers import LlamaConfig, LlamaForCausalLM

    scaled = benchmark_script("scaled_decode")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **scaled.BLOCKS)).to(torch.bfloat16)
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.weight.shape, attention.k_proj.weight.shape) == ((4096, 4096), (1024, 4096))
    assert model.model.layers[0].mlp.up_proj.weight.shape == (14336, 4096)
    assert 1.74e9 < scaled.weight_bytes(model) < 1.75e9


def test_gpu_session_script_parses_and_runs_scripts_that_exist():
    """The one command a GPU lease runs (no GPU here to run it): bash parses it, and every stage it
    starts, each under its own time limit, is a script of benchmarks/."""
    script = ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    stages = re.findall(r'timeout "\$\{(MPQ_GPU_\w+_S):-0\}" python3 (benchmarks/\w+\.py)', script.read_text())
    assert [s for _, s in stages] == ["benchmarks/gpu_kernels.py", "benchmarks/row_reads.py", "benchmarks/scaled_decode.py",
                                      "benchmarks/experts_decode.py", "benchmarks/gpu_decode_space.py"]
    assert all((ROOT / s).is_file() for _, s in stages) and len({limit for limit, _ in stages}) == len(stages)


def test_kernel_benchmark_names_the_route_each_chosen_config_runs(benchmark_script):
    """The table's route column: which code path a chosen config runs, its tile and split."""
    kernels = benchmark_script("gpu_kernels")
    assert kernels.route({"DENSE": 1}, "int8") == "dequantise + cuBLAS"
    words = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4}
    assert kernels.route(words, "int4-g128") == "tensor cores, int32 words 16x128x128 split 4"
    assert kernels.route({**words, "WORD_DOTS": False}, "int4-g128") == "tensor cores 16x128x128 split 4"
    turned = {**words, "BLOCK_M": 8, "TRANSPOSED": True, "STACK": 4}
    assert kernels.route(turned, "int4-g128") == "tensor cores, int32 words, W x^T, 4 warp(s) along K 8x128x128 split 4"
    assert kernels.route({**words, "BLOCK_K": 32}, "int4-g32") == "tensor cores 16x128x32 split 4"  # groups of 32: bytes
    assert kernels.route(words, "int8") == "tensor cores 16x128x128 split 4"
    assert kernels.route({**words, "BLOCK_M": 1, "SPLIT_K": 1, "PREFETCH": True}, "int4-g128") == \
        "single row, loading ahead 1x128x128"
    assert kernels.route({**words, "BLOCK_M": 1, "SPLIT_K": 1, "PIPELINE": True}, "int4-g128") == \
        "single row, pipelined 1x128x128"
    assert kernels.route({**words, "BLOCK_M": 64, "SPLIT_K": 1}, "int8") == "tiled GEMM 64x128x128"
    assert kernels.route({**words, "BLOCK_M": 64, "SPLIT_K": 1}, "int4-g128") == "tiled GEMM, int32 words 64x128x128"
    assert kernels.route({**words, "BLOCK_M": 64, "SPLIT_K": 1, "WORD_DOTS": False}, "int4-g128") == "tiled GEMM 64x128x128"
    turned_gemm = {**words, "BLOCK_M": 128, "BLOCK_K": 64, "SPLIT_K": 1, "TRANSPOSED": True}
    assert kernels.route(turned_gemm, "int4-g128") == kernels.route(turned_gemm, "int8") == "tiled GEMM, W x^T 128x128x64"


def test_kernel_benchmark_times_int4_layers_laid_out_as_a_triton_layer_holds_them(benchmark_script):
    """The table and the decode-space sweep time each INT4 copy with its scale and zero point as one
    word, column-major (what a loaded Triton layer runs and kernels_compile.py counts), not
    quantize_weight's row-major scales and zeros apart; every weight copy on its own storage keeps
    the pairing (a plain .to(device) of the two views would not). INT8 keeps its per-channel scales."""
    from mpq.formats import get_format
    from mpq.kernels.triton_w4a16_scales import ZEROS_PAIRED, zeros_layout

    kernels = benchmark_script("gpu_kernels")
    int4 = get_format("int4-g128")
    sets, reference, weight_bytes = kernels.quantised_layer(40, 384, int4, "cpu", smoke=True)
    scales, zeros = sets[0]["scales"], sets[0]["zeros"]
    assert zeros_layout(scales, zeros) == ZEROS_PAIRED and scales.stride() == (2, 80)
    assert weight_bytes == 40 * 192 + 2 * 2 * 40 * 3  # packed weight + bf16 scales and zeros: as many bytes as before
    x = torch.randn(3, 384)
    assert torch.allclose(kernels.quantised_linear(int4, x, sets[0]).float(), x @ reference.t(), rtol=1e-3, atol=1e-3)
    int8_sets, _, _ = kernels.quantised_layer(40, 384, get_format("int8"), "cpu", smoke=True)
    assert int8_sets[0]["scales"].stride() == (1,)


def test_kernel_benchmark_times_each_decode_row_again_with_its_weights_in_l2(monkeypatch, benchmark_script, capsys):
    """time_from_l2: each timed decode row's layer again, its packed rows 16 bytes apart (the same
    kernel and grid, weights from L2), checked against the weight those rows stand for, timed in a
    graph of L2_CALLS calls of it, and its share of the row's time printed; prefill rows are left."""
    kernels = benchmark_script("gpu_kernels")
    rows = [{"format": fmt, "shape": "odd", "N": 40, "K": 384, "M": m, "activations": "bfloat16", "ms": 0.02,
             "config": None, "route": "r"} for fmt in ("int4-g128", "int8") for m in (1, 17)]
    strides, graphs = [], []
    real = kernels.quantised_linear
    monkeypatch.setattr(kernels, "quantised_linear",
                        lambda fmt, x, t, config=None: strides.append(t["qweight"].stride()) or real(fmt, x, t, config))

    def fake_device_ms(calls, smoke):
        graphs.append([call().shape for call in calls])  # each a real launch on the overlapping rows
        return 0.005

    monkeypatch.setattr(kernels, "device_ms", fake_device_ms)
    written = []
    kernels.time_from_l2(rows, "cpu", smoke=False, on_row=lambda: written.append(1))
    assert graphs == [[(1, 40)] * kernels.L2_CALLS] * 2 and written == [1, 1]
    assert set(strides) == {(kernels.OVERLAP_STRIDE, 1)} and len(strides) == 2 * (1 + kernels.L2_CALLS)
    for row in rows:
        if row["M"] == 1:
            assert row["l2_ms"] == 0.005 and row["l2_share"] == 0.25 and row["l2_rel_err"] < 1e-2
        else:
            assert "l2_ms" not in row and "l2_rel_err" not in row
    kernels.print_l2_table({"rows": rows})
    assert "| int4-g128 | odd | 1 | 0.0200 | 0.0050 | 0.25 | r |" in capsys.readouterr().out
    # a kernel off the reference on overlapping rows fails the run
    rows[0]["l2_rel_err"] = 0.5
    assert kernels.failures({"rows": rows}) == ["int4-g128 odd M=1 on overlapping rows: rel err 5.0e-01"]


def test_the_tuner_times_each_layout_of_int4_scales_on_its_own(monkeypatch):
    """A config chosen for one layout of scales and zeros is not taken for another: the K loop
    loads them differently (pipelined pairs, or plain loads of each)."""
    from mpq.formats import get_format
    from mpq.kernels import triton_common, triton_w4a16
    from mpq.qlinear import scales_by_column
    from mpq.quantize import quantize_weight

    keys = []
    # as on a GPU: no config pinned for the interpreter, and the tuner asked for each key (its answer:
    # the dense route, which the interpreter runs, prefill's candidate that needs no timing here)
    monkeypatch.setattr(triton_w4a16, "interpreting", lambda: False)
    monkeypatch.setattr(triton_common, "chosen_config", lambda key: keys.append(key) or {"DENSE": 1})
    row_major = quantize_weight(torch.randn(48, 256) * 0.02, get_format("int4-g128"))
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    for tensors in (row_major, scales_by_column(row_major), {**row_major, "zeros": None}):
        triton_w4a16.w4a16_linear(x, tensors["qweight"], tensors["scales"], tensors["zeros"], 128)
    assert len(keys) == 3 and len(set(keys)) == 3, keys
    assert [key[5:8] for key in keys] == [(128, 1, "by row"), (128, triton_w4a16.ZEROS_PAIRED, "by column"),
                                          (128, 0, "by row")]


def test_kernel_benchmark_keeps_the_fastest_of_each_code_path_the_tuner_timed(benchmark_script):
    """At M = 512 run 2 chose the dense route on every shape and kept no time of the fused tiles it
    beat: each row now keeps the fastest time of each code path from the tuner's timings, fastest first."""
    kernels = benchmark_script("gpu_kernels")
    tiles = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1}
    timed = [[tiles, 0.050], [{**tiles, "BLOCK_M": 256}, 0.044], [{**tiles, "WORD_DOTS": False}, 0.061],
             [{"DENSE": 1}, 0.036], [{**tiles, "BLOCK_M": 64, "SPLIT_K": 2}, 0.047]]
    assert kernels.fastest_by_path(timed, "int4-g128") == {
        "dequantise + cuBLAS": 0.036, "tiled GEMM, int32 words": 0.044, "tiled GEMM": 0.061}
    # at M = 1, single_row's long steps (several groups a K step) are a path of their own
    row = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4}
    timed = [[row, 0.012], [{**row, "BLOCK_K": 128}, 0.014], [{**row, "PREFETCH": True}, 0.011]]
    assert kernels.fastest_by_path(timed, "int4-g128") == {
        "single row, long steps, loading ahead": 0.011, "single row, long steps": 0.012, "single row": 0.014}
    assert kernels.fastest_by_path(timed[:1], "int4-g64") == {"single row, long steps": 0.012}
    assert kernels.code_path(row, "int8") == "single row" and kernels.code_path(row, "int4-pc") == "single row"
    # the 16-row tiles on one or two warps (triton_common.few_warp_tiles) are paths of their own
    tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4}
    timed = [[tile, 0.030], [{**tile, "num_warps": 1}, 0.024], [{**tile, "num_warps": 2, "STEPS": 2}, 0.026]]
    assert kernels.fastest_by_path(timed, "int4-g128") == {"tensor cores, int32 words, 1 warp": 0.024,
                                                          "tensor cores, int32 words, 2 warps, 2 steps a pass": 0.026,
                                                          "tensor cores, int32 words": 0.030}
    assert [kernels.code_path(c, "int8") for c, _ in timed[:2]] == ["tensor cores", "tensor cores, 1 warp"]


def test_sass_reading_finds_what_a_pdl_kernel_does_before_its_wait(benchmark_script):
    """dependent_launch_order on crafted SASS: L2 prefetches (CCTL.E.PF2) then the wait (ACQBULK) and,
    after it, the launch of dependents (PREEXIT) is the order prefetch_then_wait means; a load or a
    store before the wait, or no wait, is what kernels_compile.py reports as a problem."""
    sass = benchmark_script("sass_reading")

    def lines(*opcodes: str) -> list[str]:
        return [f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(opcodes)]

    good = sass.dependent_launch_order(lines("S2R R0, SR_CTAID.X", "CCTL.E.PF2 [R4]", "CCTL.E.PF2 [R6]", "ACQBULK",
                                             "LDGSTS.E.BYPASS.128 [R6], desc[UR8][R16.64]", "PREEXIT", "STG.E [R2], R4"))
    assert good == {"waits": True, "prefetches_before_wait": 2, "memory_before_wait": [],
                    "launches_dependents_after_wait": True}
    early = sass.dependent_launch_order(lines("LDG.E.128 R8, desc[UR8][R2.64]", "CCTL.E.PF2 [R4]", "ACQBULK",
                                              "@P0 STG.E [R2], R4"))
    assert early["memory_before_wait"] == ["LDG"] and not early["launches_dependents_after_wait"]
    assert sass.dependent_launch_order(lines("CCTL.E.PF2 [R4]", "REDG.E.ADD.F32 [R2], R4", "PREEXIT")) == {
        "waits": False, "prefetches_before_wait": 1, "memory_before_wait": ["REDG"], "launches_dependents_after_wait": False}


def test_sass_reading_counts_the_warpgroup_mmas_a_loop_leaves_running(benchmark_script):
    """mma_in_flight on crafted SASS: the fewest MMA groups the loop's waits leave running (hex or
    decimal), 0 where a wait drains them; None without a warpgroup MMA wait. And MMA_A_IN_REGISTERS
    takes the first operand from registers with bf16 inputs (.F32.BF16) and fp16 ones (no suffix)."""
    sass = benchmark_script("sass_reading")
    wait = lambda n: f"        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, {n} ;"
    assert sass.mma_in_flight([wait("0x1"), wait("0x3")]) == 1 and sass.mma_in_flight([wait("0x3"), wait("0x0")]) == 0
    assert sass.mma_in_flight([wait("2")]) == 2 and sass.mma_in_flight(["        /*0100*/  HMMA.16816.F32.BF16 R4, R8 ;"]) is None
    registers = sass.MMA_A_IN_REGISTERS
    assert registers.search("HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR16], R24 ;")
    assert registers.search("HGMMA.64x128x16.F32 R24, R100, gdesc[UR16], R24, gsb0 ;")
    assert not registers.search("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;")


def test_kernel_fit_separates_fixed_cost_from_streaming_rate(benchmark_script):
    """Rows on exact lines give back their intercept and slope, per format and M, and cuBLAS's from
    its own bytes; untimed rows (a smoke run) and single-shape series are left out."""
    fit = benchmark_script("kernel_fit")
    shapes = {"a": (4096, 4096), "b": (14336, 4096), "c": (4096, 14336)}
    rows = []
    for name, (n, k) in shapes.items():
        moved = n * k // 2 + 2 * (n + k)
        fp16_moved = 2 * (n * k + n + k)
        rows.append({"shape": name, "N": n, "K": k, "M": 1, "format": "int4-g128", "bytes_moved": moved,
                     "ms": (7.0 + moved / 2000e3) / 1e3, "fp16_ms": (5.0 + fp16_moved / 4000e3) / 1e3})
    rows.append({"shape": "a", "N": 4096, "K": 4096, "M": 4, "format": "int4-g128", "bytes_moved": 10, "ms": 1.0,
                 "fp16_ms": 1.0})  # one shape at M = 4: no line
    rows.append({"shape": "a", "N": 4096, "K": 4096, "M": 1, "format": "int8", "bytes_moved": 10})  # untimed
    report = {"copy_GBps": 4000.0, "rows": rows}
    found = {(f["format"], f["M"]): f for f in fit.fits(report)}
    assert set(found) == {("int4-g128", 1), ("fp16 cuBLAS", 1)}
    int4, cublas = found[("int4-g128", 1)], found[("fp16 cuBLAS", 1)]
    assert int4["fixed_us"] == pytest.approx(7.0) and int4["stream_GBps"] == pytest.approx(2000.0)
    assert int4["stream_pct_of_copy"] == pytest.approx(50.0) and int4["r2"] == pytest.approx(1.0)
    assert cublas["fixed_us"] == pytest.approx(5.0) and cublas["stream_GBps"] == pytest.approx(4000.0)
    aims = fit.aim_times(report)
    assert [a["shape"] for a in aims] == ["a", "b", "c"]
    assert aims[0]["aim_us"] == pytest.approx(rows[0]["bytes_moved"] / (0.75 * 4000.0 * 1e3))
    assert all(a["cublas_fixed_us"] == pytest.approx(5.0) for a in aims)
    with pytest.raises(ValueError, match="two distinct"):
        fit.line_fit([(1.0, 2.0), (1.0, 3.0)])


def test_kernel_fit_reads_the_h200_table(tmp_path):
    """The script on the stored GPU table: a fit per format and M, and with the stored instruction
    counts of the commit it measured (Triton 3.6, as that machine had), an issue rate for each of
    its 30 decode rows, and predictions from the counts of the code now."""
    results = ROOT / "benchmarks" / "results"
    out = tmp_path / "fit.json"
    proc = run_benchmark("kernel_fit", str(results / "kernels-NVIDIA_H200-int4-g128_int8-bf16-ac8b238.json"),
                         "--counts", str(results / "kernels-compile-sm90-triton3.6-ac8b238.json"),
                         "--predict", str(results / "kernels-compile-sm90-triton3.6.json"), "--out", str(out))
    written = json.loads(out.read_text())
    assert written["device"] == "NVIDIA H200" and "| int4-g128 | 1 | 5 |" in proc.stdout
    assert {(f["format"], f["M"]) for f in written["fits"]} >= {("int4-g128", 1), ("int8", 16), ("fp16 cuBLAS", 1)}
    assert len(written["int4_m1_aim"]) == 5
    assert len(written["issue_rates"]) == 30 and written["counts"]["triton"] == written["predicted"]["triton"] == "3.6.0"
    assert {(p["kernel"], p["M"]) for p in written["predicted"]["rows"]} >= {("w4a16", 1), ("w4a16", 16)}


def test_kernel_fit_refuses_a_report_without_timings(tmp_path):
    report = tmp_path / "kernels-smoke.json"
    report.write_text(json.dumps({"device": "cpu (interpreter)", "rows": [{"format": "int4-g128", "M": 1}]}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_fit.py"), str(report)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no timed rows" in proc.stderr


def test_kernels_compile_counts_the_programs_an_sm_holds(benchmark_script, monkeypatch):
    """CUDA's occupancy rules on an H100/H200 (sm_90): registers go to a warp 256 at a time (8 a
    thread), each block takes 1 KB of shared memory more than it asks, and the tightest of
    registers, shared memory, 64 warps and 32 blocks bounds the programs an SM holds."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # importing the script sets 0 (the real compiler); restored after
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling sass_reading.py
    compile_counts = benchmark_script("kernels_compile")
    # the 8-row tile turned round, one warp: 140 registers (144 given), 13,856 B of shared memory
    assert compile_counts.programs_per_sm(140, 13856, 1, 90) == (14, "registers")
    assert compile_counts.programs_per_sm(96, 256, 4, 90) == (5, "registers")  # single row, 64 columns
    assert compile_counts.programs_per_sm(32, 100_000, 4, 90) == (2, "shared")
    assert compile_counts.programs_per_sm(32, 0, 8, 90) == (8, "warps")
    assert compile_counts.programs_per_sm(24, 0, 1, 90) == (32, "blocks")
    assert compile_counts.programs_per_sm(32, 60_000, 4, 86) == (1, "shared")  # an RTX 30-series: 100 KB an SM


def test_kernel_fit_turns_instruction_counts_into_issue_rates(benchmark_script):
    """Each decode row's chosen config (its own, or the report's chosen_configs entry) is found in
    the compile counts, its weight bytes past the fixed cost become an issue rate, and the median
    rate over another code's counts predicts its streaming rate."""
    fit = benchmark_script("kernel_fit")
    config = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 3}
    rows, chosen = [], {}
    for n, k in ((4096, 4096), (14336, 4096)):
        weight = n * k // 2
        rows.append({"shape": f"{n}x{k}", "N": n, "K": k, "M": 1, "format": "int4-g128", "bytes_moved": weight,
                     "ms": (5.0 + weight / 2000e3) / 1e3, "fp16_ms": 1.0})
        chosen[f"_w4a16_kernel gemv 1 {n} {k} 128 True torch.bfloat16 cuda:0"] = config
    report = {"copy_GBps": 4000.0, "rows": rows, "chosen_configs": chosen}
    counts = {"rows": [{"kernel": "w4a16", "M": 1, "config": dict(reversed(config.items())),
                        "instructions_per_weight_byte": 8.0}]}
    rates = fit.issue_rates(report, counts)
    assert len(rates) == 2 and all(r["weight_GBps"] == pytest.approx(2000.0) for r in rates)
    assert all(r["issued_per_s"] == pytest.approx(1.6e13) for r in rates)
    assert rates[0]["share_of_issue_peak"] == pytest.approx(1.6e13 / fit.ISSUE_PEAK)
    now = {"leanest": [{"kernel": "w4a16", "M": 1, "config": config, "instructions_per_weight_byte": 4.0}]}
    assert fit.predictions(rates, now)[0]["predicted_weight_GBps"] == pytest.approx(4000.0)
    # a config the counts lack, or a row's own config, decides what is found
    assert fit.issue_rates({**report, "rows": [{**rows[0], "config": {**config, "SPLIT_K": 2}}]}, counts) == []
    # the launch's programs (64 and 224 column tiles, 8 splits each); and where the counts say how many an SM
    # holds (5 here), the waves and the warps each of an SM's 4 schedulers has in the first
    assert [r["programs"] for r in rates] == [512, 1792] and "waves" not in rates[0]
    counts["rows"][0]["programs_per_sm"] = 5
    held = fit.issue_rates({**report, "sms": 200}, counts)
    assert [r["waves"] for r in held] == [pytest.approx(512 / 1000), pytest.approx(1792 / 1000)]
    # 2.56 programs an SM on the grid of the first (4 warps each, over 4 schedulers); the second's SMs are full
    assert [r["warps_per_scheduler"] for r in held] == [pytest.approx(2.56), 5.0]
