"""Multi-objective search over per-layer formats: minimise bytes and predicted degradation.

Predicted degradation is additive: the sum over layers of the sensitivity of the format each
layer takes. Bytes are exact and the budget is a hard constraint (NSGA-II's constrained
domination, so infeasible trials never enter the front). The study is seeded with the uniform
configs and with points along a greedy path (cheapest first, then the upgrade with the best
degradation saved per byte), which NSGA-II then improves on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
GREEDY_SEEDS = 24


@dataclass
class Candidate:
    formats: dict[str, str]  # layer -> format name
    bytes: int
    predicted: float
    origin: str  # "uniform:int8", "greedy", "optuna"
    measured: dict = field(default_factory=dict)


@dataclass
class SearchResult:
    front: list[Candidate]  # feasible, non-dominated in (bytes, predicted), by bytes
    trials: int
    seconds: float


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


def spread(front: list[Candidate], count: int) -> list[Candidate]:
    """Up to `count` candidates spread evenly over the front's byte range, ends included."""
    if len(front) <= count:
        return list(front)
    low, high = front[0].bytes, front[-1].bytes
    chosen: list[Candidate] = []
    for i in range(count):
        target = low + (high - low) * i / (count - 1)
        rest = [c for c in front if c not in chosen]
        chosen.append(min(rest, key=lambda c: abs(c.bytes - target)))
    return sorted(chosen, key=lambda c: c.bytes)


def greedy_path(costs: dict[str, dict[str, int]], sens: dict[str, dict[str, float]]) -> list[dict[str, str]]:
    """Plans from the cheapest (every layer in its smallest format) upwards, one upgrade at a time,
    always taking the upgrade that removes the most predicted degradation per extra byte."""
    plan = {layer: min(options, key=options.get) for layer, options in costs.items()}
    path = [dict(plan)]
    while True:
        best, best_ratio = None, 0.0
        for layer, current in plan.items():
            for fmt, nbytes in costs[layer].items():
                extra = nbytes - costs[layer][current]
                gain = sens[layer][current] - sens[layer][fmt]
                if extra > 0 and gain > 0 and gain / extra > best_ratio:
                    best, best_ratio = (layer, fmt), gain / extra
        if best is None:
            return path
        plan[best[0]] = best[1]
        path.append(dict(plan))


def uniform_plan(costs: dict[str, dict[str, int]], fmt: str) -> dict[str, str]:
    """Every layer in `fmt`; a layer that cannot take it keeps its largest format."""
    return {layer: fmt if fmt in options else max(options, key=options.get) for layer, options in costs.items()}


def evaluate_plan(plan: dict[str, str], costs, sens, fixed_bytes: int) -> tuple[int, float]:
    return (fixed_bytes + sum(costs[layer][fmt] for layer, fmt in plan.items()),
            sum(sens[layer][fmt] for layer, fmt in plan.items()))


def search_plans(costs: dict[str, dict[str, int]], sens: dict[str, dict[str, float]], fixed_bytes: int,
                 budget: int, trials: int, seed: int, uniform: list[str]) -> SearchResult:
    """Run the Optuna study and return its feasible (bytes, predicted) Pareto front."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.time()
    layers = list(costs)
    options = {layer: sorted(costs[layer], key=costs[layer].get) for layer in layers}

    def objective(trial) -> tuple[float, float]:
        plan = {layer: trial.suggest_categorical(layer, options[layer]) for layer in layers}
        nbytes, predicted = evaluate_plan(plan, costs, sens, fixed_bytes)
        trial.set_user_attr("bytes", nbytes)
        trial.set_constraint("memory", nbytes - budget)  # feasible when <= 0
        return float(nbytes), predicted

    sampler = optuna.samplers.NSGAIISampler(seed=seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    seeds = [uniform_plan(costs, fmt) for fmt in uniform]
    path = greedy_path(costs, sens)
    step = max(1, len(path) // GREEDY_SEEDS)
    seeds += path[::step] + [path[-1]]
    origin: dict[tuple, str] = {}
    for fmt, plan in zip(uniform, seeds):
        origin[tuple(plan[layer] for layer in layers)] = f"uniform:{fmt}"
    for plan in seeds:
        study.enqueue_trial(plan, skip_if_exists=True)
        origin.setdefault(tuple(plan[layer] for layer in layers), "greedy")
    study.optimize(objective, n_trials=max(trials, len(seeds)), show_progress_bar=False)

    unique: dict[tuple, Candidate] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        nbytes = trial.user_attrs["bytes"]
        if nbytes > budget:
            continue
        key = tuple(trial.params[layer] for layer in layers)
        if key not in unique:
            unique[key] = Candidate(formats=dict(trial.params), bytes=nbytes, predicted=trial.values[1],
                                    origin=origin.get(key, "optuna"))
    front = pareto_front(list(unique.values()))
    return SearchResult(front=front, trials=len(study.trials), seconds=round(time.time() - start, 2))
