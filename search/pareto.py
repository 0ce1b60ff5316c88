"""Multi-objective search over per-layer formats: minimise bytes, predicted degradation and,
given a latency model, predicted step time.

Predicted degradation is additive: the sum over layers of the sensitivity of the format each
layer takes; so is predicted latency over units (mpq.latency). Bytes are exact; the memory
budget and a latency cap are hard constraints (NSGA-II's constrained domination via
`trial.set_constraint`, so infeasible trials never enter the front). Layers may be tied into units that take
one format together (q/k/v, gate/up: so the kernels can fuse them). The study is seeded with the
uniform configs and with plans from the exact optimum of the additive model (search/exact.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mpq.search.exact import exact_front

log = logging.getLogger(__name__)
SEEDS_FROM_EXACT = 24


@dataclass
class Candidate:
    formats: dict[str, str]  # layer -> format name
    bytes: int
    predicted: float
    origin: str  # "uniform:int8", "exact" (DP seed), "optuna" (found by the sampler)
    measured: dict = field(default_factory=dict)
    latency: float | None = None  # predicted seconds per step, when the search had a latency model


@dataclass
class SearchResult:
    front: list[Candidate]  # feasible, non-dominated in (bytes, predicted[, latency]), by bytes
    trials: int
    seconds: float
    exact_best: float | None = None  # least predicted loss within the budget (exact DP, bytes only)
    sampler_best: float | None = None  # least predicted loss among the trials NSGA-II proposed itself
    exact_plan: dict[str, str] | None = None  # the plan of exact_best (layer -> format)
    sampler_plan: dict[str, str] | None = None  # the plan of sampler_best
    feasible: list[Candidate] = field(default_factory=list)  # every distinct feasible plan seen, by predicted loss


def pareto_front(candidates: list[Candidate], loss=lambda c: c.predicted) -> list[Candidate]:
    """Candidates that no other is at least as good as on both bytes and loss (and better on one)."""
    ordered = sorted(candidates, key=lambda c: (c.bytes, loss(c)))
    front: list[Candidate] = []
    best = float("inf")
    for cand in ordered:
        if loss(cand) < best:
            front.append(cand)
            best = loss(cand)
    return front


def pareto_front_3d(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates that none other dominates on (bytes, predicted, latency), by bytes."""
    def dominates(a: Candidate, b: Candidate) -> bool:
        pa, pb = (a.bytes, a.predicted, a.latency), (b.bytes, b.predicted, b.latency)
        return all(x <= y for x, y in zip(pa, pb)) and pa != pb

    ordered = sorted(candidates, key=lambda c: (c.bytes, c.predicted, c.latency))
    front: list[Candidate] = []
    for cand in ordered:  # nothing later in this order can dominate an earlier one
        if not any(dominates(kept, cand) for kept in front):
            front.append(cand)
    return front


def spread(front: list[Candidate], count: int) -> list[Candidate]:
    """Up to `count` candidates spread evenly over the front's byte range, ends included."""
    if len(front) <= count:
        return list(front)
    if count <= 1:
        return front[-1:] if count == 1 else []
    low, high = front[0].bytes, front[-1].bytes
    chosen: list[Candidate] = []
    for i in range(count):
        target = low + (high - low) * i / (count - 1)
        rest = [c for c in front if c not in chosen]
        chosen.append(min(rest, key=lambda c: abs(c.bytes - target)))
    return sorted(chosen, key=lambda c: c.bytes)


def uniform_plan(costs: dict[str, dict[str, int]], fmt: str) -> dict[str, str]:
    """Every layer in `fmt`; a layer that cannot take it keeps its largest format."""
    return {layer: fmt if fmt in options else max(options, key=options.get) for layer, options in costs.items()}


def evaluate_plan(plan: dict[str, str], costs, sens, fixed_bytes: int) -> tuple[int, float]:
    return (fixed_bytes + sum(costs[layer][fmt] for layer, fmt in plan.items()),
            sum(sens[layer][fmt] for layer, fmt in plan.items()))


def open_storage(spec: str | None):
    """An Optuna storage from a CLI string: None or "memory" keeps the study in memory; a URL with
    "://" (sqlite:///x.db, postgresql://...) is an RDBStorage, which several machines can share;
    anything else is a path to an Optuna journal file, the default in OUT: 300 trials of the
    demo's search took 4.4 s there against 24 s in SQLite and 0.5 s in memory (2-core CPU)."""
    import optuna

    if spec is None or spec == "memory":
        return None
    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(spec)))


def tie(costs: dict[str, dict[str, int]], sens: dict[str, dict[str, float]], groups: list[list[str]]
        ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]], dict[str, list[str]]]:
    """Merge each group of layers into one unit that takes one format (the formats all members
    allow), with the members' bytes and sensitivities summed. Returns unit costs, sens, members."""
    grouped = {name for group in groups for name in group}
    members = {group[0]: list(group) for group in groups}
    members.update({name: [name] for name in costs if name not in grouped})
    unit_costs, unit_sens = {}, {}
    for unit, names in members.items():
        shared = [f for f in costs[names[0]] if all(f in costs[n] for n in names)]
        unit_costs[unit] = {f: sum(costs[n][f] for n in names) for f in shared}
        unit_sens[unit] = {f: sum(sens[n][f] for n in names) for f in shared}
    return unit_costs, unit_sens, members


def expand(unit_plan: dict[str, str], members: dict[str, list[str]]) -> dict[str, str]:
    return {name: fmt for unit, fmt in unit_plan.items() for name in members[unit]}


def unit_latency(latency, members: dict[str, list[str]], unit_costs: dict[str, dict[str, int]]
                 ) -> dict[str, dict[str, float]]:
    """Seconds of each unit in each of its formats: its layers run fused where the kernels fuse them."""
    return {unit: {fmt: latency.layers_seconds({name: fmt for name in members[unit]}) for fmt in unit_costs[unit]}
            for unit in unit_costs}


def _latency_weights(unit_sens, unit_lat) -> list[float]:
    """Prices of a second in units of predicted loss, so that DP seeds trade loss for speed at a
    few rates: the ratio of the plan space's loss range to its latency range, times 1/4, 1, 4."""
    loss_range = sum(max(v.values()) - min(v.values()) for v in unit_sens.values())
    time_range = sum(max(v.values()) - min(v.values()) for v in unit_lat.values())
    if time_range <= 0 or loss_range <= 0:
        return []
    return [w * loss_range / time_range for w in (0.25, 1.0, 4.0)]


def search_plans(costs: dict[str, dict[str, int]], sens: dict[str, dict[str, float]], fixed_bytes: int,
                 budget: int, trials: int, seed: int, uniform: list[str], tied: list[list[str]] = (),
                 storage: object | None = None, study_name: str = "mpq", latency=None,
                 max_latency: float | None = None) -> SearchResult:
    """Run the Optuna study (NSGA-II, budget as a hard constraint) over units of tied layers, warm-
    started from the uniform configs and from the exact optimum of the additive model along the
    budget; return the feasible Pareto front over everything seen.

    With `latency` (an mpq.latency.LatencyModel, or anything with layers_seconds(plan) and
    rest_seconds) predicted step time is a third objective, and `max_latency` (seconds) a second
    hard constraint; DP seeds then also come from loss + price x latency at a few prices.
    With `storage` (see open_storage) the study persists: a run that was stopped resumes, running
    only the trials still missing, and optuna-dashboard can open it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.time()
    unit_costs, unit_sens, members = tie(costs, sens, list(tied))
    units = list(unit_costs)
    options = {unit: sorted(unit_costs[unit], key=unit_costs[unit].get) for unit in units}
    for unit, opts in options.items():
        if not opts:
            raise ValueError(f"the layers tied with {unit} share no format: {members[unit]}")
    unit_lat = unit_latency(latency, members, unit_costs) if latency is not None else None

    def step_seconds(plan: dict[str, str]) -> float:
        return latency.rest_seconds + sum(unit_lat[unit][fmt] for unit, fmt in plan.items())

    def objective(trial) -> tuple[float, ...]:
        plan = {unit: trial.suggest_categorical(unit, options[unit]) for unit in units}
        nbytes, predicted = evaluate_plan(plan, unit_costs, unit_sens, fixed_bytes)
        trial.set_user_attr("bytes", nbytes)
        trial.set_constraint("memory", nbytes - budget)  # feasible when every constraint is <= 0
        if unit_lat is None:
            return float(nbytes), predicted
        seconds = step_seconds(plan)
        trial.set_user_attr("latency", seconds)
        trial.set_constraint("latency", seconds - max_latency if max_latency is not None else -1.0)
        return float(nbytes), predicted, seconds

    exact = exact_front(unit_costs, unit_sens, budget - fixed_bytes)
    key = lambda plan: tuple(plan[unit] for unit in units)  # noqa: E731
    origin: dict[tuple, str] = {}
    seeds: list[dict[str, str]] = []
    for fmt in uniform:
        plan = uniform_plan(unit_costs, fmt)
        origin.setdefault(key(plan), f"uniform:{fmt}")
        seeds.append(plan)
    exact_candidates = [Candidate(p.plan, fixed_bytes + p.bytes, p.predicted, "exact") for p in exact]
    for cand in spread(exact_candidates, SEEDS_FROM_EXACT):
        origin.setdefault(key(cand.formats), "exact")
        seeds.append(cand.formats)
    if unit_lat is not None:
        for price in _latency_weights(unit_sens, unit_lat):
            priced = {u: {f: unit_sens[u][f] + price * unit_lat[u][f] for f in unit_costs[u]} for u in units}
            points = exact_front(unit_costs, priced, budget - fixed_bytes)
            for cand in spread([Candidate(p.plan, p.bytes, p.predicted, "exact") for p in points], SEEDS_FROM_EXACT // 3):
                origin.setdefault(key(cand.formats), "exact-latency")
                seeds.append(cand.formats)
    sampler = optuna.samplers.NSGAIISampler(seed=seed)
    directions = ["minimize"] * (2 if unit_lat is None else 3)
    study = optuna.create_study(directions=directions, sampler=sampler, storage=storage,
                                study_name=study_name, load_if_exists=storage is not None)
    for plan in seeds:
        study.enqueue_trial(plan, skip_if_exists=True)
    # A trial left RUNNING by a killed process stays so (harmless): only completed ones count as done.
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    remaining = max(trials, len(seeds)) - done
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, show_progress_bar=False)

    def fits(plan: dict[str, str]) -> bool:
        return max_latency is None or unit_lat is None or step_seconds(plan) <= max_latency

    unique: dict[tuple, Candidate] = {key(c.formats): c for c in exact_candidates if fits(c.formats)}
    sampler_best, sampler_plan = float("inf"), None
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        nbytes = trial.user_attrs["bytes"]
        if nbytes > budget or not fits(trial.params):
            continue
        k = key(trial.params)
        if k not in origin and trial.values[1] < sampler_best:  # proposed by the sampler itself, not enqueued
            sampler_best, sampler_plan = trial.values[1], expand(dict(trial.params), members)
        if k not in unique or k in origin and origin[k].startswith("uniform"):
            unique[k] = Candidate(dict(trial.params), nbytes, trial.values[1], origin.get(k, "optuna"))
    if unit_lat is None:
        kept = pareto_front(list(unique.values()))
    else:
        for cand in unique.values():
            cand.latency = step_seconds(cand.formats)
        kept = pareto_front_3d(list(unique.values()))
    front = [Candidate(expand(c.formats, members), c.bytes, c.predicted, c.origin, latency=c.latency) for c in kept]
    if latency is not None:  # the exact prediction of the expanded plan (fused as emitted)
        for cand in front:
            cand.latency = latency.rest_seconds + latency.layers_seconds(cand.formats)
    return SearchResult(front=front, trials=len(study.trials), seconds=round(time.time() - start, 2),
                        exact_best=exact[-1].predicted if exact else None,
                        sampler_best=sampler_best if sampler_best < float("inf") else None,
                        exact_plan=expand(exact[-1].plan, members) if exact else None, sampler_plan=sampler_plan,
                        feasible=[Candidate(expand(c.formats, members), c.bytes, c.predicted, c.origin, latency=c.latency)
                                  for c in sorted(unique.values(), key=lambda c: c.predicted)])
