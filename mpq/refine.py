"""Measured refinement at the budget: what the additive model cannot see, measured.

The search ranks plans by predicted loss, the sum of per-layer sensitivities. Layers interact,
so the plan with the least predicted loss is not always the one with the least real loss. Here a
second Optuna study (search/measured.py) spends its trials on real measurements (the whole
config's divergence on calibration data, as the sensitivities were measured): first the exact
optimum of the additive model and the next-best feasible plans the first study found, then plans
next to the best measured so far. The least measured feasible plan wins. Held-out data stays
unseen: it judges the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the search (optuna) loads when a refinement runs: the CLI reads REFINE_TRIALS without it
    from mpq.search import Candidate

REFINE_TRIALS = 24  # measured trials at the budget (about 0.5 s each on the demo, 2-core CPU)
REFINE_SEEDS = 8  # of which the least-predicted feasible plans enqueued after the exact optimum


@dataclass
class Refinement:
    exact: dict  # the exact DP optimum at the budget: predicted, measured, and whether it meets the latency cap
    optuna: dict  # the least-predicted feasible plan the first study holds (DP seeds included): predicted, measured
    best: Candidate  # the least measured feasible plan
    best_measured: float
    rows: list[dict] = field(default_factory=list)  # every trial measured: origin, bytes, predicted, measured, feasible
    timing_met: bool = True  # False: no trial met the latency cap as timed; `best` meets it by prediction

    @property
    def gain(self) -> float:
        """Measured loss removed against the first study's least-predicted plan (a fraction of it)."""
        return 0.0 if self.optuna["measured"] <= 0 else 1 - self.best_measured / self.optuna["measured"]

    def to_json(self) -> dict:
        return {"exact": self.exact, "optuna": self.optuna, "best": {"bytes": self.best.bytes,
                "predicted": self.best.predicted, "measured": self.best_measured, "origin": self.best.origin},
                "gain": self.gain, "timing_met": self.timing_met, "rows": self.rows}


def refine_at_budget(exact: Candidate, feasible: list[Candidate],
                     measure: Callable[[dict[str, str]], float], costs: dict[str, dict[str, int]],
                     sens: dict[str, dict[str, float]], fixed_bytes: int, budget: int,
                     tied: list[list[str]] = (), trials: int = REFINE_TRIALS, seeds: int = REFINE_SEEDS, seed: int = 0,
                     storage: object | None = None, study_name: str = "mpq-measured",
                     fits: Callable[[dict[str, str]], bool] = lambda plan: True,
                     time_step: Callable[[dict[str, str]], float] | None = None,
                     max_latency: float | None = None) -> Refinement:
    """Run the measured study at `budget`, seeded with `exact` (the DP optimum of the additive
    model at the budget, measured even when `fits` rejects it, so the report can say what it
    would have given) and the `seeds` least-predicted plans of `feasible` (those within every
    constraint, least predicted first). `measure` maps a plan to its real loss; `fits` says whether
    a plan meets the constraints besides bytes by prediction (a latency cap); with `time_step` (a
    plan -> measured seconds per step) every trial is also timed and held to `max_latency`."""
    from mpq.search import Candidate
    from mpq.search.measured import measured_search, plan_key

    found = measured_search(costs, sens, fixed_bytes, budget, measure, [exact, *feasible[:seeds]], max(trials, 1), seed,
                            tied, storage, study_name, fits, time_step, max_latency)
    first = feasible[0] if feasible else exact
    first_measured = found.measured.get(plan_key(first.formats))
    if first_measured is None:  # fewer trials than seeds
        first_measured = measure(first.formats)
    best = found.best
    origin = "exact" if best.formats == exact.formats else first.origin if best.formats == first.formats else best.origin
    return Refinement(exact={"predicted": exact.predicted, "measured": found.measured[plan_key(exact.formats)],
                             "fits": plan_key(exact.formats) in found.feasible},
                      optuna={"predicted": first.predicted, "measured": first_measured},
                      best=Candidate(best.formats, best.bytes, best.predicted, origin, latency=best.latency),
                      best_measured=found.best_measured, rows=found.rows, timing_met=found.timing_met)
