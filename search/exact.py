"""The exact optimum of the additive model: dynamic programming over a discretised byte budget.

Minimise sum_l sens[l][f_l] subject to sum_l bytes[l][f_l] <= capacity. Bytes are counted in
units of q: the gcd of all costs when that keeps the table small (then the answer is exact), else
capacity / max_buckets with every cost rounded up (then every plan returned still fits its
budget, and the optimum is exact for the rounded costs). Only the bytes above each layer's
cheapest format are counted: every plan holds the rest, and with thousands of layers the rounding
of whole costs added up (a mixture of 12 480 layers in 20 000 buckets: its optimum used 75% of the
budget, against 93% now). One pass gives the optimum at every budget up to the capacity: the whole
(bytes, predicted) Pareto front, in O(layers x formats x buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_BUCKETS = 20_000


@dataclass
class ExactPoint:
    plan: dict[str, str]
    bytes: int  # true bytes of the plan (not rounded)
    predicted: float


def _unit(costs: dict[str, dict[str, int]], capacity: int, max_buckets: int) -> int:
    g = 0
    for options in costs.values():
        for nbytes in options.values():
            g = math.gcd(g, nbytes)
    g = max(g, 1)
    return g if capacity // g <= max_buckets else math.ceil(capacity / max_buckets)


def exact_front(costs: dict[str, dict[str, int]], sens: dict[str, dict[str, float]], capacity: int,
                max_buckets: int = MAX_BUCKETS, max_points: int | None = None) -> list[ExactPoint]:
    """Every plan on the optimal (bytes, predicted) staircase with bytes <= capacity, cheapest first;
    with `max_points`, at most that many, spread evenly over its bytes (the optimum at the capacity
    always among them; with 1, it alone)."""
    names = list(costs)
    options = {name: list(costs[name]) for name in names}
    if max(map(len, options.values()), default=0) > 127:
        raise ValueError("exact_front indexes a layer's formats in one signed byte: at most 127 formats a layer")
    # The DP counts only the bytes above each layer's cheapest format (exact: 0 units), so its
    # buckets resolve what the plans differ in, not the bytes every plan has.
    floor = {name: min(costs[name].values()) for name in names}
    true_costs, capacity = costs, capacity - sum(floor.values())
    if capacity < 0:
        return []
    costs = {name: {fmt: nbytes - floor[name] for fmt, nbytes in per.items()} for name, per in costs.items()}
    q = _unit(costs, capacity, max_buckets)
    units_of = [np.array([math.ceil(costs[name][fmt] / q) for fmt in options[name]]) for name in names]
    width = capacity // q + 1
    best = np.full(width, np.inf)
    best[0] = 0.0  # best[b]: least predicted loss of the layers so far, at exactly b units
    # a layer's choice at every width, one byte each (a layer has a few formats): 12 480 layers x
    # 20 000 buckets hold 250 MB of them
    choices = np.full((len(names), width), -1, dtype=np.int8)
    for i, name in enumerate(names):
        nxt = np.full(width, np.inf)
        for j, fmt in enumerate(options[name]):
            units = int(units_of[i][j])
            if units >= width:
                continue
            cand = np.full(width, np.inf)
            cand[units:] = best[:width - units] + sens[name][fmt]
            better = cand < nxt
            nxt[better] = cand[better]
            choices[i, better] = j
        best = nxt
    # The staircase: the budgets at which the least loss drops. All its plans are traced back at
    # once, one layer at a time over every step (a model with thousands of layers has thousands of steps).
    before = np.concatenate([[np.inf], np.minimum.accumulate(best)[:-1]])  # least loss at fewer units
    steps = np.flatnonzero(best < before)
    picked = np.zeros((len(names), len(steps)), dtype=np.int8)
    left = steps.astype(np.int64)
    true_bytes = np.zeros(len(steps), dtype=np.int64)
    for i in range(len(names) - 1, -1, -1):
        picked[i] = choices[i, left]
        left -= units_of[i][picked[i]]
        true_bytes += np.array([true_costs[names[i]][fmt] for fmt in options[names[i]]], dtype=np.int64)[picked[i]]
    # With rounded costs a later plan can truly be smaller than an earlier one; drop what it dominates.
    order = np.lexsort((best[steps], true_bytes))
    loss = best[steps][order]
    kept = order[loss < np.concatenate([[np.inf], np.minimum.accumulate(loss)[:-1]])]
    if max_points is not None and len(kept) > max_points:
        low, high = true_bytes[kept[0]], true_bytes[kept[-1]]
        targets = [high] if max_points == 1 else np.linspace(low, high, max_points)
        kept = kept[np.unique(np.abs(true_bytes[kept][None, :] - np.asarray(targets)[:, None]).argmin(axis=1))]
    return [ExactPoint({name: options[name][j] for name, j in zip(names, picked[:, s].tolist())}, int(true_bytes[s]),
                       float(best[steps[s]])) for s in kept]
