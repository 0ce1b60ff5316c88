"""Measured refinement at the budget: what the additive model cannot see, measured.

The search ranks plans by predicted loss, the sum of per-layer sensitivities. Layers interact,
so the plan with the least predicted loss is not always the one with the least real loss. Here the
exact optimum of the additive model and the next-best feasible plans the study found are each
measured for real (the whole config's divergence on calibration data, as the sensitivities were
measured) and the best measured one wins. Held-out data stays unseen: it judges the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mpq.search import Candidate

REFINE_CANDIDATES = 8


@dataclass
class Refinement:
    exact: dict  # the exact DP optimum at the budget: predicted, measured, and whether it meets the latency cap
    optuna: dict  # the least-predicted feasible plan the study holds (DP seeds included): predicted, measured
    best: Candidate  # the least measured feasible plan of those measured here
    best_measured: float
    rows: list[dict] = field(default_factory=list)  # every plan measured: origin, bytes, predicted, measured

    @property
    def gain(self) -> float:
        """Measured loss removed against the study's least-predicted plan (a fraction of it)."""
        return 0.0 if self.optuna["measured"] <= 0 else 1 - self.best_measured / self.optuna["measured"]

    def to_json(self) -> dict:
        return {"exact": self.exact, "optuna": self.optuna, "best": {"bytes": self.best.bytes,
                "predicted": self.best.predicted, "measured": self.best_measured, "origin": self.best.origin},
                "gain": self.gain, "rows": self.rows}


def refine_at_budget(exact: Candidate, exact_fits: bool, feasible: list[Candidate],
                     measure: Callable[[dict[str, str]], float], count: int = REFINE_CANDIDATES) -> Refinement:
    """Measure the exact optimum and the `count` least-predicted plans of `feasible` (those within
    every constraint, least predicted first); return the best measured feasible one. `measure` maps
    a plan to its real loss."""
    measured: dict[tuple, float] = {}

    def score(cand: Candidate) -> float:
        key = tuple(sorted(cand.formats.items()))
        if key not in measured:
            measured[key] = measure(cand.formats)
        return measured[key]

    rows = []
    exact_score = score(exact)
    rows.append({"origin": "exact", "bytes": exact.bytes, "predicted": exact.predicted, "measured": exact_score})
    pool = feasible[:count]
    for cand in pool:
        rows.append({"origin": cand.origin, "bytes": cand.bytes, "predicted": cand.predicted, "measured": score(cand)})
    if exact_fits:
        pool = [exact, *pool]
    best = min(pool, key=score)
    first = feasible[0] if feasible else exact
    return Refinement(exact={"predicted": exact.predicted, "measured": exact_score, "fits": exact_fits},
                      optuna={"predicted": first.predicted, "measured": score(first)},
                      best=Candidate(best.formats, best.bytes, best.predicted, _origin(best, exact, first), latency=best.latency),
                      best_measured=score(best), rows=rows)


def _origin(best: Candidate, exact: Candidate, first: Candidate) -> str:
    """"exact" or the least-predicted plan's origin where refinement kept what the prediction chose."""
    if best.formats == exact.formats:
        return "exact"
    return first.origin if best.formats == first.formats else "refined"
