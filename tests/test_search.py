"""The Optuna search: the budget is never exceeded, uniform configs are seeded, results repeat."""

import itertools
import random

import pytest

from mpq.search import Candidate, pareto_front, search_plans, spread

FORMATS = {"fp16": 2000, "int8": 1010, "int4-g128": 530}


def problem(n_layers: int, seed: int):
    rng = random.Random(seed)
    layers = [f"model.layers.{i}.proj" for i in range(n_layers)]
    size = {l: rng.choice([1, 2, 4]) for l in layers}  # layers of a few different shapes
    costs = {l: {f: b * size[l] for f, b in FORMATS.items()} for l in layers}
    sens = {}
    for l in layers:
        scale = rng.lognormvariate(0, 1.5)
        sens[l] = {"fp16": 0.0, "int8": scale * 0.01 * rng.random(), "int4-g128": scale * (0.2 + rng.random())}
    return costs, sens


@pytest.mark.parametrize("budget_fraction", [0.3, 0.5, 0.8])
def test_budget_never_exceeded_and_front_is_non_dominated(budget_fraction):
    costs, sens = problem(20, seed=3)
    fixed = 5000
    low = fixed + sum(min(c.values()) for c in costs.values())
    high = fixed + sum(max(c.values()) for c in costs.values())
    budget = int(low + budget_fraction * (high - low))
    result = search_plans(costs, sens, fixed, budget, trials=150, seed=0, uniform=list(FORMATS))
    assert result.front and all(c.bytes <= budget for c in result.front)
    for a, b in itertools.permutations(result.front, 2):
        assert not (a.bytes <= b.bytes and a.predicted <= b.predicted and (a.bytes, a.predicted) != (b.bytes, b.predicted))
    # the cheapest feasible plan (all int4) is always found: it was enqueued
    assert result.front[0].bytes == low and result.front[0].origin == "uniform:int4-g128"


def test_no_feasible_uniform_config_dominates_the_front():
    costs, sens = problem(24, seed=5)
    result = search_plans(costs, sens, 0, 10**9, trials=120, seed=1, uniform=list(FORMATS))
    for fmt in FORMATS:
        plan_bytes = sum(c[fmt] for c in costs.values())
        plan_loss = sum(s[fmt] for s in sens.values())
        for cand in result.front:
            assert not (plan_bytes <= cand.bytes and plan_loss < cand.predicted)


def test_same_seed_same_result():
    costs, sens = problem(16, seed=7)
    runs = [search_plans(costs, sens, 0, 25000, trials=100, seed=42, uniform=list(FORMATS)) for _ in range(2)]
    assert [(c.bytes, c.formats) for c in runs[0].front] == [(c.bytes, c.formats) for c in runs[1].front]


def test_search_reaches_the_exact_optimum_on_a_brute_forceable_case():
    costs, sens = problem(6, seed=11)
    low = sum(min(c.values()) for c in costs.values())
    budget = (low + sum(max(c.values()) for c in costs.values())) // 2
    result = search_plans(costs, sens, 0, budget, trials=200, seed=0, uniform=list(FORMATS))
    best = min(
        (sum(sens[l][f] for l, f in zip(costs, combo)), combo)
        for combo in itertools.product(FORMATS, repeat=6)
        if sum(costs[l][f] for l, f in zip(costs, combo)) <= budget
    )
    assert min(c.predicted for c in result.front) == pytest.approx(best[0])


def test_tied_layers_always_share_a_format_and_tying_costs_predicted_quality():
    costs, sens = problem(12, seed=9)
    groups = [["model.layers.0.proj", "model.layers.1.proj", "model.layers.2.proj"], ["model.layers.5.proj", "model.layers.6.proj"]]
    budget = (sum(min(c.values()) for c in costs.values()) + sum(max(c.values()) for c in costs.values())) // 2
    tied = search_plans(costs, sens, 0, budget, trials=80, seed=0, uniform=list(FORMATS), tied=groups)
    free = search_plans(costs, sens, 0, budget, trials=80, seed=0, uniform=list(FORMATS))
    for cand in tied.front:
        assert len(cand.formats) == 12 and cand.bytes <= budget
        for group in groups:
            assert len({cand.formats[name] for name in group}) == 1
    assert free.exact_best <= tied.exact_best  # tying can only cost predicted quality
    assert min(c.predicted for c in tied.front) == pytest.approx(tied.exact_best)


def test_the_front_contains_the_exact_optimum_and_the_sampler_is_scored_against_it():
    costs, sens = problem(20, seed=4)
    budget = sum(sorted(c.values())[1] for c in costs.values())
    result = search_plans(costs, sens, 0, budget, trials=120, seed=0, uniform=list(FORMATS))
    assert min(c.predicted for c in result.front) == pytest.approx(result.exact_best)
    assert result.sampler_best is None or result.sampler_best >= result.exact_best - 1e-12


def test_pareto_front_and_spread():
    cands = [Candidate({}, b, p, "x") for b, p in [(1, 9.0), (2, 5.0), (3, 6.0), (4, 1.0), (5, 1.0), (6, 0.5)]]
    front = pareto_front(cands)
    assert [(c.bytes, c.predicted) for c in front] == [(1, 9.0), (2, 5.0), (4, 1.0), (6, 0.5)]
    picked = spread(front, 3)
    assert [c.bytes for c in picked] == [1, 4, 6]
    assert [c.bytes for c in spread(front, 1)] == [6] and spread(front, 0) == []


def test_a_stopped_study_resumes_to_the_same_front(tmp_path, monkeypatch):
    import optuna

    from mpq.search import open_storage

    costs, sens = problem(16, seed=8)
    budget = sum(sorted(c.values())[1] for c in costs.values())
    args = (costs, sens, 0, budget, 120, 3, list(FORMATS))
    whole = search_plans(*args, storage=open_storage(str(tmp_path / "whole.journal")), study_name="s")

    original = optuna.study.Study.optimize

    def killed_after_40(self, func, n_trials=None, **kwargs):
        original(self, func, n_trials=40, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(optuna.study.Study, "optimize", killed_after_40)
    with pytest.raises(KeyboardInterrupt):
        search_plans(*args, storage=open_storage(str(tmp_path / "cut.journal")), study_name="s")
    monkeypatch.undo()
    resumed = search_plans(*args, storage=open_storage(str(tmp_path / "cut.journal")), study_name="s")
    assert resumed.trials == whole.trials == 120
    assert [(c.bytes, c.formats, c.origin) for c in resumed.front] == [(c.bytes, c.formats, c.origin) for c in whole.front]


def test_sqlite_storage_works_too(tmp_path):
    from mpq.search import open_storage

    costs, sens = problem(6, seed=1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = search_plans(costs, sens, 0, 10**6, 30, 0, list(FORMATS), storage=open_storage(url), study_name="s")
    again = search_plans(costs, sens, 0, 10**6, 30, 0, list(FORMATS), storage=open_storage(url), study_name="s")
    assert first.trials == again.trials == 30 and (tmp_path / "study.db").stat().st_size > 0


def test_layers_sampled_together_are_one_variable_while_the_exact_plans_still_split_them():
    """A mixture's experts: the sampler moves each projection's experts as one, and the front's
    exact plans still give experts of one projection different formats."""
    import optuna

    from mpq.search.pareto import sampler_groups

    costs, sens = problem(24, seed=6)
    layers = list(costs)
    for name in layers[:16]:  # 16 experts' projections of one shape, each as sensitive as its tokens make it
        costs[name] = dict(FORMATS)
    together = [layers[:8], layers[8:16]]
    tied = [[layers[16], layers[17]]]
    members = {layers[16]: layers[16:18], **{name: [name] for name in layers if name not in layers[16:18]}}
    assert sampler_groups(members, [*together, [layers[17], layers[20]], [layers[3]]]) == [
        layers[:8], layers[8:16], [layers[16], layers[20]]]  # by unit, a unit in one group only, no group of one
    budget = sum(sum(sorted(c.values())[:2]) for c in costs.values()) // 2  # halfway from all int4 to all int8
    storage = optuna.storages.InMemoryStorage()
    result = search_plans(costs, sens, 0, budget, trials=60, seed=0, uniform=list(FORMATS), tied=tied,
                          sampled_together=together, storage=storage)
    assert result.variables == 24 - 1 - 14
    # the exact optimum over every layer is on the front, and it splits a group (the problem's sensitivities differ)
    best = min(result.front, key=lambda c: c.predicted)
    assert best.predicted == pytest.approx(result.exact_best) and best.bytes <= budget
    assert any(len({best.formats[name] for name in group}) > 1 for group in together)
    # every trial chose 9 formats, and a plan the sampler proposed keeps each group in one format
    assert all(len(t.params) == 9 for t in optuna.load_study(study_name="mpq", storage=storage).trials)
    proposed = [c for c in result.feasible if c.origin == "optuna"]
    assert proposed and all(len({c.formats[name] for name in group}) == 1 for c in proposed for group in together)
    assert all(c.bytes <= budget for c in result.front)
