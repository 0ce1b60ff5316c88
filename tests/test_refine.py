"""Measured refinement: the best measured plan wins, never one outside the constraints."""

from mpq.refine import refine_at_budget
from mpq.search import Candidate


def plan(tag: str) -> dict[str, str]:
    return {"a": tag, "b": "int8"}


def test_the_least_measured_plan_wins_and_the_gain_is_reported():
    exact = Candidate(plan("int4"), 100, 0.10, "exact")
    feasible = [Candidate(plan("int4"), 100, 0.10, "exact"), Candidate(plan("fp16"), 120, 0.11, "optuna"),
                Candidate(plan("int8"), 110, 0.12, "optuna")]
    real = {"int4": 0.30, "fp16": 0.20, "int8": 0.25}  # the additive model ranked them the other way round
    calls = []

    def measure(p):
        calls.append(p["a"])
        return real[p["a"]]

    result = refine_at_budget(exact, True, feasible, measure, count=8)
    assert result.best.formats == plan("fp16") and result.best.origin == "refined"
    assert result.best_measured == 0.20 and result.exact["measured"] == 0.30
    assert abs(result.gain - (1 - 0.20 / 0.30)) < 1e-12
    assert sorted(calls) == ["fp16", "int4", "int8"]  # each plan measured once
    assert len(result.to_json()["rows"]) == 4


def test_an_exact_optimum_outside_the_latency_cap_is_measured_but_never_chosen():
    exact = Candidate(plan("int4"), 100, 0.10, "exact")
    feasible = [Candidate(plan("int8"), 110, 0.12, "optuna"), Candidate(plan("fp16"), 120, 0.15, "optuna")]
    result = refine_at_budget(exact, False, feasible, lambda p: {"int4": 0.01, "int8": 0.3, "fp16": 0.2}[p["a"]], count=1)
    assert result.exact == {"predicted": 0.10, "measured": 0.01, "fits": False}
    assert result.best.formats == plan("int8") and result.best.origin == "optuna"  # count=1: the one candidate
    assert result.optuna["measured"] == 0.3 and result.gain == 0.0
