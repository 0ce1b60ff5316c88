"""The latency model: regimes, its arithmetic on crafted numbers, profiling a tiny model, and the
search under a latency cap. No test asserts a speed: speed targets live in benchmarks/."""

import itertools
import json
import random

import pytest
import torch

from mpq.cli import main
from mpq.errors import MpqError
from mpq.formats import parse_formats
from mpq.latency import (LatencyModel, Regime, device_signature, find_profile, make_regime, measure_plans, parse_seconds,
                         profile)
from mpq.models import CAUSAL_LM, ENCODER, load_model
from mpq.profile import example_inputs, profile_table
from mpq.search import search_plans
from mpq.trace import trace_model


def test_parse_seconds():
    assert parse_seconds("25ms") == pytest.approx(0.025)
    assert parse_seconds("800us") == pytest.approx(8e-4)
    assert parse_seconds("0.02s") == pytest.approx(0.02)
    assert parse_seconds("1.5") == 1.5
    for bad in ("fast", "-3ms", "0"):
        with pytest.raises(MpqError):
            parse_seconds(bad)


def test_regimes():
    assert make_regime(None, 1, 128, CAUSAL_LM) == Regime("decode", 1, 128)
    assert make_regime(None, 2, 64, ENCODER) == Regime("prefill", 2, 64)
    assert Regime("decode", 4, 128).tokens == 4 and Regime("prefill", 4, 128).tokens == 512
    with pytest.raises(MpqError, match="encoder has no decode step"):
        make_regime("decode", 1, 128, ENCODER)
    with pytest.raises(MpqError, match="exceeds the model's 512 positions"):
        make_regime("decode", 1, 512, CAUSAL_LM, max_positions=512)
    with pytest.raises(MpqError, match="not one of"):
        make_regime("train", 1, 8, CAUSAL_LM)


def crafted() -> LatencyModel:
    """q/k/v sharing an input, o alone; fusing q/k/v saves time, as on a GPU."""
    layers = {"q": [64, 64, False], "k": [32, 64, False], "v": [32, 64, False], "o": [64, 64, False]}
    alone = {"fp16": 4.0, "int8": 2.0, "int4-g32": 1.0}
    return LatencyModel(
        regime={"kind": "decode", "batch": 1, "length": 8}, device="test", layers=layers, groups=[["q", "k", "v"]],
        layer_seconds={name: dict(alone) for name in layers},
        group_seconds={"q|k": {"fp16": 7.0, "int8": 3.5, "int4-g32": 1.5}, "q|v": {"fp16": 7.0, "int8": 3.5, "int4-g32": 1.5},
                       "k|v": {"fp16": 7.0, "int8": 3.5, "int4-g32": 1.5},
                       "q|k|v": {"fp16": 9.0, "int8": 4.5, "int4-g32": 2.0}},
        baseline_seconds=20.0, rest_seconds=3.0)


def test_prediction_sums_layers_fused_as_emitted():
    model = crafted()
    assert model.predict({"q": "fp16", "k": "fp16", "v": "fp16", "o": "fp16"}) == 3.0 + 9.0 + 4.0
    # two of three agree: those two fuse, the third runs alone
    assert model.predict({"q": "int8", "k": "int8", "v": "int4-g32", "o": "int4-g32"}) == 3.0 + 3.5 + 1.0 + 1.0
    # none agree: every layer alone
    assert model.predict({"q": "fp16", "k": "int8", "v": "int4-g32", "o": "int8"}) == 3.0 + 4.0 + 2.0 + 1.0 + 2.0
    assert model.speedup({"q": "fp16", "k": "fp16", "v": "fp16", "o": "fp16"}) == pytest.approx(20.0 / 16.0)


def fake_problem(n_layers: int, seed: int):
    """Crafted costs, sensitivities and latencies where smaller is not always faster (INT4 has a
    dequantisation cost that makes it slower than INT8 on some layers, as in a prefill)."""
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(n_layers)]
    costs = {n: {"fp16": 2000, "int8": 1010, "int4-g128": 530} for n in names}
    sens = {n: {"fp16": 0.0, "int8": 0.01 * rng.random(), "int4-g128": 0.1 + rng.random()} for n in names}
    times = {n: {"fp16": 4.0, "int8": 2.0 + rng.random(), "int4-g128": 1.0 + 3 * rng.random()} for n in names}
    latency = LatencyModel(regime={"kind": "prefill", "batch": 1, "length": 8}, device="test",
                           layers={n: [8, 8, False] for n in names}, groups=[], layer_seconds=times, group_seconds={},
                           baseline_seconds=4.0 * n_layers + 1.0, rest_seconds=1.0)
    return costs, sens, latency


def test_search_with_a_latency_cap_never_violates_it():
    costs, sens, latency = fake_problem(12, seed=5)
    fastest = latency.rest_seconds + sum(min(t.values()) for t in latency.layer_seconds.values())
    slowest = latency.rest_seconds + sum(max(t.values()) for t in latency.layer_seconds.values())
    cap = fastest + 0.3 * (slowest - fastest)
    budget = sum(c["int8"] for c in costs.values())
    result = search_plans(costs, sens, 0, budget, trials=200, seed=0, uniform=["fp16", "int8", "int4-g128"],
                          latency=latency, max_latency=cap)
    assert result.front
    for cand in result.front:
        assert cand.bytes <= budget and cand.latency <= cap + 1e-12
        assert cand.latency == pytest.approx(latency.predict(cand.formats))
    # non-dominated in three objectives
    for a, b in itertools.permutations(result.front, 2):
        pa, pb = (a.bytes, a.predicted, a.latency), (b.bytes, b.predicted, b.latency)
        assert not (all(x <= y for x, y in zip(pa, pb)) and pa != pb)
    # without the cap the same study finds plans slower than the cap: the constraint did something
    free = search_plans(costs, sens, 0, budget, trials=200, seed=0, uniform=["fp16", "int8", "int4-g128"], latency=latency)
    assert max(c.latency for c in free.front) > cap


def test_the_search_judges_latency_by_the_whole_plan_not_the_sum_of_its_units():
    """q and k fuse when they agree: all-int8 takes 1 + 2.5 s, though its units alone add up to
    1 + 2 + 2. Under a 4 s cap that plan is the one that fits, and the search must find it."""
    costs = {n: {"fp16": 2000, "int8": 1000} for n in ("q", "k")}
    sens = {n: {"fp16": 0.0, "int8": 0.01} for n in ("q", "k")}
    latency = LatencyModel(regime={"kind": "decode", "batch": 1, "length": 8}, device="test",
                           layers={n: [8, 8, False] for n in ("q", "k")}, groups=[["q", "k"]],
                           layer_seconds={n: {"fp16": 3.0, "int8": 2.0} for n in ("q", "k")},
                           group_seconds={"q|k": {"fp16": 4.0, "int8": 2.5}}, baseline_seconds=5.0, rest_seconds=1.0)
    result = search_plans(costs, sens, 0, 4000, trials=8, seed=0, uniform=["fp16", "int8"], latency=latency,
                          max_latency=4.0)
    assert [c.formats for c in result.front] == [{"q": "int8", "k": "int8"}]
    assert result.front[0].latency == 3.5
    loose = search_plans(costs, sens, 0, 4000, trials=8, seed=0, uniform=["fp16", "int8"], latency=latency)
    # without a cap every plan is on the front (bytes, loss and time trade), each priced as a whole
    assert len(loose.front) == 4
    assert all(c.latency == latency.predict(c.formats) for c in [*loose.front, *loose.feasible])


@pytest.fixture
def tiny_profile(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    graph = trace_model(loaded.model, example_inputs(loaded.task, 4096))
    formats = parse_formats("fp16,int8,int4", 32)
    groups = graph.shared_input_groups()
    return loaded, graph, formats, groups


def test_profile_of_a_tiny_model_covers_every_layer_format_and_group(tiny_profile, monkeypatch):
    import mpq.latency

    # On a loaded machine (CI's 2 cores), the layers timed alone can outlast the whole step and the
    # second profile would time every entry again (tested below): reuse is what this test checks.
    monkeypatch.setattr(mpq.latency, "INCONSISTENT", float("inf"))
    loaded, graph, formats, groups = tiny_profile
    regime = Regime("decode", 2, 16)
    latency = profile(loaded.model, loaded.task, graph.layers, formats, regime, groups, budget_s=0.01, key="k")
    assert set(latency.layer_seconds) == {layer.name for layer in graph.layers}
    for per_format in latency.layer_seconds.values():
        assert set(per_format) == {"fp16", "int8", "int4-g32"} and all(v > 0 for v in per_format.values())
    # q/k/v of each block: 4 subsets of 2+ layers; gate/up: 1
    assert len(latency.group_seconds) == 2 * (4 + 1)
    assert latency.baseline_seconds > 0 and latency.rest_seconds >= 0
    assert not latency.reused
    # layer entries are cached per device and shape: a second profile times only the model's step
    again = profile(loaded.model, loaded.task, graph.layers, formats, regime, groups, budget_s=0.01)
    assert again.reused and again.layer_seconds == latency.layer_seconds
    table = profile_table(latency)
    assert "| 64x64 | alone |" in table and "fused" in table
    # measured steps of two plans, through the context managers compile uses
    from contextlib import nullcontext

    measured = measure_plans(loaded.model, loaded.task, regime, [nullcontext, nullcontext], rounds=1)
    assert len(measured) == 2 and all(m > 0 for m in measured)


def test_saved_profile_is_found_by_key_only(tiny_profile, tmp_path):
    loaded, graph, formats, groups = tiny_profile
    latency = profile(loaded.model, loaded.task, graph.layers, formats, Regime("prefill", 1, 8), groups,
                      budget_s=0.01, key="abc")
    # Whether this profile came out consistent depends on how loaded the machine was; the key is
    # what is checked here, and then that an inconsistent profile is never found.
    latency.consistent = True
    latency.save(tmp_path / "latency.json")
    assert find_profile("abc", tmp_path / "latency.json").rest_seconds == latency.rest_seconds
    assert find_profile("other", tmp_path / "latency.json") is None
    latency.consistent = False
    latency.save(tmp_path / "busy.json")
    assert find_profile("abc", tmp_path / "busy.json") is None


def test_cached_entries_timed_on_a_busy_machine_are_timed_again(tiny_profile):
    """Entries 100x too slow (measured while the machine was loaded) sum to more than the whole
    model's step, which the layers alone cannot take: the profile times every entry again and
    rewrites the cache, instead of predicting with them."""
    import torch

    from mpq.latency import _EntryCache

    loaded, graph, _, groups = tiny_profile
    formats = parse_formats("int8")  # one format is enough to see the entries re-timed, and 3x cheaper
    regime = Regime("decode", 1, 16)
    first = profile(loaded.model, loaded.task, graph.layers, formats, regime, groups, budget_s=0.01)
    path = _EntryCache(torch.device("cpu"), True).path
    cached = json.loads(path.read_text())
    cached["entries"] = {key: value * 100 for key, value in cached["entries"].items()}
    path.write_text(json.dumps(cached))
    again = profile(loaded.model, loaded.task, graph.layers, formats, regime, groups, budget_s=0.01)
    assert not again.reused and "so every layer was timed again" in again.notes[0]
    # Fresh timings, not the 100x ones: medians, since on CI's 2 loaded cores one microsecond-scale
    # entry timed again can come out more than 10x its first timing.
    layers = [name for name in first.layer_seconds if first.layer_seconds[name].get("int8")]
    by_layer = sorted(again.layer_seconds[n]["int8"] / first.layer_seconds[n]["int8"] for n in layers)
    assert by_layer[len(by_layer) // 2] < 10
    rewritten = json.loads(path.read_text())["entries"]
    assert rewritten.keys() == cached["entries"].keys()
    assert all(rewritten[key] != value for key, value in cached["entries"].items())  # every entry timed again
    by_entry = sorted(rewritten[key] / (value / 100) for key, value in cached["entries"].items())
    assert by_entry[len(by_entry) // 2] < 10


def test_a_profile_whose_layers_outlast_the_step_is_never_reused(tiny_profile, tmp_path, monkeypatch):
    import mpq.latency

    loaded, graph, _, groups = tiny_profile
    monkeypatch.setattr(mpq.latency, "measure_step", lambda *args, **kwargs: 1e-9)  # a step no layer fits in
    latency = profile(loaded.model, loaded.task, graph.layers, parse_formats("int8"), Regime("decode", 1, 16), groups,
                      budget_s=0.01, key="busy")
    assert not latency.consistent and latency.rest_seconds == 0 and len(latency.notes) == 2
    assert "is not kept" in latency.notes[1]
    latency.save(tmp_path / "latency.json")
    assert find_profile("busy", tmp_path / "latency.json") is None
    assert LatencyModel.load(tmp_path / "latency.json").notes == latency.notes  # still on record in OUT


def test_impossible_latency_cap_is_a_one_line_error(tiny_llama_dir, tmp_path, capsys):
    code = main(["compile", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "-q", "--samples", "4", "--seq-len", "32",
                 "--group-size", "32", "--trials", "20", "--max-latency", "1us"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no config can run a decode step" in err and "raise --max-latency" in err
    assert not (tmp_path / "out" / "configs").exists()
    code = main(["compile", str(tiny_llama_dir), "-o", str(tmp_path / "out2"), "-q", "--no-latency", "--min-speedup", "2"])
    assert code == 2 and "drop --no-latency" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_under_a_latency_cap(tiny_llama_dir, tmp_path, capsys):
    args = ["compile", str(tiny_llama_dir), "-q", "--samples", "4", "--seq-len", "32", "--group-size", "32",
            "--trials", "60", "--max-configs", "4", "--regime", "prefill", "--length", "32"]
    assert main([*args, "-o", str(tmp_path / "free")]) == 0
    free = json.loads((tmp_path / "free" / "summary.json").read_text())
    assert (tmp_path / "free" / "speedup.png").stat().st_size > 10_000
    assert "## Latency" in (tmp_path / "free" / "report.md").read_text()
    times = sorted(row["latency_predicted_s"] for row in [*free["configs"], *free["uniform"]])
    for row in free["configs"]:
        assert row["latency_measured_s"] > 0 and row["speedup_predicted"] > 0
    cap = (times[0] + times[-1]) / 2
    assert main([*args, "--max-latency", f"{cap}s", "-o", str(tmp_path / "capped")]) == 0
    capped = json.loads((tmp_path / "capped" / "summary.json").read_text())
    assert capped["latency"]["reused"]  # same model, regime and formats: the profile is not measured again
    assert capped["latency"]["cap_seconds"] == pytest.approx(cap)
    assert capped["configs"] and all(row["latency_predicted_s"] <= cap for row in capped["configs"])


def test_profile_command_prints_the_table_and_writes_json(tiny_llama_dir, tmp_path, capsys):
    assert main(["profile", str(tiny_llama_dir), "--regime", "prefill", "--length", "16", "--group-size", "32",
                 "--device", "cpu", "-o", str(tmp_path / "latency.json")]) == 0
    printed = capsys.readouterr().out
    assert "| layer (out x in; table: rows x dim) | how |" in printed and "prefill, batch 1, length 16" in printed
    saved = LatencyModel.load(tmp_path / "latency.json")
    assert saved.regime == {"kind": "prefill", "batch": 1, "length": 16}
    assert main(["profile", str(tiny_llama_dir), "--length", "100000", "--device", "cpu"]) == 2
    assert "exceeds the model's" in capsys.readouterr().err


def test_cached_cpu_times_are_keyed_by_which_layers_take_float32_tiles(monkeypatch):
    """A fp16 layer's CPU time depends on whether MPQ_CPU_MATMUL routes its dtype (float32 tiles
    from 16 tokens, or torch's 16-bit GEMM), a quantised one's on the kernels' thresholds: times
    measured under one are not reused under another."""
    from mpq.kernels import cpu as cpu_kernels

    signatures = set()
    for setting in ("fp32", "native"):
        monkeypatch.setenv("MPQ_CPU_MATMUL", setting)
        signatures.add(device_signature("cpu"))
    monkeypatch.setitem(cpu_kernels.FLOAT32_FROM_TOKENS, 8, 32)
    signatures.add(device_signature("cpu"))
    assert len(signatures) == 3
    assert "float32 tiles" not in device_signature("cuda")


def test_timing_again_times_each_entry_once_more_not_once_per_layer_that_shares_it(monkeypatch, tmp_path):
    """After a profile found its times stale, every entry is timed again, but an entry that several
    layers (or mixtures) share only once: else the layers of one shape got different times in one
    profile, and the cache kept the last."""
    from mpq.latency import _EntryCache

    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path))
    cache = _EntryCache(torch.device("cpu"), use_cache=True)
    timed = []
    measure = lambda: timed.append(1) or float(len(timed))  # noqa: E731
    assert [cache.get("entries", "shape", measure) for _ in range(2)] == [1.0, 1.0]
    cache.time_again()
    assert [cache.get("entries", "shape", measure) for _ in range(3)] == [2.0, 2.0, 2.0]
    assert len(timed) == 2 and cache.data["entries"]["shape"] == 2.0
