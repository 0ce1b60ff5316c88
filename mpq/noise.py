"""When is one config better than another, and not just luckier on the held-out windows?

Two configs are run on the same held-out windows (token windows of an LM, sentences of an
encoder), so their per-window losses are paired: the z score of the mean difference over its
standard error says whether a difference stands out of the windows' noise. `--method auto` and
the emitted Pareto set both ask it.
"""

from __future__ import annotations

import math

import torch

NOISE_Z = 2.0  # a paired difference under this many standard errors is within noise


def paired_z(candidate: torch.Tensor, base: torch.Tensor) -> float:
    """Mean of the per-window differences over its standard error: below -NOISE_Z, `candidate` is
    better than `base` by more than the windows' noise."""
    diff = (candidate - base).double()
    if diff.numel() < 2:
        return 0.0
    error = diff.std().item() / math.sqrt(diff.numel())
    mean = diff.mean().item()
    return mean / error if error > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
