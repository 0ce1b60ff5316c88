"""The exact optimum of the additive model: dynamic programming over a discretised byte budget.

Minimise sum_l sens[l][f_l] subject to sum_l bytes[l][f_l] <= capacity. Bytes are counted in
units of q: the gcd of all costs when that keeps the table small (then the answer is exact), else
capacity / max_buckets with every cost rounded up (then every plan returned still fits its
budget, and the optimum is exact for the rounded costs). One pass gives the optimum at every
budget up to the capacity: the whole (bytes, predicted) Pareto front, in O(layers x formats x buckets).
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
                max_buckets: int = MAX_BUCKETS) -> list[ExactPoint]:
    """Every plan on the optimal (bytes, predicted) staircase with bytes <= capacity, cheapest first."""
    if capacity < 0:
        return []
    names = list(costs)
    options = {name: list(costs[name]) for name in names}
    q = _unit(costs, capacity, max_buckets)
    width = capacity // q + 1
    best = np.full(width, np.inf)
    best[0] = 0.0  # best[b]: least predicted loss of the layers so far, at exactly b units
    choices = np.full((len(names), width), -1, dtype=np.int16)
    for i, name in enumerate(names):
        nxt = np.full(width, np.inf)
        for j, fmt in enumerate(options[name]):
            units = math.ceil(costs[name][fmt] / q)
            if units >= width:
                continue
            cand = np.full(width, np.inf)
            cand[units:] = best[:width - units] + sens[name][fmt]
            better = cand < nxt
            nxt[better] = cand[better]
            choices[i, better] = j
        best = nxt
    front: list[ExactPoint] = []
    running = np.inf
    for b in range(width):
        if best[b] < running:
            running = best[b]
            plan, left = {}, b
            for i in range(len(names) - 1, -1, -1):
                fmt = options[names[i]][choices[i, left]]
                plan[names[i]] = fmt
                left -= math.ceil(costs[names[i]][fmt] / q)
            plan = {name: plan[name] for name in names}
            front.append(ExactPoint(plan, sum(costs[n][f] for n, f in plan.items()), float(best[b])))
    # With rounded costs a later plan can truly be smaller than an earlier one; drop what it dominates.
    front.sort(key=lambda p: (p.bytes, p.predicted))
    kept: list[ExactPoint] = []
    for point in front:
        if not kept or point.predicted < kept[-1].predicted:
            kept.append(point)
    return kept
