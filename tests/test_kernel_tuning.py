"""How the Triton launchers choose a config on a GPU: every candidate timed on the real call,
the fastest kept per shape. Timing is faked here (CI has no GPU); the launches are real, under
TRITON_INTERPRET=1."""

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mpq.formats import get_format
from mpq.kernels import triton_supports
from mpq.kernels.reference import linear_reference
from mpq.qlinear import choose_backend
from mpq.quantize import quantize_weight

pytest.importorskip("triton")

from mpq.kernels import triton_tuning  # noqa: E402  (imports nothing from triton itself, but its users do)

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(triton_tuning, "_CHOSEN", {})
    monkeypatch.setattr(triton_tuning, "_TUNING", {})


def test_m_bucket_rounds_up_to_a_power_of_two():
    assert [triton_tuning.m_bucket(m) for m in (1, 2, 3, 16, 17, 300, 512)] == [1, 2, 4, 16, 32, 512, 512]


def test_choose_config_keeps_the_fastest_and_times_each_shape_once():
    candidates = [{"SPLIT_K": 1}, {"SPLIT_K": 2}, {"SPLIT_K": 4}]
    speed = {1: 3.0, 2: 1.0, 4: 2.0}
    timed = []

    def timer(call):
        config = call()
        timed.append(config["SPLIT_K"])
        return speed[config["SPLIT_K"]]

    assert triton_tuning.choose_config("k", candidates, lambda c: c, timer) == {"SPLIT_K": 2}
    assert triton_tuning.choose_config("k", candidates, lambda c: c, timer) == {"SPLIT_K": 2}
    assert timed == [1, 2, 4]  # the second call was answered from the cache
    speed[4] = 0.5
    assert triton_tuning.choose_config("other shape", candidates, lambda c: c, timer) == {"SPLIT_K": 4}
    assert set(triton_tuning.chosen_configs()) == {"k", "other shape"}


def test_a_choice_is_stored_and_a_later_process_recalls_it_without_timing(monkeypatch, tmp_path):
    """kernels/tuning_store.py: the choice outlives the process; a stored config no longer among the
    candidates, another kernels' digest or a damaged store file is timed again."""
    from mpq.kernels import tuning_store

    candidates = [{"SPLIT_K": 1}, {"SPLIT_K": 2}]
    timed = []

    def timer(call):
        timed.append(call()["SPLIT_K"])
        return {1: 2.0, 2: 1.0}[timed[-1]]

    key = ("_w4a16_kernel", "gemv", 1, 4096, 4096, 128, True, torch.bfloat16, torch.device("cpu"))
    assert triton_tuning.choose_config(key, candidates, lambda c: c, timer) == {"SPLIT_K": 2} and timed == [1, 2]
    stored = json.loads(tuning_store.store_path().read_text())
    assert list(stored.values()) == [{"SPLIT_K": 2}] and "_w4a16_kernel gemv 1 4096 4096 128 True torch.bfloat16 cpu" in next(iter(stored))

    def new_process():
        monkeypatch.setattr(triton_tuning, "_CHOSEN", {})
        timed.clear()

    new_process()
    assert triton_tuning.choose_config(key, candidates, lambda c: c, timer) == {"SPLIT_K": 2} and timed == []
    new_process()
    assert triton_tuning.choose_config(key, [{"SPLIT_K": 1}, {"SPLIT_K": 4}], lambda c: c,
                                       lambda call: call()["SPLIT_K"]) == {"SPLIT_K": 1}  # the space changed
    new_process()
    monkeypatch.setattr(tuning_store, "kernels_digest", lambda: "edited")
    assert triton_tuning.choose_config(key, candidates, lambda c: c, timer) == {"SPLIT_K": 2} and timed == [1, 2]
    assert len(json.loads(tuning_store.store_path().read_text())) == 2  # both kernels' entries kept
    new_process()
    tuning_store.store_path().write_text("{not json")
    assert triton_tuning.choose_config(key, candidates, lambda c: c, timer) == {"SPLIT_K": 2} and timed == [1, 2]
    assert json.loads(tuning_store.store_path().read_text())  # rewritten whole


def test_a_failing_candidate_is_skipped_and_all_failing_is_an_error():
    def run(config):
        if config["BLOCK_N"] == 128:
            raise RuntimeError("out of shared memory")
        return config

    candidates = [{"BLOCK_N": 128}, {"BLOCK_N": 64}]
    assert triton_tuning.choose_config("k", candidates, run, lambda call: call()["BLOCK_N"]) == {"BLOCK_N": 64}
    costs = triton_tuning.tuning_costs()["k"]
    assert (costs["candidates"], costs["ran"], costs["best_ms"], costs["compile_ahead_s"]) == (2, 1, 64, 0.0)
    assert costs["timed"] == [[{"BLOCK_N": 64}, 64]]  # each candidate that ran, with its time
    with pytest.raises(RuntimeError, match="no launch config ran.*out of shared memory"):
        triton_tuning.choose_config("k2", candidates[:1], run, lambda call: call())


def test_compile_ahead_compiles_every_config_in_threads_and_a_failure_stops_none():
    compiled = []

    def compile_one(config):
        if config["BLOCK_N"] == 128:
            raise RuntimeError("too much shared memory")
        compiled.append((config["BLOCK_N"], threading.current_thread().name))

    configs = [{"BLOCK_N": n} for n in (16, 128, 32, 64)]
    assert triton_tuning.compile_ahead(configs, compile_one) >= 0
    assert sorted(n for n, _ in compiled) == [16, 32, 64]
    # the first on the calling thread (it makes the JIT's per-device cache), the rest on workers
    assert compiled[0] == (16, threading.current_thread().name)
    assert all(name.startswith("mpq-compile") for _, name in compiled[1:])


def test_compile_threads_follow_the_usable_cores_unless_set(monkeypatch):
    monkeypatch.delenv("MPQ_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(triton_tuning, "usable_cores", lambda: 16)
    assert [triton_tuning.compile_threads(jobs) for jobs in (0, 3, 51)] == [0, 3, 16]
    monkeypatch.setenv("MPQ_COMPILE_THREADS", "1")
    assert triton_tuning.compile_threads(51) == 1
    monkeypatch.setenv("MPQ_COMPILE_THREADS", "0")  # off: each config compiles when it is first timed
    assert triton_tuning.compile_threads(51) == 0
    assert triton_tuning.compile_ahead([{"BLOCK_N": 16}], lambda config: pytest.fail("compiled ahead")) == 0.0


@pytest.mark.slow
def test_a_shapes_first_call_compiles_its_candidates_ahead_in_threads_and_times_them_compiled(tmp_path):
    """benchmarks/first_call.py: real Triton compiles for sm_90 through the launchers, no GPU. With
    compiling ahead off (0 threads) each candidate compiles when it is timed, one after another;
    with 2 threads the launcher compiles them ahead (Triton's warmup; all but the first on worker
    threads), and every timed launch finds its kernel compiled: the warmup's specialisation and
    cache key are the launch's."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_call.py"), "--shape", "48x256", "--batches",
                           "1,20", "--configs", "3", "--threads", "0,2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "first_call.json").read_text())["rows"]
    assert {(r["format"], r["M"], r["threads"]) for r in rows} == {(f, m, t) for f in ("int4-g128", "int8")
                                                                     for m in (1, 20) for t in (0, 2)}
    for r in rows:
        assert r["cubins_in_cache"] == 3, r  # real sm_90 binaries of the fused kernel, one per config
        # prefill also times the dense route, whose dequantisation kernel compiles when it is first timed
        dense = int(r["M"] > 16)
        assert r["configs"] == r["compiles"] == 3 + dense, r
        if r["threads"] == 0:
            assert (r["compiled_on_workers"], r["compiled_while_timing"]) == (0, 3 + dense), r
        else:
            assert (r["compiled_on_workers"], r["compiled_while_timing"]) == (2, dense), r


@pytest.mark.parametrize("m", [1, 5, 20])
def test_an_untuned_launch_times_every_candidate_and_runs_the_fastest(m, monkeypatch):
    """The GPU launch path, on the CPU: pinning is switched off, so the launcher times each
    candidate (fake clock: the no-split config is fastest) and the result is still right."""
    import mpq.kernels.triton_w4a16 as w4

    candidates = [{"BLOCK_M": 1 if m == 1 else 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": s} for s in (2, 1)]
    if m > 16:
        candidates = [{**c, "BLOCK_M": 32, "SPLIT_K": 1, "BLOCK_N": bn} for c, bn in zip(candidates, (16, 32))]
    monkeypatch.setattr(w4, "interpreting", lambda: False)
    monkeypatch.setattr(w4, "tuner_space", lambda m, group, k: candidates)
    outputs = []

    def fake_clock(call):
        outputs.append(call())
        return 1.0 if len(outputs) == 2 else 2.0  # the second candidate wins

    monkeypatch.setattr(triton_tuning, "gpu_time_ms", fake_clock)
    torch.manual_seed(m)
    fmt = get_format("int4-g64")
    t = quantize_weight(torch.randn(40, 128), fmt)
    x = torch.randn(m, 128, dtype=torch.bfloat16)
    expected = linear_reference(x, t, fmt, None)
    got = w4.w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64)
    # prefill times the dense route too (last): dequantise to 16 bits, then F.linear
    assert len(outputs) == 2 + (m > 16) and list(triton_tuning.chosen_configs().values()) == [candidates[1]]
    for y in (*outputs, got):
        assert y.dtype == torch.bfloat16 and ((y.float() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("fmt_name", ["int4-g64", "int8"])
def test_prefill_takes_the_dense_route_where_it_times_fastest(fmt_name, monkeypatch):
    """The dense route is one more prefill candidate: chosen when the clock says it is fastest,
    and then each call dequantises and multiplies (the result still the reference's). Decode,
    fp32 activations and grouped launches are never offered it."""
    import mpq.kernels.triton_w4a16 as w4
    import mpq.kernels.triton_w8a16 as w8
    from mpq.kernels.triton_common import DENSE

    module = w8 if fmt_name == "int8" else w4
    monkeypatch.setattr(module, "interpreting", lambda: False)
    fused = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}
    monkeypatch.setattr(module, "tuner_space", lambda m, group=None, k=None: [fused])
    timed = []

    def fake_clock(call):
        timed.append(call())
        return 1.0 if len(timed) == 2 else 2.0  # the dense route, timed after the fused config, wins

    monkeypatch.setattr(triton_tuning, "gpu_time_ms", fake_clock)
    dequantised = []
    for name in ("dequantize_int4", "dequantize_int8"):
        real = getattr(module, name, None)
        if real is not None:
            monkeypatch.setattr(module, name, lambda *args, real=real: dequantised.append(args) or real(*args))
    torch.manual_seed(3)
    fmt = get_format(fmt_name)
    t = quantize_weight(torch.randn(40, 128), fmt)

    def call(x):
        if fmt_name == "int8":
            return w8.w8a16_linear(x, t["qweight"], t["scales"])
        return w4.w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64)

    x = torch.randn(20, 128, dtype=torch.float16)
    first, again = call(x), call(x)
    assert len(timed) == 2 and list(triton_tuning.chosen_configs().values()) == [DENSE]
    assert len(dequantised) == 3  # timed, then run for each call: the 16-bit weight is never kept
    expected = linear_reference(x, t, fmt, None)
    for y in (first, again):
        assert y.dtype == torch.float16 and ((y.float() - expected).norm() / expected.norm()).item() < 1e-2
    for x in (torch.randn(5, 128, dtype=torch.float16), torch.randn(20, 128)):  # decode; fp32 activations
        timed.clear()
        call(x)
        assert len(timed) == 1  # the fused config alone


def test_the_candidate_spaces_fit_a_gpu():
    """Every candidate a GPU would time is launchable there: power-of-two tiles, a K step inside
    one group, and tl.dot operands of 16+ along each side."""
    from mpq.kernels.triton_w4a16_configs import long_steps, tuner_space as w4_candidates
    from mpq.kernels.triton_w8a16 import tuner_space as w8_candidates

    for m in (1, 4, 16, 64, 512):
        for group in (32, 64, 128, 4096, 96):
            for c in w4_candidates(m, group, 4096):
                # a K step inside one group, or single_row's long steps: 2 to 4 whole groups that divide K
                assert (group % c["BLOCK_K"] == 0 or long_steps(c, group) and c["BLOCK_K"] // group <= 4
                        and 4096 % c["BLOCK_K"] == 0) and c["BLOCK_K"] // 2 >= 16
                # decode: single_row, 16-row tensor-core tiles, or 8-row ones turned round (W x^T: x^T is
                # the dot's 8-column operand, which a GPU takes) at M <= 8
                assert c["BLOCK_M"] in ((1, 16) if m > 8 or not c.get("TRANSPOSED") else (8,)) if m <= 16 else c["BLOCK_M"] >= 16
        for c in w8_candidates(m):
            assert c["BLOCK_K"] >= 16 and (c["BLOCK_M"] in (1, 16) if m <= 16 else c["BLOCK_M"] >= 16)
        splits = {c["SPLIT_K"] for c in w4_candidates(m, 128, 4096)}
        # decode may go without atomics; a prefill of up to 128 rows may split (its layers have few tiles)
        # (the one-warp tiles turned round, up to 8 rows, and the 16-row ones on one or two warps may split in 16)
        assert splits == ({1, 2, 4, 8, 16} if m <= 16 else {1, 2, 4} if m <= 128 else {1})


def test_single_rows_on_the_fma_units_keep_their_accumulator_in_registers():
    """W8A16's single row and both 16-bit and INT8 expert stacks hold a [BLOCK_K, BLOCK_N] fp32
    accumulator: their spaces keep it at 128 values a thread or fewer (128 x 256 on 4 warps, 256 a
    thread, spilled), and drop nothing smaller."""
    from mpq.kernels import triton_dense_grouped, triton_w8a16
    from mpq.kernels.triton_common import accumulator_fits

    assert accumulator_fits({"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4})
    assert not accumulator_fits({"BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 4})
    assert accumulator_fits({"BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8})
    rows = [c for m in (1, 4, 16) for c in triton_w8a16.tuner_space(m) if c["BLOCK_M"] == 1]
    for space in (rows, triton_w8a16.grouped_space(), triton_dense_grouped.grouped_space()):
        assert space and all(c["BLOCK_N"] * c["BLOCK_K"] // (32 * c["num_warps"]) <= 128 for c in space)
    assert {(c["BLOCK_N"], c["BLOCK_K"]) for c in triton_w8a16.grouped_space()} == {
        (n, k) for n in (64, 128, 256) for k in (64, 128, 256) if n * k <= 128 * 32 * 4}


def test_int4_decode_steps_k_by_the_groups_widest_step():
    """At M <= 16 every INT4 candidate steps K by 128 where the group allows it (or by whole groups:
    single_row's long steps), never by 64, which lost on every decode path on the H200; the 256-wide
    single row, which lost on all three of its shapes, is gone. Prefill keeps both K steps."""
    from mpq.kernels.triton_w4a16_configs import long_steps, tuner_space as w4_candidates

    for m in (1, 2, 4, 8, 9, 16):
        for group in (128, 256, 4096):
            space = w4_candidates(m, group, 4096)
            assert {c["BLOCK_K"] for c in space if not long_steps(c, group)} == {128}
            assert not [c for c in space if c["BLOCK_M"] == 1 and c["BLOCK_N"] > 128]
        assert {c["BLOCK_K"] for c in w4_candidates(m, 64, 4096) if not long_steps(c, 64)} == {64}  # one step
    assert {c["BLOCK_K"] for c in w4_candidates(64, 128, 4096)} == {64, 128}


def test_int4_decode_times_the_byte_path_on_16_row_tiles_from_9_rows():
    """The byte path (WORD_DOTS False) beat word_dots on the same 4-warp 16-row tiles in the H200's sweep;
    up to 8 rows the tiles turned round beat every 16-row tile there, so it joins from M = 9."""
    from mpq.kernels.triton_w4a16_configs import tuner_space as w4_candidates

    for m in (1, 4, 8, 9, 16):
        byte_tiles = [c for c in w4_candidates(m, 128, 4096) if c.get("WORD_DOTS") is False]
        assert {(c["BLOCK_N"], c["num_warps"], c["SPLIT_K"]) for c in byte_tiles} == (
            {(bn, 4, sk) for bn in (64, 128) for sk in (2, 4, 8)} if m > 8 else set())


def test_int4_prefill_space_times_word_tiles_beside_the_byte_path():
    """Prefill's INT4 space holds each tile with K steps of 64 or more twice, as word tiles (word_dots) and as the
    byte path (WORD_DOTS False), and 256-row tiles only where M has more than 128 rows."""
    from mpq.kernels.triton_w4a16_configs import tuner_space as w4_candidates

    for m in (64, 512):
        space = w4_candidates(m, 128, 4096)
        word_tiles = [c for c in space if c.get("WORD_DOTS", True) and not c.get("TRANSPOSED")]
        assert sorted(map(str, [{**c, "WORD_DOTS": False} for c in word_tiles])) == \
            sorted(map(str, [c for c in space if c.get("WORD_DOTS") is False]))
        assert any(c["BLOCK_M"] == 256 for c in space) == (m > 128)
    assert all("WORD_DOTS" not in c for c in w4_candidates(512, 32, 4096))  # K steps of 32: the byte path only


def test_int4_prefill_space_times_tiles_turned_round_in_k_steps_of_64_and_128():
    """Prefill turned round (turned_tiles: the weights as the warpgroup MMA's first operand, from registers)
    joins the space wherever a K step of 64 fits the group: 128 x 128 on 8 warps at two pipeline depths, and
    256 x 128 above 128 rows or 64 x 128 on 4 warps split 2 and 4 up to 128 (few tiles: K split for programs);
    above 128 rows, where a group has K steps of 128, also 128 x 128 in those."""
    from mpq.kernels.triton_w4a16_configs import runs_turned_tiles, tuner_space as w4_candidates

    up_to_128 = {(64, 128, 2, 64), (64, 128, 4, 64)}
    for group in (64, 128):
        above_128 = {(256, 128, 1, 64)} | ({(128, 128, 1, 128)} if group == 128 else set())
        for m, extra in ((17, up_to_128), (64, up_to_128), (512, above_128)):
            turned = [c for c in w4_candidates(m, group, 4096) if c.get("TRANSPOSED")]
            assert all(runs_turned_tiles(c) and "WORD_DOTS" not in c for c in turned)
            assert {(c["BLOCK_M"], c["BLOCK_N"], c["SPLIT_K"], c["BLOCK_K"]) for c in turned} == {(128, 128, 1, 64)} | extra
            assert sorted(c["num_stages"] for c in turned if c["BLOCK_M"] == 128 and c["BLOCK_K"] == 64) == [3, 4]
    assert not any(c.get("TRANSPOSED") for c in w4_candidates(512, 32, 4096))  # no K step of 64 in a group of 32
    assert not any(runs_turned_tiles(c) for m in (1, 8, 16) for c in w4_candidates(m, 128, 4096))  # decode: 8 rows


def test_int8_prefill_space_times_tiles_turned_round():
    """INT8's prefill space turns the same tiles round as INT4's (one pipeline depth), and its decode none."""
    from mpq.kernels.triton_w8a16 import tuner_space as w8_candidates

    for m, extra in ((17, {(64, 128, 2), (64, 128, 4)}), (512, {(256, 128, 1)})):
        turned = [c for c in w8_candidates(m) if c.get("TRANSPOSED")]
        assert {(c["BLOCK_M"], c["BLOCK_N"], c["SPLIT_K"]) for c in turned} == {(128, 128, 1)} | extra
        assert all(c["BLOCK_K"] == 64 and c["num_stages"] == 3 for c in turned)
    assert not any(c.get("TRANSPOSED") for m in (1, 4, 16) for c in w8_candidates(m))


def test_int4_layers_whose_groups_a_gpu_kernel_cannot_step_run_the_reference_on_cuda():
    odd = get_format("int4-pc")  # per channel: one group of all 200 inputs, not whole 32-column steps
    assert not triton_supports(odd, 200) and triton_supports(odd, 256) and triton_supports(get_format("int8"), 200)
    assert choose_backend(odd, 64, 200, "auto", "cuda") == "reference"
    assert choose_backend(odd, 64, 256, "auto", "cuda") == "triton"
    with pytest.raises(ValueError, match="no Triton kernel for int4-pc at 64x200.*MPQ_KERNELS=reference"):
        choose_backend(odd, 64, 200, "triton", "cpu")


@pytest.mark.parametrize("version, runs", [("3.2.0", "reference"), ("3.3.1+git1234", "reference"), ("3.4.0", "triton"),
                                           ("3.6.0", "triton"), ("3.10.0", "triton"), ("4.0.0", "triton")])
def test_a_triton_older_than_the_checked_ones_leaves_cuda_layers_on_the_reference(monkeypatch, caplog, version, runs):
    from mpq import qlinear

    monkeypatch.setattr(qlinear, "triton_version", lambda: version)
    int4 = get_format("int4-g128")
    assert choose_backend(int4, 64, 256, "auto", "cuda") == runs
    if runs == "reference":
        assert f"triton {version} is older than 3.4" in caplog.text
        with pytest.raises(ValueError, match=f"MPQ_KERNELS=triton but triton {re.escape(version)} is older"):
            choose_backend(int4, 64, 256, "triton", "cuda")
    assert choose_backend(int4, 64, 256, "auto", "cpu") == "cpu"  # the CPU never needs triton


def test_without_triton_cuda_layers_run_the_reference_and_asking_for_it_says_how_to_install(monkeypatch, caplog):
    from mpq import qlinear

    monkeypatch.setattr(qlinear, "triton_version", lambda: None)
    int8 = get_format("int8")
    assert choose_backend(int8, 64, 256, "auto", "cuda") == "reference"
    assert "triton is not installed" in caplog.text
    with pytest.raises(ValueError, match=r"triton is not installed: pip install 'mpq-compiler\[triton\]'"):
        choose_backend(int8, 64, 256, "triton", "cuda")


def test_a_shape_first_met_while_a_cuda_graph_is_captured_runs_untimed_and_is_tuned_later(monkeypatch, caplog):
    """Timing syncs the device, which a capture refuses: during one the launcher runs the first
    candidate untimed and keeps no choice; the first call outside a capture times the candidates."""
    import mpq.kernels.triton_common as common
    import mpq.kernels.triton_w4a16 as w4

    candidates = [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": s} for s in (2, 1)]
    monkeypatch.setattr(w4, "interpreting", lambda: False)
    monkeypatch.setattr(w4, "tuner_space", lambda m, group, k: candidates)
    timed = []
    monkeypatch.setattr(triton_tuning, "gpu_time_ms", lambda call: timed.append(call()) or 1.0)
    monkeypatch.setattr(common, "capturing", lambda x: True)
    torch.manual_seed(0)
    fmt = get_format("int4-g64")
    t = quantize_weight(torch.randn(40, 128), fmt)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    expected = linear_reference(x, t, fmt, None)
    with caplog.at_level("WARNING", logger="mpq.kernels.triton_common"):
        got = w4.w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64)
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2
    assert timed == [] and triton_tuning.chosen_configs() == {} and "untuned" in caplog.text
    monkeypatch.setattr(common, "capturing", lambda x: False)
    w4.w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64)
    assert len(timed) == 2 and len(triton_tuning.chosen_configs()) == 1
