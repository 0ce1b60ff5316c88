"""Quantisation methods: how a layer's weight becomes the canonical tensors of a format.

- rtn: round to nearest (mpq.quantize), needs no data;
- gptq: second-order error compensation with the layer's input Hessian (mpq.gptq);
- awq: activation-aware per-channel scaling searched on calibration rows (mpq.awq).
All three produce the same packed formats (AWQ adds one bf16 `input_scale` vector per layer), so
kernels, checkpoints and loading are shared. Sensitivity is measured with the method that will
be used, because the tensors measured are the tensors emitted (QuantizedWeightCache).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mpq.apply import get_module
from mpq.awq import awq_quantize_group
from mpq.calib_stats import InputStats
from mpq.formats import FormatSpec
from mpq.gptq import gptq_quantize
from mpq.qlinear import linear_weight
from mpq.quantize import quantize_weight

METHODS = ("rtn", "gptq", "awq")
DESCRIPTIONS = {
    "rtn": "rtn (round to nearest), weight-only",
    "gptq": "gptq (static groups, act-order, damping 0.01), weight-only",
    "awq": "awq (activation-aware input-channel scaling, alpha searched on 11 points, each with per-group clipping searched on 11 ratios), weight-only",
}

Quantizer = Callable[[str, FormatSpec], dict[str, torch.Tensor]]


def extra_bytes(method: str, fmt: FormatSpec, in_features: int) -> int:
    """Bytes a method stores beside the format's own: AWQ's bf16 input scale per quantised layer."""
    return 2 * in_features if method == "awq" and fmt.quantized else 0


def make_quantizer(method: str, model: nn.Module, stats: InputStats | None = None,
                   groups: list[list[str]] = ()) -> Quantizer:
    """A function (layer name, format) -> canonical tensors of that layer's weight in `model`."""
    if method == "rtn":
        return lambda name, fmt: quantize_weight(linear_weight(get_module(model, name)), fmt)
    if stats is None:
        raise ValueError(f"method {method} needs calibration statistics")
    if method == "gptq":
        return lambda name, fmt: gptq_quantize(linear_weight(get_module(model, name)), fmt, stats.hessian[name])
    if method == "awq":
        group_of = {name: list(group) for group in groups for name in group}
        done: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

        def awq(name: str, fmt: FormatSpec) -> dict[str, torch.Tensor]:
            if (name, fmt.name) not in done:
                members = group_of.get(name, [name])
                weights = {m: linear_weight(get_module(model, m)) for m in members}
                tensors, _ = awq_quantize_group(weights, fmt, stats.absmean[name], stats.hessian[name])
                done.update({(m, fmt.name): t for m, t in tensors.items()})
            return done.pop((name, fmt.name))  # the weight cache keeps it from here on

        return awq
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
