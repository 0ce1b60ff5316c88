"""Acceptance criteria (the user's, in the seed document's terms) and the recommended config.

A config passes when its held-out quality drop, its measured speedup and its resident bytes are all
within what the user asked; unset criteria pass everything. Of the configs that pass, mpq
recommends the smallest (ties: the better quality) or, with `prefer="fastest"`, the fastest by
measured speedup (ties: the smaller). Plain functions of plain numbers, so the same logic judges
compile's configs and the benchmark's contenders.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFERENCES = ("smallest", "fastest")


@dataclass(frozen=True)
class Criteria:
    max_quality_drop: float | None = None  # causal LM: perplexity ratio - 1 (0.01 = 1%); encoder: mean-cosine drop
    min_speedup: float | None = None  # measured speedup over the unquantised model, in the regime measured
    max_bytes: int | None = None  # resident weight bytes
    prefer: str = "smallest"

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise ValueError(f"unknown preference {self.prefer!r}: use one of {', '.join(PREFERENCES)}")

    def to_json(self) -> dict:
        return {"max_quality_drop": self.max_quality_drop, "min_speedup": self.min_speedup,
                "max_bytes": self.max_bytes, "prefer": self.prefer}


def quality_drop(metrics: dict, baseline: dict) -> float:
    """How much worse than the baseline: perplexity ratio - 1 for LMs (of the perplexity targeted,
    `loss`: text, code or both), mean-cosine drop for encoders."""
    if "ppl" in metrics:
        return metrics["loss"] / baseline["loss"] - 1.0
    return baseline["mean_cosine"] - metrics["mean_cosine"]


def failures(nbytes: int, metrics: dict, baseline: dict, criteria: Criteria) -> list[str]:
    """Why a config fails the criteria (empty: it passes). `metrics` may hold a measured `speedup`."""
    out = []
    if criteria.max_quality_drop is not None:
        drop, limit = quality_drop(metrics, baseline), criteria.max_quality_drop
        if drop > limit:
            out.append(f"perplexity ratio {1 + drop:.4f} > {1 + limit:.4f}" if "ppl" in metrics
                       else f"cosine drop {drop:.4f} > {limit:.4f}")
    if criteria.min_speedup is not None:
        speedup = metrics.get("speedup")
        if speedup is None:
            out.append("speedup not measured")
        elif speedup < criteria.min_speedup:
            out.append(f"speedup {speedup:.2f}x < {criteria.min_speedup:.2f}x")
    if criteria.max_bytes is not None and nbytes > criteria.max_bytes:
        out.append(f"{nbytes} bytes > {criteria.max_bytes}")
    return out


def recommend(rows: list[dict], criteria: Criteria) -> dict | None:
    """The recommended row among those marked `accepted` (each row: bytes, metrics, accepted), or None."""
    passing = [row for row in rows if row["accepted"]]
    if not passing:
        return None
    if criteria.prefer == "fastest":
        return max(passing, key=lambda r: (r["metrics"].get("speedup") or 0.0, -r["bytes"]))
    return min(passing, key=lambda r: (r["bytes"], r["metrics"]["loss"]))
