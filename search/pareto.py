"""Multi-objective search over per-layer formats: minimise bytes, predicted degradation and,
given a latency model, predicted step time.

Predicted degradation is additive: the sum over layers of the sensitivity of the format each
layer takes. Predicted latency is the latency model's prediction of the whole plan (mpq.latency:
layers of a group that agree run fused; a mixture's projection pays one launch per format), which
the units' sum approximates only for the DP's latency-priced seeds. Bytes are exact; the memory
budget and a latency cap are hard constraints (NSGA-II's constrained domination via
`trial.set_constraint`, so infeasible trials never enter the front). Layers may be tied into units that take
one format together (q/k/v, gate/up: so the kernels can fuse them). The study is seeded with the
uniform configs and with plans from the exact optimum of the additive model (search/exact.py).

A mixture of experts has thousands of layers (Qwen3-30B-A3B: 48 blocks x 128 experts x 2), and
Optuna's cost grows with the parameters of a trial (benchmarks/search_scale.py: 300 trials of a
Qwen1.5-MoE-shaped search took 177 s with a variable per expert, 28 s with one per projection, in
memory on 2 cores), while NSGA-II learns little in 12 000 dimensions from a few hundred trials. So
units listed in `sampled_together` (each mixture's projection, over its experts) are one variable
of the sampler; the exact DP, whose plans enter the front directly, still sets each expert on its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from mpq.search.exact import exact_front

log = logging.getLogger(__name__)
SEEDS_FROM_EXACT = 24
EXACT_POINTS = 1000  # of the DP's staircase on the front (a mixture's has thousands: a step is one layer's format)


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
    variables: int = 0  # parameters of each Optuna trial: units, less those grouped (sampled_together)


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
    ordered = sorted(candidates, key=lambda c: (c.bytes, c.predicted, c.latency))
    points = np.array([(c.bytes, c.predicted, c.latency) for c in ordered], dtype=np.float64).reshape(-1, 3)
    kept: list[int] = []
    for i, point in enumerate(points):  # nothing later in this order can dominate an earlier one
        front = points[kept]
        if not np.any(np.all(front <= point, axis=1) & np.any(front != point, axis=1)):
            kept.append(i)
    return [ordered[i] for i in kept]


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


def sampler_groups(members: dict[str, list[str]], together: list[list[str]]) -> list[list[str]]:
    """`together` (groups of layers) as groups of units: a unit joins the first group holding one of
    its layers; a group of fewer than two units is no group."""
    unit_of = {name: unit for unit, names in members.items() for name in names}
    taken: set[str] = set()
    groups = []
    for layers in together:
        units = [u for u in dict.fromkeys(unit_of[n] for n in layers if n in unit_of) if u not in taken]
        if len(units) > 1:
            groups.append(units)
            taken.update(units)
    return groups


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
                 max_latency: float | None = None, sampled_together: list[list[str]] = ()) -> SearchResult:
    """Run the Optuna study (NSGA-II, budget as a hard constraint) over units of tied layers, warm-
    started from the uniform configs and from the exact optimum of the additive model along the
    budget; return the feasible Pareto front over everything seen.

    With `latency` (an mpq.latency.LatencyModel, or anything with layers_seconds(plan) and
    rest_seconds) predicted step time is a third objective, and `max_latency` (seconds) a second
    hard constraint; DP seeds then also come from loss + price x latency at a few prices.
    With `storage` (see open_storage) the study persists: a run that was stopped resumes, running
    only the trials still missing, and optuna-dashboard can open it. Layers in one group of
    `sampled_together` are one variable of the sampler (see the module's docstring); the DP's plans
    still choose per unit."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.time()
    unit_costs, unit_sens, members = tie(costs, sens, list(tied))
    units = list(unit_costs)
    for unit in units:
        if not unit_costs[unit]:
            raise ValueError(f"the layers tied with {unit} share no format: {members[unit]}")
    unit_lat = unit_latency(latency, members, unit_costs) if latency is not None else None
    # The sampler's variables: units, or groups of units that move together. A variable's plan
    # expands to a unit plan through `grouped`.
    var_costs, var_sens, grouped = tie(unit_costs, unit_sens, sampler_groups(members, list(sampled_together)))
    variables = list(var_costs)
    options = {var: sorted(var_costs[var], key=var_costs[var].get) for var in variables}
    var_lat = None if unit_lat is None else {
        var: {f: sum(unit_lat[u][f] for u in grouped[var]) for f in var_costs[var]} for var in variables}
    room = budget - fixed_bytes

    key = lambda plan: tuple(plan[unit] for unit in units)  # noqa: E731  (a unit plan's key)
    seconds_of: dict[tuple, float] = {}

    def step_seconds(unit_plan: dict[str, str]) -> float:
        """The latency model's prediction of the plan's layers, not the units' sum: a fused group
        split across units, or a mixture's projection in two formats (one more launch), is priced
        as the emitted model runs it. Only the DP's priced seeds see the sum (a DP cannot price a
        launch that units share)."""
        k = key(unit_plan)
        if k not in seconds_of:
            seconds_of[k] = latency.rest_seconds + latency.layers_seconds(expand(unit_plan, members))
        return seconds_of[k]

    def objective(trial) -> tuple[float, ...]:
        plan = {var: trial.suggest_categorical(var, options[var]) for var in variables}
        nbytes, predicted = evaluate_plan(plan, var_costs, var_sens, fixed_bytes)
        trial.set_user_attr("bytes", nbytes)
        trial.set_constraint("memory", nbytes - budget)  # feasible when every constraint is <= 0
        if var_lat is None:
            return float(nbytes), predicted
        seconds = step_seconds(expand(plan, grouped))
        trial.set_user_attr("latency", seconds)
        trial.set_constraint("latency", seconds - max_latency if max_latency is not None else -1.0)
        return float(nbytes), predicted, seconds

    def fits(plan: dict[str, str]) -> bool:
        return max_latency is None or unit_lat is None or step_seconds(plan) <= max_latency

    def exact_plans(c: dict[str, dict[str, int]], s: dict[str, dict[str, float]], count: int) -> list[dict[str, str]]:
        """`count` plans spread along the exact front of loss `s` (bytes are the spread's axis)."""
        return [point.plan for point in exact_front(c, s, room, max_points=count)]

    def priced(s: dict[str, dict[str, float]], seconds: dict[str, dict[str, float]], price: float):
        return {name: {f: s[name][f] + price * seconds[name][f] for f in s[name]} for name in s}

    exact = exact_front(unit_costs, unit_sens, room, max_points=EXACT_POINTS)
    prices = _latency_weights(unit_sens, unit_lat) if unit_lat is not None else []
    # Plans of the exact DP over units enter the front as they are; the study gets them as seeds
    # where its variables are the units, else the DP's plans over its own variables.
    direct = [Candidate(p.plan, fixed_bytes + p.bytes, p.predicted, "exact") for p in exact]
    for price in prices:
        for plan in exact_plans(unit_costs, priced(unit_sens, unit_lat, price), SEEDS_FROM_EXACT // 3):
            direct.append(Candidate(plan, *evaluate_plan(plan, unit_costs, unit_sens, fixed_bytes), "exact-latency"))
    origin: dict[tuple, str] = {}
    seeds: list[dict[str, str]] = []

    def add_seed(plan: dict[str, str], label: str) -> None:
        origin.setdefault(key(expand(plan, grouped)), label)
        seeds.append(plan)

    for fmt in uniform:
        add_seed(uniform_plan(var_costs, fmt), f"uniform:{fmt}")
    if len(variables) == len(units):
        for cand in spread(direct[:len(exact)], SEEDS_FROM_EXACT):
            add_seed(cand.formats, "exact")
        for cand in direct[len(exact):]:
            add_seed(cand.formats, "exact-latency")
    else:
        for plan in exact_plans(var_costs, var_sens, SEEDS_FROM_EXACT):
            add_seed(plan, "exact-grouped")
        for price in prices:
            for plan in exact_plans(var_costs, priced(var_sens, var_lat, price), SEEDS_FROM_EXACT // 3):
                add_seed(plan, "exact-grouped-latency")
    sampler = optuna.samplers.NSGAIISampler(seed=seed)
    directions = ["minimize"] * (2 if var_lat is None else 3)
    study = optuna.create_study(directions=directions, sampler=sampler, storage=storage,
                                study_name=study_name, load_if_exists=storage is not None)
    for plan in seeds:
        study.enqueue_trial(plan, skip_if_exists=True)
    # A trial left RUNNING by a killed process stays so (harmless): only completed ones count as done.
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    remaining = max(trials, len(seeds)) - done
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, show_progress_bar=False)

    unique: dict[tuple, Candidate] = {}
    for cand in direct:
        if fits(cand.formats):
            unique.setdefault(key(cand.formats), cand)
    sampler_best, sampler_plan = float("inf"), None
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        nbytes = trial.user_attrs["bytes"]
        plan = expand(dict(trial.params), grouped)
        if nbytes > budget or not fits(plan):
            continue
        k = key(plan)
        if k not in origin and trial.values[1] < sampler_best:  # proposed by the sampler itself, not enqueued
            sampler_best, sampler_plan = trial.values[1], expand(plan, members)
        if k not in unique or k in origin and origin[k].startswith("uniform"):
            unique[k] = Candidate(plan, nbytes, trial.values[1], origin.get(k, "optuna"))
    if unit_lat is None:
        kept = pareto_front(list(unique.values()))
    else:
        for cand in unique.values():
            cand.latency = step_seconds(cand.formats)
        kept = pareto_front_3d(list(unique.values()))
    front = [Candidate(expand(c.formats, members), c.bytes, c.predicted, c.origin, latency=c.latency) for c in kept]
    return SearchResult(front=front, trials=len(study.trials), seconds=round(time.time() - start, 2),
                        exact_best=exact[-1].predicted if exact else None,
                        sampler_best=sampler_best if sampler_best < float("inf") else None,
                        exact_plan=expand(exact[-1].plan, members) if exact else None, sampler_plan=sampler_plan,
                        feasible=[Candidate(expand(c.formats, members), c.bytes, c.predicted, c.origin, latency=c.latency)
                                  for c in sorted(unique.values(), key=lambda c: c.predicted)],
                        variables=len(variables))
