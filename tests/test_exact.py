"""The DP solver is exact on brute-forceable cases, and never exceeds the budget when it rounds."""

import itertools
import random

import pytest

from mpq.search.exact import exact_front


def brute_front(costs, sens, capacity):
    names = list(costs)
    points = []
    for combo in itertools.product(*(list(costs[n]) for n in names)):
        nbytes = sum(costs[n][f] for n, f in zip(names, combo))
        if nbytes <= capacity:
            points.append((nbytes, sum(sens[n][f] for n, f in zip(names, combo))))
    points.sort()
    front, best = [], float("inf")
    for nbytes, loss in points:
        if loss < best - 1e-12:
            front.append((nbytes, loss))
            best = loss
    return front


def problem(n, seed, scale=1):
    rng = random.Random(seed)
    costs, sens = {}, {}
    for i in range(n):
        size = rng.choice([1, 2, 3, 4]) * scale
        costs[f"l{i}"] = {"fp16": 32 * size, "int8": 17 * size, "int4": 9 * size}
        s = rng.lognormvariate(0, 1)
        sens[f"l{i}"] = {"fp16": 0.0, "int8": s * 0.01 * rng.random(), "int4": s * rng.random()}
    return costs, sens


@pytest.mark.parametrize("seed", range(8))
def test_dp_front_equals_brute_force(seed):
    costs, sens = problem(6, seed)
    capacity = sum(max(c.values()) for c in costs.values())
    got = [(p.bytes, p.predicted) for p in exact_front(costs, sens, capacity)]
    expected = brute_front(costs, sens, capacity)
    assert [b for b, _ in got] == [b for b, _ in expected]
    assert [l for _, l in got] == pytest.approx([l for _, l in expected])


@pytest.mark.parametrize("seed", range(4))
def test_optimum_under_a_tight_budget(seed):
    costs, sens = problem(7, seed)
    capacity = (sum(min(c.values()) for c in costs.values()) + sum(max(c.values()) for c in costs.values())) // 2
    front = exact_front(costs, sens, capacity)
    assert front[-1].predicted == pytest.approx(brute_front(costs, sens, capacity)[-1][1])
    assert all(p.bytes <= capacity for p in front)


def test_rounded_costs_still_respect_the_budget():
    """With costs too large for an exact table, rounding up keeps every plan within its budget."""
    costs, sens = problem(30, seed=3, scale=1_000_003)
    capacity = sum(sorted(c.values())[1] for c in costs.values())
    front = exact_front(costs, sens, capacity, max_buckets=500)
    assert front and all(p.bytes <= capacity for p in front)
    assert all(a.bytes < b.bytes and a.predicted > b.predicted for a, b in zip(front, front[1:]))


def test_infeasible_capacity_gives_nothing():
    costs, sens = problem(3, seed=0)
    assert exact_front(costs, sens, 5) == []


def test_a_capped_front_is_spread_over_the_whole_one_and_ends_at_its_optimum():
    costs, sens = problem(40, seed=2)
    capacity = sum(max(c.values()) for c in costs.values())
    whole = exact_front(costs, sens, capacity)
    assert len(whole) > 50
    capped = exact_front(costs, sens, capacity, max_points=10)
    keys = [(p.bytes, p.predicted, p.plan) for p in whole]
    assert 5 <= len(capped) <= 10 and all((p.bytes, p.predicted, p.plan) in keys for p in capped)
    assert (capped[0].bytes, capped[-1].bytes) == (whole[0].bytes, whole[-1].bytes)
    assert max(b.bytes - a.bytes for a, b in zip(capped, capped[1:])) < (whole[-1].bytes - whole[0].bytes) / 4
    (optimum,) = exact_front(costs, sens, capacity, max_points=1)
    assert optimum.plan == whole[-1].plan and optimum.predicted == whole[-1].predicted


def test_thousands_of_rounded_layers_keep_their_budget():
    """3000 layers in the default 20 000 buckets: the DP counts only the bytes above each layer's
    cheapest format, so the optimum uses nearly all the room above the all-cheapest plan (counting
    whole costs in the same buckets it used 81% of it)."""
    costs, sens = problem(3000, seed=5, scale=1_000_003)
    low = sum(min(c.values()) for c in costs.values())
    capacity = (low + sum(sorted(c.values())[1] for c in costs.values())) // 2
    front = exact_front(costs, sens, capacity, max_points=20)
    assert front and all(p.bytes <= capacity for p in front) and front[0].bytes == low
    assert front[-1].bytes - low > 0.95 * (capacity - low)
