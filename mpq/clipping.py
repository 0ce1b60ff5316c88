"""Clipping search: shrink each group's range where a finer step for the bulk of the weights is
worth clipping the few extremes.

A min-max grid spends its 16 (or 256) levels on the group's largest magnitude; one outlier
coarsens the step for every other weight of the group. For each row (and group) this tries the
ratios in CLIPS of the min-max range and keeps the one whose rounding error is least: the output
error tr(dW H dW^T) on each group's own block of the input's second moment H where there is one
(a linear layer with calibration data; cross-group terms left out), the plain squared error where
there is none (an embedding table: a row is looked up whole, so any weighting of rows is the same
for every ratio of a group in it). Only the stored scales and zeros change: packing, bytes and
kernels are those of the min-max grid.
"""

from __future__ import annotations

import torch

from mpq.formats import FormatSpec
from mpq.quantize import Grid, grid_for

CLIPS = tuple(1.0 - i / 20 for i in range(11))  # 1.0 down to 0.5


def clip_ratios(w: torch.Tensor, fmt: FormatSpec, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Per row (and group) the ratio in CLIPS whose grid gives the least error ([N] for int8,
    [N, groups] for int4, as grid_for takes it)."""
    w = w.detach().float()
    n, k = w.shape
    g = fmt.group_along(k) if fmt.bits == 4 else k
    blocks = None if hessian is None else torch.stack([hessian[i:i + g, i:i + g].float() for i in range(0, k, g)])
    best_err = torch.full((n, k // g), float("inf"))
    best = torch.ones(n, k // g)
    for ratio in CLIPS:
        delta = (w - grid_for(w, fmt, clip=ratio).snap(w)).reshape(n, k // g, g)
        err = (delta * delta).sum(dim=2) if blocks is None else torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)
        better = err < best_err
        best_err[better], best[better] = err[better], ratio
    return best if fmt.bits == 4 else best[:, 0]


def clipped_grid(w: torch.Tensor, fmt: FormatSpec, hessian: torch.Tensor | None = None) -> Grid:
    """The grid of `w` with each row's (and group's) range clipped by its best ratio."""
    return grid_for(w, fmt, clip=clip_ratios(w, fmt, hessian))
