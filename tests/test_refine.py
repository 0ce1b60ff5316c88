"""Measured refinement: a real Optuna study over measured quality at the budget. The best measured
plan wins, never one outside the constraints; its neighbour moves stay within the budget; a
killed study resumes to the same answer."""

import itertools

import numpy as np
import optuna
import pytest

from mpq.refine import refine_at_budget
from mpq.search import Candidate, evaluate_plan, exact_front, open_storage
from mpq.search.measured import Neighbours, measured_search

FORMATS = {"fp16": 4, "int8": 2, "int4": 1}


def problem(layers: int = 6):
    """Layers whose predicted (additive) loss misses a real interaction: a and b together in
    int4 cost far more than the sum of their parts, which only a measurement shows."""
    costs = {f"l{i}": {f: (i + 1) * 10 * w for f, w in FORMATS.items()} for i in range(layers)}
    sens = {f"l{i}": {"fp16": 0.0, "int8": 0.01 * (i + 1), "int4": 0.1 * (layers - i)} for i in range(layers)}
    return costs, sens


def real_loss(sens):
    def measure(plan: dict[str, str]) -> float:
        base = sum(sens[layer][fmt] for layer, fmt in plan.items())
        return base + (5.0 if plan["l4"] == "int4" and plan["l5"] == "int4" else 0.0)
    return measure


def seeds_for(costs, sens, budget):
    front = exact_front(costs, sens, budget)
    exact = Candidate(front[-1].plan, *evaluate_plan(front[-1].plan, costs, sens, 0), "exact")
    feasible = sorted((Candidate(p.plan, p.bytes, p.predicted, "optuna") for p in front if p.plan != exact.formats),
                      key=lambda c: c.predicted)
    return exact, feasible


def brute_force(costs, sens, budget, measure):
    layers = list(costs)
    best = None
    for choice in itertools.product(*(list(costs[layer]) for layer in layers)):
        plan = dict(zip(layers, choice))
        if sum(costs[layer][fmt] for layer, fmt in plan.items()) <= budget:
            value = measure(plan)
            best = value if best is None else min(best, value)
    return best


def test_the_measured_study_beats_the_additive_optimum_where_layers_interact():
    costs, sens = problem()
    budget = 300
    measure = real_loss(sens)
    exact, feasible = seeds_for(costs, sens, budget)
    assert exact.formats["l4"] == exact.formats["l5"] == "int4"  # the additive model walks into the interaction
    calls = []
    result = refine_at_budget(exact, feasible[:2], lambda p: calls.append(1) or measure(p), costs, sens, 0, budget,
                              trials=30, seeds=2)
    assert result.exact["measured"] == pytest.approx(measure(exact.formats))
    assert result.best_measured < result.exact["measured"] - 1.0  # left the interaction behind
    assert result.best_measured == pytest.approx(brute_force(costs, sens, budget, measure))  # and found the true best
    assert result.best.bytes <= budget and sum(costs[k][v] for k, v in result.best.formats.items()) == result.best.bytes
    assert result.gain > 0 and len(result.rows) == len(calls) <= 30
    assert all(row["bytes"] <= budget for row in result.rows)
    assert {row["origin"] for row in result.rows} >= {"exact", "refined"}


def test_a_plan_outside_the_other_constraints_is_measured_but_never_chosen():
    costs, sens = problem(3)
    budget = 120
    exact, feasible = seeds_for(costs, sens, budget)
    exact_key = tuple(sorted(exact.formats.items()))
    fits = lambda plan: tuple(sorted(plan.items())) != exact_key  # noqa: E731  (a latency cap that rejects the exact optimum)
    result = refine_at_budget(exact, feasible, lambda p: evaluate_plan(p, costs, sens, 0)[1] * 0.5, costs, sens, 0, budget,
                              trials=12, fits=fits)
    assert result.exact["fits"] is False and result.exact["measured"] == pytest.approx(exact.predicted * 0.5)
    assert result.best.formats != exact.formats and fits(result.best.formats)
    assert all(row["feasible"] == (row["origin"] != "exact" or row["predicted"] != exact.predicted) for row in result.rows)


def test_tied_layers_keep_one_format_in_every_trial():
    costs, sens = problem(4)
    tied = [["l1", "l2"]]
    seen = []

    def measure(plan):
        seen.append(dict(plan))
        return evaluate_plan(plan, costs, sens, 0)[1]

    exact, _ = seeds_for(costs, sens, 150)
    exact.formats["l2"] = exact.formats["l1"]
    exact.bytes, exact.predicted = evaluate_plan(exact.formats, costs, sens, 0)
    measured_search(costs, sens, 0, max(exact.bytes, 150), measure, [exact], 10, tied=tied)
    assert len(seen) >= 5 and all(plan["l1"] == plan["l2"] for plan in seen)


def test_neighbours_are_different_plans_within_the_budget():
    costs, sens = problem(6)
    options = {u: sorted(c, key=c.get) for u, c in costs.items()}
    sampler = Neighbours(options, costs, sens, 300, lambda plan: True, seed=0)
    rng = np.random.RandomState(0)
    start = {u: "int8" for u in costs}  # 420 bytes: the repair must free 120 first
    plans = [sampler.neighbour(dict(start), rng) for _ in range(50)]
    found = [plan for plan in plans if plan is not None]  # None: a move no repair can fit (two units to fp16)
    assert len(found) >= 25
    for plan in found:
        assert plan != start and sum(costs[u][f] for u, f in plan.items()) <= 300
        # the repair spends what is left: only the (one or two) units the move changed could still
        # take a better format within the budget
        left = 300 - sum(costs[u][f] for u, f in plan.items())
        could = [u for u, f in plan.items() for g in FORMATS if costs[u][f] < costs[u][g] <= costs[u][f] + left]
        assert len(set(could)) <= 2


def test_a_killed_measured_study_resumes_to_the_same_answer(tmp_path):
    costs, sens = problem()
    budget = 300
    measure = real_loss(sens)
    exact, feasible = seeds_for(costs, sens, budget)
    whole = measured_search(costs, sens, 0, budget, measure, [exact, *feasible[:3]], 20,
                            storage=open_storage(str(tmp_path / "whole.journal")))

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dies_at_the_ninth(plan):
        calls["n"] += 1
        if calls["n"] == 9:
            raise Killed
        return measure(plan)

    path = str(tmp_path / "killed.journal")
    with pytest.raises(Killed):
        measured_search(costs, sens, 0, budget, dies_at_the_ninth, [exact, *feasible[:3]], 20, storage=open_storage(path))
    storage = open_storage(path)
    states = [t.state for t in optuna.load_study(study_name="mpq-measured", storage=storage).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 8
    resumed = measured_search(costs, sens, 0, budget, measure, [exact, *feasible[:3]], 20, storage=storage)
    assert resumed.rows == whole.rows and resumed.best.formats == whole.best.formats


def test_a_plan_whose_measured_step_exceeds_the_latency_cap_is_never_chosen():
    costs, sens = problem()
    budget = 300
    measure = real_loss(sens)
    exact, feasible = seeds_for(costs, sens, budget)
    # the "machine" is slow whenever l3 is in int4 (a dequantisation cost the latency model missed)
    slow = lambda plan: 2.0 if plan["l3"] == "int4" else 1.0  # noqa: E731
    free = refine_at_budget(exact, feasible, measure, costs, sens, 0, budget, trials=20)
    assert free.best.formats["l3"] == "int4"  # without the cap the best measured plan is a slow one
    capped = refine_at_budget(exact, feasible, measure, costs, sens, 0, budget, trials=20, time_step=slow, max_latency=1.5)
    assert capped.best.formats["l3"] != "int4"
    assert all(("latency_s" in row) and row["feasible"] == (row["latency_s"] <= 1.5) for row in capped.rows)


def test_when_no_plan_meets_the_cap_as_timed_the_best_by_prediction_is_chosen_and_said():
    costs, sens = problem()
    budget = 300
    exact, feasible = seeds_for(costs, sens, budget)
    result = refine_at_budget(exact, feasible, real_loss(sens), costs, sens, 0, budget, trials=10,
                              time_step=lambda plan: 2.0, max_latency=1.0)  # a machine slower than every plan's cap
    assert not result.timing_met and result.to_json()["timing_met"] is False
    assert result.best.bytes <= budget and all(not row["feasible"] for row in result.rows)
    assert result.best_measured == min(row["measured"] for row in result.rows)
