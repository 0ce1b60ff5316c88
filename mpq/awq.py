"""AWQ-style activation-aware scaling and clipping: protect the weights that meet large inputs.

For layers reading input X with per-channel mean magnitude a, scale input channel j of the weight
by s_j = a_j^alpha (normalised) before rounding and divide the input by s_j at run time:
x W^T = (x / s) (W s)^T, and the channels with large activations get proportionally finer steps.
alpha is searched on a grid in [0, 1], each alpha with each group's range clipped by the ratio
in CLIPS that rounds it best (AWQ's second step, here judged jointly with the first). Both searches minimise the layer's output error on all
calibration tokens, tr(dW H dW^T) with H = X^T X / n (the same statistic as GPTQ's), so alpha = 0
with no clipping, which is round-to-nearest, is always a candidate: the search never does worse
than RTN on calibration data. Layers that read one input (q/k/v, gate/up) share one s per format,
found on the sum of their errors, so a fused group still multiplies its input once.
(Lin et al., 2023.)

The divisor is stored as `input_scale` = 1/s in bf16, one [K] vector per layer, multiplied into
the input before the matmul; W s is quantised with s = 1 / input_scale exactly, so the stored
pair stands for W up to the rounding alone. Packed tensors and kernels are those of RTN.
"""

from __future__ import annotations

import torch

from mpq.formats import FormatSpec
from mpq.quantize import SCALE_DTYPE, encode, grid_for, quantize_weight

ALPHAS = tuple(i / 10 for i in range(11))
CLIPS = tuple(1.0 - i / 20 for i in range(11))  # 1.0 down to 0.5


def _scales(absmean: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, 1/s in bf16) with s recomputed from the rounded inverse, so the two agree exactly."""
    s = absmean.float().clamp_min(1e-8) ** alpha
    s = s / torch.sqrt(s.max() * s.min())
    inverse = (1.0 / s).to(SCALE_DTYPE)
    return 1.0 / inverse.float(), inverse


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over calibration rows of ||x dW^T||^2 / n = tr(dW H dW^T)."""
    return float(((delta @ hessian) * delta).sum())


def _clip_ratios(w: torch.Tensor, fmt: FormatSpec, hessian: torch.Tensor) -> torch.Tensor:
    """Per row (and group) the ratio in CLIPS whose grid gives the least output error, judged on
    each group's own block of H (cross-group terms left out, as AWQ judges groups apart)."""
    n, k = w.shape
    g = fmt.group_size or k
    blocks = torch.stack([hessian[i:i + g, i:i + g] for i in range(0, k, g)])  # [G, g, g]
    best_err = torch.full((n, k // g), float("inf"))
    best = torch.ones(n, k // g)
    for ratio in CLIPS:
        delta = (w - grid_for(w, fmt, clip=ratio).snap(w)).reshape(n, k // g, g)
        err = torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)
        better = err < best_err
        best_err[better], best[better] = err[better], ratio
    return best if fmt.group_size else best[:, 0]


def awq_quantize_group(weights: dict[str, torch.Tensor], fmt: FormatSpec, absmean: torch.Tensor,
                       hessian: torch.Tensor) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Canonical tensors (plus input_scale) for each layer of a group reading one input, and the
    alpha chosen. `hessian` is X^T X / n of the group's input. Each alpha is judged with its own
    best clipping, so scaling is kept only where it still pays once ranges are clipped."""
    if not fmt.quantized:
        return {name: quantize_weight(w, fmt) for name, w in weights.items()}, 0.0
    floats = {name: w.detach().float() for name, w in weights.items()}
    h = hessian.float()
    best_err, best = float("inf"), None
    for alpha in ALPHAS:
        s, inverse = _scales(absmean, alpha)
        scaled_h = h / s[:, None] / s[None, :]  # the second moment of x / s
        err, grids = 0.0, {}
        for name, w in floats.items():
            scaled = w * s[None, :]
            grid = grid_for(scaled, fmt, clip=_clip_ratios(scaled, fmt, scaled_h))
            err += output_error(scaled - grid.snap(scaled), scaled_h)
            grids[name] = (scaled, grid)
        if err < best_err:
            best_err, best = err, (alpha, inverse, grids)
    alpha, inverse, grids = best
    out = {}
    for name, (scaled, grid) in grids.items():
        tensors = encode(grid.integers(scaled), grid, fmt)
        tensors["input_scale"] = inverse.clone()  # one per layer: a checkpoint stores each layer apart
        out[name] = tensors
    return out, alpha
