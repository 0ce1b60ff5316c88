"""AWQ-style activation-aware scaling and clipping: protect the weights that meet large inputs.

For layers reading input X with per-channel mean magnitude a, scale input channel j of the weight
by s_j = a_j^alpha (normalised) before rounding and divide the input by s_j at run time:
x W^T = (x / s) (W s)^T, and the channels with large activations get proportionally finer steps.
alpha is searched on a grid in [0, 1], each alpha with each group's range clipped by the ratio
in mpq.clipping.CLIPS that rounds it best on the layer's output error over all calibration tokens,
tr(dW H dW^T) with H = X^T X / n (the same statistic as GPTQ's). The alphas are then judged, as
the AWQ paper does, on the output of the whole transformer block the layers sit in (the layer's
own output error prefers large alphas that fit calibration text and lose on held-out text: on the
demo, 31.43 held-out perplexity against RTN's 31.26). Plain round-to-nearest is a candidate too,
so on calibration data the search never does worse than RTN by its own judge. Layers that read
one input (q/k/v, gate/up) share one s per format, found on the sum of their errors, so a fused
group still multiplies its input once.
(Lin et al., 2023.)

The divisor is stored as `input_scale` = 1/s in bf16, one [K] vector per layer, multiplied into
the input before the matmul; W s is quantised with s = 1 / input_scale exactly, so the stored
pair stands for W up to the rounding alone. Packed tensors and kernels are those of RTN.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from mpq.clipping import clipped_grid
from mpq.formats import FormatSpec
from mpq.quantize import SCALE_DTYPE, dequantize_weight, encode, quantize_weight

# Candidate tensors of a group's layers -> the error they cause where it is judged (mpq.blockwise).
Judge = Callable[[dict[str, dict[str, torch.Tensor]], FormatSpec], float]

ALPHAS = tuple(i / 10 for i in range(11))


def _scales(absmean: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, 1/s in bf16) with s recomputed from the rounded inverse, so the two agree exactly."""
    s = absmean.float().clamp_min(1e-8) ** alpha
    s = s / torch.sqrt(s.max() * s.min())
    inverse = (1.0 / s).to(SCALE_DTYPE)
    return 1.0 / inverse.float(), inverse


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over calibration rows of ||x dW^T||^2 / n = tr(dW H dW^T)."""
    return float(((delta @ hessian) * delta).sum())


def _candidates(floats: dict[str, torch.Tensor], fmt: FormatSpec, absmean: torch.Tensor,
                h: torch.Tensor) -> Iterator[tuple[float, float, dict[str, dict[str, torch.Tensor]]]]:
    """(alpha, layer-output error, tensors per layer) for plain RTN and then for every alpha with
    its best clipping."""
    rtn = {name: quantize_weight(w, fmt) for name, w in floats.items()}
    for tensors in rtn.values():  # every AWQ layer stores a divisor, so its bytes never depend on the search
        tensors["input_scale"] = torch.ones(absmean.shape[0], dtype=SCALE_DTYPE)
    yield 0.0, sum(output_error(w - dequantize_weight(rtn[n], fmt), h) for n, w in floats.items()), rtn
    for alpha in ALPHAS:
        s, inverse = _scales(absmean, alpha)
        scaled_h = h / s[:, None] / s[None, :]  # the second moment of x / s
        err, tensors = 0.0, {}
        for name, w in floats.items():
            scaled = w * s[None, :]
            grid = clipped_grid(scaled, fmt, scaled_h)
            err += output_error(scaled - grid.snap(scaled), scaled_h)
            tensors[name] = encode(grid.integers(scaled), grid, fmt)
            tensors[name]["input_scale"] = inverse.clone()  # one per layer: a checkpoint stores each layer apart
        yield alpha, err, tensors


def awq_quantize_group(weights: dict[str, torch.Tensor], fmt: FormatSpec, absmean: torch.Tensor,
                       hessian: torch.Tensor, judge: Judge | None = None
                       ) -> tuple[dict[str, dict[str, torch.Tensor]], float | None]:
    """Canonical tensors (plus input_scale) for each layer of a group reading one input, and the
    alpha chosen (None: plain RTN won). `hessian` is X^T X / n of the group's input. Each alpha is
    judged with its own best clipping, so scaling is kept only where it still pays once ranges are
    clipped; by `judge` (the error of the enclosing block's output, mpq.blockwise) when given, else
    by the layers' own output error."""
    if not fmt.quantized:
        return {name: quantize_weight(w, fmt) for name, w in weights.items()}, None
    floats = {name: w.detach().float() for name, w in weights.items()}
    best_err, best = float("inf"), None
    for index, (alpha, layer_err, tensors) in enumerate(_candidates(floats, fmt, absmean, hessian.float())):
        err = layer_err if judge is None else judge(tensors, fmt)
        if err < best_err:
            best_err, best = err, (None if index == 0 else alpha, tensors)
    alpha, tensors = best
    return tensors, alpha
