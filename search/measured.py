"""The measured study: Optuna trials spent on real quality at one budget.

The first study (search/pareto.py) ranks plans by the additive model: the sum of per-layer
sensitivities. Layers interact, so that ranking is not the real one. This second study measures
each trial for real (`measure(plan)`: the config's divergence on calibration data) and keeps the
least. It starts from the plans the additive model likes best (the exact DP optimum, then the
least-predicted feasible plans); its further trials come from `Neighbours`: one
or two units of the best measured plans so far change format, and the rest of the plan is
repaired to the budget along the additive model (bytes taken from, or given to, the units where
they cost or buy the most predicted loss per byte). So each measurement tests a move the additive
model thinks nearly neutral, which is where its errors decide.

The study lives in the same storage as the first one, so an interrupted compile resumes here
too. Proposals depend only on the completed trials (not on trial numbers), so a resumed study
proposes what an uninterrupted one would have, and ends the same. Each measured plan enters the
study whole, as one finished trial (`study.add_trial`): one storage write per trial, where a trial
that suggests its parameters one by one writes once per unit (a mixture's 3000 units: 24 trials
took two minutes in a journal file, most of the measured study).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import optuna

from mpq.search.pareto import Candidate, evaluate_plan, expand, tie

NEIGHBOUR_TRIES = 64  # proposals drawn per trial before it falls back to a random plan (then skipped)
TOURNAMENT = 8  # distinct new neighbours drawn per trial; the least predicted of them is measured


@dataclass
class MeasuredResult:
    best: Candidate  # least measured plan within every constraint (layer plan)
    best_measured: float
    rows: list[dict] = field(default_factory=list)  # every measured trial in order: origin, bytes, predicted, measured
    measured: dict[tuple, float] = field(default_factory=dict)  # sorted layer plan items -> measured loss
    feasible: set[tuple] = field(default_factory=set)  # the measured plans (as keys) within every constraint
    timing_met: bool = True  # False: no plan met the latency cap as timed, so `best` meets it by prediction only


def plan_key(plan: dict[str, str]) -> tuple:
    """A plan as a hashable, order-free key."""
    return tuple(sorted(plan.items()))


class Neighbours:
    """Proposes plans next to the best measured ones, at the budget."""

    def __init__(self, options: dict[str, list[str]], unit_costs: dict[str, dict[str, int]],
                 unit_sens: dict[str, dict[str, float]], room: int, fits: Callable[[dict[str, str]], bool], seed: int):
        self._options, self._costs, self._sens, self._room, self._fits = options, unit_costs, unit_sens, room, fits
        self._seed = seed

    def propose(self, done: list) -> tuple[dict[str, str], bool]:
        """The next plan to measure, given the finished trials, and whether it is a neighbour (else
        a random plan: no neighbour was left)."""
        # Seeded by how many trials finished, not by the trial's number: a trial killed mid-way
        # leaves a number behind, and the resumed study must still propose the same plans.
        rng = np.random.RandomState([self._seed, len(done)])
        complete = [t for t in done if t.state.name == "COMPLETE"]
        # next to the best feasible plans; while none is (each over a cap as timed), the best measured
        ranked = sorted([t for t in complete if t.user_attrs.get("feasible")] or complete,
                        key=lambda t: (t.value, plan_key(t.params)))
        seen = {plan_key(t.params) for t in done}
        pool: dict[tuple, dict[str, str]] = {}
        for _ in range(NEIGHBOUR_TRIES if ranked else 0):
            base = ranked[0] if len(ranked) == 1 or rng.rand() < 0.75 else ranked[rng.randint(1, min(4, len(ranked)))]
            plan = self.neighbour(dict(base.params), rng)
            if plan is not None and plan_key(plan) not in seen:
                pool[plan_key(plan)] = plan
                if len(pool) == TOURNAMENT:
                    break
        if not pool:
            return {unit: str(rng.choice(opts)) for unit, opts in self._options.items()}, False
        # Of a few random neighbours, the one the additive model likes best: a measurement is worth
        # most where the prediction says "about as good", since there its errors decide.
        return min(pool.values(), key=lambda plan: (self._predicted(plan), plan_key(plan))), True

    # -- the move
    def _predicted(self, plan: dict[str, str]) -> float:
        return sum(self._sens[u][f] for u, f in plan.items())

    def _bytes(self, plan: dict[str, str]) -> int:
        return sum(self._costs[u][f] for u, f in plan.items())

    def neighbour(self, plan: dict[str, str], rng: np.random.RandomState) -> dict[str, str] | None:
        """Change one or two units' formats, then repair the rest to the budget by the additive
        model: while over it, the cheapest predicted loss per byte freed; then, while bytes are
        left, the most predicted loss removed per byte spent. None when no fitting plan results."""
        movable = [u for u, opts in self._options.items() if len(opts) > 1]
        if not movable:
            return None
        changed = list(rng.choice(movable, size=min(len(movable), 1 + int(rng.rand() < 0.5)), replace=False))
        for unit in changed:
            plan[unit] = str(rng.choice([f for f in self._options[unit] if f != plan[unit]]))
        others = [u for u in plan if u not in changed]
        used = self._bytes(plan)
        while used > self._room:
            moves = [((self._sens[u][g] - self._sens[u][plan[u]]) / (self._costs[u][plan[u]] - self._costs[u][g]), u, g)
                     for u in others for g in self._options[u] if self._costs[u][g] < self._costs[u][plan[u]]]
            if not moves:
                return None
            _, unit, fmt = min(moves)
            used += self._costs[unit][fmt] - self._costs[unit][plan[unit]]
            plan[unit] = fmt
        while True:
            moves = [((self._sens[u][plan[u]] - self._sens[u][g]) / (self._costs[u][g] - self._costs[u][plan[u]]), u, g)
                     for u in others for g in self._options[u]
                     if self._costs[u][plan[u]] < self._costs[u][g] <= self._costs[u][plan[u]] + self._room - used
                     and self._sens[u][g] < self._sens[u][plan[u]]]
            if not moves:
                break
            _, unit, fmt = max(moves)
            used += self._costs[unit][fmt] - self._costs[unit][plan[unit]]
            plan[unit] = fmt
        return plan if self._fits(plan) else None


def measured_search(costs: dict[str, dict[str, int]], sens: dict[str, dict[str, float]], fixed_bytes: int, budget: int,
                    measure: Callable[[dict[str, str]], float], seeds: list[Candidate], trials: int, seed: int = 0,
                    tied: list[list[str]] = (), storage: object | None = None, study_name: str = "mpq-measured",
                    fits: Callable[[dict[str, str]], bool] = lambda plan: True,
                    time_step: Callable[[dict[str, str]], float] | None = None,
                    max_latency: float | None = None) -> MeasuredResult:
    """Spend `trials` measurements at `budget`: the `seeds` first (in order; those outside the
    budget or `fits` are measured, so they can be reported, but never chosen), then the sampler's
    neighbours. `measure` maps a layer plan to its real loss; `fits` says whether a layer plan
    meets the other constraints by prediction (a latency cap). With `time_step` (a layer plan ->
    its measured seconds per step) and `max_latency`, each trial's step is timed too and a plan
    whose measured step exceeds the cap is never chosen, whatever its prediction said. Layers in
    `tied` groups keep one format."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    unit_costs, unit_sens, members = tie(costs, sens, list(tied))
    units = list(unit_costs)
    options = {u: sorted(unit_costs[u], key=unit_costs[u].get) for u in units}
    room = budget - fixed_bytes

    def unit_plan(plan: dict[str, str]) -> dict[str, str] | None:
        """The plan per unit; None where tied layers disagree (not a plan this study can hold)."""
        if any(len({plan[n] for n in members[u]}) > 1 for u in units):
            return None
        return {u: plan[members[u][0]] for u in units}

    neighbours = Neighbours(options, unit_costs, unit_sens, room, lambda p: fits(expand(p, members)), seed)
    study = optuna.create_study(direction="minimize", storage=storage, study_name=study_name,
                                load_if_exists=storage is not None)
    distributions = {u: optuna.distributions.CategoricalDistribution(options[u]) for u in units}
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    queue: dict[tuple, tuple[dict[str, str], str]] = {}  # the seeds, in order
    for cand in seeds[:trials]:
        plan = unit_plan(cand.formats)
        if plan is not None:
            queue.setdefault(plan_key(plan), (plan, cand.origin))

    def record(plan: dict[str, str], origin: str, random: bool = False) -> None:
        """Measure a unit plan (a random one only when it fits) and add it to the study, finished."""
        layers = expand(plan, members)
        nbytes, predicted = evaluate_plan(layers, costs, sens, fixed_bytes)
        feasible = nbytes <= budget and fits(layers)
        attrs = {"origin": origin, "fits_predicted": feasible, "bytes": nbytes, "predicted": predicted}
        if random and not feasible:  # not worth a measurement
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params=plan,
                                                      distributions=distributions, user_attrs=attrs))
            return
        if time_step is not None and max_latency is not None:
            attrs["latency_s"] = time_step(layers)
            feasible = feasible and attrs["latency_s"] <= max_latency
        attrs["feasible"] = feasible
        value = measure(layers)
        study.add_trial(optuna.trial.create_trial(value=value, params=plan, distributions=distributions, user_attrs=attrs))

    while True:
        done = study.get_trials(deepcopy=False, states=finished)
        if len(done) >= trials:
            break
        measured = {plan_key(t.params) for t in done}
        pending = [seed_plan for key, seed_plan in queue.items() if key not in measured]
        if pending:  # a seed killed mid-measurement is measured again
            record(*pending[0])
        else:
            plan, is_neighbour = neighbours.propose(done)
            record(plan, "refined", random=not is_neighbour)

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    timing_met = any(t.user_attrs["feasible"] for t in done)
    # When timing rejects every plan (a cap the machine's steps never met as timed, or timing noise
    # around it), the answer is the best plan that meets it by prediction, and says so.
    chosen_by = "feasible" if timing_met else "fits_predicted"
    rows, measured, feasible, best = [], {}, set(), None
    for trial in done:
        layers = expand(dict(trial.params), members)
        attrs = trial.user_attrs
        rows.append({"origin": attrs["origin"], "bytes": attrs["bytes"], "predicted": attrs["predicted"],
                     "measured": trial.value, "feasible": attrs["feasible"],
                     **({"latency_s": attrs["latency_s"]} if "latency_s" in attrs else {})})
        measured[plan_key(layers)] = trial.value
        if attrs["feasible"]:
            feasible.add(plan_key(layers))
        if attrs[chosen_by] and (best is None or (trial.value, plan_key(layers)) < (best[1], plan_key(best[0].formats))):
            best = (Candidate(layers, attrs["bytes"], attrs["predicted"], attrs["origin"]), trial.value)
    if best is None:
        raise ValueError("the measured study found no plan within the constraints: give it a feasible seed")
    return MeasuredResult(best=best[0], best_measured=best[1], rows=rows, measured=measured, feasible=feasible,
                          timing_met=timing_met)
