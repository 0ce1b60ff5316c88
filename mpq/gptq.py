"""GPTQ: round one column at a time and spread its error over the columns not yet rounded.

For a layer y = x W^T with calibration inputs X, the output error of a rounded weight is
tr((W - Q) H (W - Q)^T) with H = X^T X / n. GPTQ (Frantar et al., 2022) rounds the columns in
turn and, after each, updates the remaining columns by the optimal correction for that error,
read off the inverse Hessian's Cholesky factor; it works in blocks of columns so the update is a
matrix product. Options as in the paper's reference code:
- act-order: round the columns with the largest Hessian diagonal (the busiest inputs) first;
- damping: add `damp` x mean(diag H) to the diagonal so the inverse exists and stays tame.
The grid (scales, zeros) is fixed from the original weight before any rounding ("static
groups"), so act-order's permutation never mixes groups and the result packs into the very same
format as round-to-nearest: kernels and checkpoints are unchanged.
"""

from __future__ import annotations

import torch

from mpq.formats import FormatSpec
from mpq.quantize import encode, grid_for, quantize_weight

BLOCK = 128


def gptq_quantize(weight: torch.Tensor, fmt: FormatSpec, hessian: torch.Tensor, damp: float = 0.01,
                  act_order: bool = True, block: int = BLOCK) -> dict[str, torch.Tensor]:
    """Canonical tensors of `fmt` for `weight` [N, K], chosen by GPTQ with `hessian` [K, K] (X^T X / n)."""
    if not fmt.quantized:
        return quantize_weight(weight, fmt)
    grid = grid_for(weight, fmt)
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: any value does, take the grid's
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = _upper_inverse_cholesky(h)
    scales, zeros = grid.columns(order)  # [N, K] in the permuted order, looked up once
    q = torch.zeros_like(w)
    for start in range(0, k, block):
        stop = min(start + block, k)
        w_block = w[:, start:stop].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = w_block[:, i]
            s, z = scales[:, start + i], zeros[:, start + i]
            rounded = (torch.round(column / s) + z).clamp(grid.low, grid.high)
            q[:, start + i] = rounded
            snapped = (rounded - z) * s
            err = (column - snapped) / hinv_block[i, i]
            w_block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
            err_block[:, i] = err
        w[:, stop:] -= err_block @ hinv[start:stop, stop:]
    integers = torch.empty_like(q)
    integers[:, order] = q
    return encode(integers, grid, fmt)


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, adding damping until H factors (a rank-poor Hessian)."""
    jitter = 0.0
    mean_diag = torch.mean(torch.diag(h)).item()
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + jitter * torch.eye(h.shape[0]))
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            jitter = mean_diag * (0.1 if jitter == 0 else jitter / mean_diag * 10)
    raise ValueError("the calibration Hessian is not positive definite even with damping: give more calibration text")
