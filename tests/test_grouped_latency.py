"""The latency model of mixtures that decode grouped (mpq.grouped_latency): predictions from crafted
numbers, and a profile of a tiny Mixtral on the CPU interpreter standing in for a CUDA device."""

import pytest
import torch

from mpq.latency import LatencyModel, Regime

from conftest import tiny_llama4, tiny_mixtral

EXPERTS = 4
STACKS = [[f"m.{e}.gate_up_proj" for e in range(EXPERTS)], [f"m.{e}.down_proj" for e in range(EXPERTS)]]
LAUNCH = [{"int8": [10.0, 2.0], "int4-g32": [12.0, 1.0], "fp16": [8.0, 4.0]},
          {"int8": [6.0, 1.0], "int4-g32": [7.0, 0.5], "fp16": [5.0, 2.0]}]
LOOP = {"int8": 20.0, "int4-g32": 19.0, "fp16": 25.0, "int4-g128": 18.0}  # each expert layer as its own launch


def crafted() -> LatencyModel:
    """One mixture of 4 experts, each called 0.5 times a step; int4-g128 has no grouped launch."""
    names = [name for stack in STACKS for name in stack]
    return LatencyModel(regime={"kind": "decode", "batch": 1, "length": 8}, device="test",
                        layers={**{n: [8, 8, False] for n in names}, "o": [8, 8, False]}, groups=[],
                        layer_seconds={**{n: dict(LOOP) for n in names}, "o": {"int8": 3.0}}, group_seconds={},
                        baseline_seconds=500.0, rest_seconds=100.0, calls={n: 0.5 for n in names},
                        mixtures=[{"path": "m", "stacks": STACKS, "launch": LAUNCH, "glue_saved": 30.0}])


def uniform(fmt: str) -> dict[str, str]:
    return {name: fmt for stack in STACKS for name in stack}


def test_a_grouped_mixture_pays_each_formats_launch_once_and_gets_the_glue_back():
    model = crafted()
    # int8: per projection one launch (10, 6) plus 4 experts x 0.5 calls x (2, 1); less 30 of glue
    assert model.predict({**uniform("int8"), "o": "int8"}) == pytest.approx(100 + 3 + (10 + 4 * 0.5 * 2) + (6 + 4 * 0.5 * 1) - 30)
    # experts 0-1 int8, 2-3 int4: both formats launch in both projections
    mixed = {name: ("int8" if int(name.split(".")[1]) < 2 else "int4-g32") for name in uniform("int8")}
    assert model.layers_seconds(mixed) == pytest.approx((10 + 12 + 2 * 0.5 * 2 + 2 * 0.5 * 1)
                                                        + (6 + 7 + 2 * 0.5 * 1 + 2 * 0.5 * 0.5) - 30)
    # 16-bit experts group too
    assert model.layers_seconds(uniform("fp16")) == pytest.approx((8 + 4 * 0.5 * 4) + (5 + 4 * 0.5 * 2) - 30)


def test_a_format_without_a_grouped_launch_sends_the_mixture_to_the_loop():
    model = crafted()
    plan = {**uniform("int8"), "m.3.down_proj": "int4-g128"}
    loop = sum(LOOP[fmt] * 0.5 for fmt in plan.values())
    assert model.layers_seconds(plan) == pytest.approx(loop)  # per layer, as often as called; no glue back


def test_the_search_units_of_one_format_add_up_to_the_whole_mixture():
    """The search prices each unit alone (mpq.search.pareto.unit_latency): a part of a mixture
    carries its share of the launches and the glue, so one format's units sum to the whole."""
    model = crafted()
    for fmt in ("int8", "int4-g32", "fp16"):
        parts = sum(model.layers_seconds({name: fmt}) for name in uniform(fmt))
        assert parts == pytest.approx(model.layers_seconds(uniform(fmt)))
    # a unit's price is the same alone or beside layers of other mixtures and plain layers
    assert model.layers_seconds({"m.0.down_proj": "int8", "o": "int8"}) == pytest.approx(
        model.layers_seconds({"m.0.down_proj": "int8"}) + 3.0)


def test_a_saved_model_keeps_its_mixtures(tmp_path):
    model = crafted()
    model.save(tmp_path / "latency.json")
    again = LatencyModel.load(tmp_path / "latency.json")
    assert again.mixtures == model.mixtures and again.predict(uniform("int8")) == model.predict(uniform("int8"))


@pytest.mark.parametrize("tokens,grouped", [(1, True), (17, False)])
def test_groups_here_needs_cuda_and_a_decode_sized_step(tokens, grouped, monkeypatch):
    from mpq import grouped_latency

    monkeypatch.setattr("mpq.qlinear.triton_available", lambda: True)
    assert not grouped_latency.groups_here(torch.device("cpu"), tokens)
    assert grouped_latency.groups_here(torch.device("cuda"), tokens) == grouped
    monkeypatch.setenv("MPQ_KERNELS", "reference")
    assert not grouped_latency.groups_here(torch.device("cuda"), tokens)


@pytest.mark.slow
@pytest.mark.parametrize("build", ["mixtral", "llama4"])
def test_a_profile_where_mixtures_decode_grouped_measures_their_launches_and_glue(build, monkeypatch):
    """On the CPU interpreter, standing in for CUDA (groups_here patched, every quantised layer on
    Triton): each mixture gets its two stacks, a [fixed, per expert] launch per format, the glue it
    saves, and the plans' predictions use them; a second profile times none of it again. Llama 4's
    experts (mpq.experts.ScoredExperts) are timed through the calls its mixture makes."""
    from mpq import grouped_latency
    from mpq import latency as latency_module
    from mpq.experts import expert_projections, route_experts
    from mpq.formats import parse_formats
    from mpq.latency import profile
    from mpq.models import CAUSAL_LM
    from mpq.profile import profile_table
    from mpq.trace import trace_model

    pytest.importorskip("triton")
    monkeypatch.setenv("MPQ_KERNELS", "triton")
    monkeypatch.setattr(grouped_latency, "groups_here", lambda device, tokens: tokens <= 16)
    # a loaded machine would have the second profile time every entry again (see test_latency)
    monkeypatch.setattr(latency_module, "INCONSISTENT", float("inf"))
    model = tiny_mixtral() if build == "mixtral" else tiny_llama4()
    route_experts(model)
    model = model.to(torch.bfloat16)
    graph = trace_model(model, {"input_ids": torch.randint(0, 128, (1, 8)), "use_cache": False})
    layers = [layer for layer in graph.layers if layer.kind != "embed_tokens"]
    formats = parse_formats("fp16,int8,int4-g32")
    latency = profile(model, CAUSAL_LM, layers, formats, Regime("decode", 1, 8), [], budget_s=0.002)
    assert [mixture["stacks"] for mixture in latency.mixtures] == [expert_projections(model)[i:i + 2] for i in (0, 2)]
    for mixture in latency.mixtures:
        assert [sorted(seconds) for seconds in mixture["launch"]] == [["fp16", "int4-g32", "int8"]] * 2
        assert all(fixed > 0 and per_expert >= 0 for seconds in mixture["launch"] for fixed, per_expert in seconds.values())
        assert isinstance(mixture["glue_saved"], float)
    assert any("2 mixtures decode grouped here" in note for note in latency.notes)
    experts = [name for stacks in expert_projections(model) for name in stacks]
    plan = {layer.name: "int8" for layer in layers}
    grouped = sum(grouped_latency_seconds(latency, mixture, "int8") for mixture in latency.mixtures)
    apart = sum(latency.layer_seconds[name]["int8"] * latency.calls[name] for name in experts)
    others = {name: fmt for name, fmt in plan.items() if name not in experts}
    assert latency.layers_seconds(plan) == pytest.approx(latency.layers_seconds(others) + grouped)
    assert grouped != pytest.approx(apart)
    again = profile(model, CAUSAL_LM, layers, formats, Regime("decode", 1, 8), [], budget_s=0.002)
    assert again.reused and again.mixtures == latency.mixtures
    table = profile_table(latency)
    assert "| 128x32 | grouped launch, fixed |" in table and "| 32x64 | grouped, per expert read |" in table


def grouped_latency_seconds(latency: LatencyModel, mixture: dict, fmt: str) -> float:
    """A whole mixture in one format, by hand: a launch per projection, its experts' expected calls, less the glue."""
    return sum(seconds[fmt][0] + seconds[fmt][1] * sum(latency.calls[name] for name in stack)
               for stack, seconds in zip(mixture["stacks"], mixture["launch"])) - mixture["glue_saved"]
