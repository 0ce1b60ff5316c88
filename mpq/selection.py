"""Which configs a compile measures and emits, and the latency numbers its report gives.

Plain functions over search Candidates: the configs to measure spread over the (bytes, predicted)
and (latency, predicted) fronts, the emitted fronts over measured quality, the latency cap from
the user's limits, and the per-config and summary latency fields.
"""

from __future__ import annotations

import torch

from mpq.errors import MpqError
from mpq.latency import LatencyModel, Regime
from mpq.noise import NOISE_Z, paired_z
from mpq.search import Candidate, pareto_front, spread, tie

LATENCY_RESOLUTION = 0.01


def latency_limit(latency: LatencyModel, max_latency: float | None, min_speedup: float | None,
                 costs: dict[str, dict[str, int]], tied: list[list[str]]) -> float | None:
    """The tighter of --max-latency and baseline / --min-speedup, checked against the fastest plan."""
    caps = [c for c in (max_latency, None if min_speedup is None else latency.baseline_seconds / min_speedup) if c is not None]
    if not caps:
        return None
    cap = min(caps)
    units_costs, _, members = tie(costs, {n: {f: 0.0 for f in o} for n, o in costs.items()}, tied)
    fastest = latency.rest_seconds + sum(min(latency.layers_seconds({m: f for m in members[u]}) for f in units_costs[u])
                                         for u in units_costs)
    if fastest > cap:
        raise MpqError(f"no config can run a {Regime(**latency.regime).describe()} in {cap * 1e3:.3f} ms on this machine: "
                       f"the fastest predicted is {fastest * 1e3:.3f} ms (speedup {latency.baseline_seconds / fastest:.2f}x); "
                       f"raise --max-latency or lower --min-speedup")
    return cap


def time_step(latency: LatencyModel | None) -> float:
    """Latencies closer than this are one latency to the fronts: 1% of the unquantised step, under
    which a prediction means nothing (it is validated to about 15%)."""
    return 1.0 if latency is None else LATENCY_RESOLUTION * latency.baseline_seconds


def _by_time(cands: list[Candidate], resolution: float, loss) -> list[Candidate]:
    """The (latency, loss) front, by latency, as copies whose 'bytes' is their latency in
    nanoseconds (so that pareto_front, significant_front and spread walk it by latency). A config
    is on it unless another has a lower loss and is not slower by `resolution` or more: latencies
    closer than that are one latency. (Rounding latencies to a grid of `resolution` split two
    configs 0.3% apart that straddled a step, and kept the worse one as "faster".)"""
    kept = [c for c in cands if not any(loss(d) < loss(c) and d.latency < c.latency + resolution for d in cands)]
    return sorted((Candidate(c.formats, round(c.latency * 1e9), c.predicted, c.origin, c.measured, c.latency) for c in kept),
                  key=lambda c: (c.bytes, loss(c)))


def chosen_for_measuring(front: list[Candidate], count: int, resolution: float) -> list[Candidate]:
    """The configs to measure: spread over the bytes of the (bytes, predicted) front, and, with a
    latency model, as many again spread over the latency of the (latency, predicted) front."""
    by_bytes = pareto_front(front)
    if front and front[0].latency is None:
        return spread(by_bytes, count)
    by_time = _by_time(front, resolution, loss=lambda c: c.predicted)  # by latency
    chosen = spread(by_bytes, count)
    keys = {tuple(sorted(c.formats.items())) for c in chosen}
    for quick in spread(by_time, count):
        original = next(c for c in front if c.formats == quick.formats)
        if tuple(sorted(original.formats.items())) not in keys:
            chosen.append(original)
    return sorted(chosen, key=lambda c: c.bytes)


def plan_key(cand: Candidate) -> tuple:
    return tuple(sorted(cand.formats.items()))


def significant_front(cands: list[Candidate], windows: dict[tuple, torch.Tensor]) -> list[Candidate]:
    """The (bytes, held-out loss) front, less what noise put on it: by bytes, a config is kept
    when it beats the best kept so far (every smaller kept config) by more than the windows'
    noise (paired z below -NOISE_Z on its per-window held-out losses). A bigger config that is
    better only by luck of the windows is nothing a user should pay bytes for."""
    kept: list[Candidate] = []
    for cand in pareto_front(cands, loss=lambda c: c.measured["loss"]):
        best = min(kept, key=lambda c: c.measured["loss"], default=None)
        if best is None or paired_z(windows[plan_key(cand)], windows[plan_key(best)]) < -NOISE_Z:
            kept.append(cand)
    return kept


def emitted_front(feasible: list[Candidate], resolution: float, windows: dict[tuple, torch.Tensor]) -> list[Candidate]:
    """Measured configs that none beats beyond noise on bytes and held-out loss, or on predicted
    latency and held-out loss (`windows`: each config's per-window held-out losses, by plan_key).
    A config of the latency front joins only if every config already emitted is slower by
    `resolution` or more, or worse beyond noise: one predicted 0.6% faster than a smaller emitted
    config, and as good within noise, is the same choice at more bytes."""
    front = significant_front(feasible, windows)
    if feasible and feasible[0].latency is not None:
        by_time = significant_front(_by_time(feasible, resolution, loss=lambda c: c.measured["loss"]), windows)
        fast = {plan_key(c) for c in by_time}
        for cand in sorted((c for c in feasible if plan_key(c) in fast and c not in front), key=lambda c: c.latency):
            if not any(_as_good(other, cand, resolution, windows) for other in front):
                front.append(cand)
    return sorted(front, key=lambda c: c.bytes)


def _as_good(other: Candidate, cand: Candidate, resolution: float, windows: dict[tuple, torch.Tensor]) -> bool:
    """Whether `other` is as fast as `cand` (within `resolution`) and `cand` is not better beyond noise."""
    return (other.latency < cand.latency + resolution
            and paired_z(windows[plan_key(cand)], windows[plan_key(other)]) >= -NOISE_Z)


def within_noise(feasible: list[Candidate], emitted: list[Candidate]) -> int:
    """How many configs of the plain measured (bytes, loss) front the noise test left out."""
    return sum(c not in emitted for c in pareto_front(feasible, loss=lambda c: c.measured["loss"]))


def latency_fields(cand: Candidate, latency: LatencyModel | None) -> dict:
    if latency is None:
        return {}
    measured, speedup = cand.measured.get("latency_s"), cand.measured.get("speedup")
    predicted_speedup = latency.baseline_seconds / cand.latency
    return {"latency_predicted_s": cand.latency, "latency_measured_s": measured,
            "speedup_predicted": predicted_speedup, "speedup_measured": speedup,
            "latency_error": None if not measured else cand.latency / measured - 1,
            "speedup_error": None if not speedup else predicted_speedup / speedup - 1}


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def latency_summary(latency: LatencyModel, cap: float | None, max_latency: float | None, min_speedup: float | None,
                     measured: list[Candidate], baseline_now: float | None) -> dict:
    fields = [latency_fields(c, latency) for c in measured if c.measured.get("latency_s")]
    errors = [abs(f["latency_error"]) for f in fields]
    speedup_errors = [abs(f["speedup_error"]) for f in fields]
    return {"regime": latency.regime, "describe": Regime(**latency.regime).describe(), "device": latency.device,
            "baseline_seconds": latency.baseline_seconds, "baseline_now_seconds": baseline_now,
            "drift": None if not baseline_now else baseline_now / latency.baseline_seconds,
            "rest_seconds": latency.rest_seconds,
            "profile_seconds": latency.profile_seconds, "reused": latency.reused, "notes": latency.notes,
            "cap_seconds": cap, "max_latency": max_latency, "min_speedup": min_speedup,
            "max_abs_error": max(errors) if errors else None, "median_abs_error": _median(errors),
            "max_abs_speedup_error": max(speedup_errors) if speedup_errors else None,
            "median_abs_speedup_error": _median(speedup_errors)}
