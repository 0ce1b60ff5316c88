"""Quantisation methods: how a layer's weight becomes the canonical tensors of a format.

- rtn: round to nearest (mpq.quantize), needs no data;
- gptq: second-order error compensation with the layer's input Hessian (mpq.gptq);
- awq: activation-aware per-channel scaling searched on calibration rows (mpq.awq).
All three produce the same packed formats (AWQ adds one bf16 `input_scale` vector per layer), so
kernels, checkpoints and loading are shared. Sensitivity is measured with the method that will
be used, because the tensors measured are the tensors emitted (QuantizedWeightCache).
GPTQ and AWQ run block by block (mpq.blockwise): every format of a block's layers is computed
while that block alone is in memory in float32.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from mpq.apply import get_module
from mpq.awq import awq_quantize_group
from mpq.blockwise import calibrate_blockwise
from mpq.formats import FormatSpec
from mpq.gptq import gptq_quantize
from mpq.qlinear import linear_weight
from mpq.quantize import quantize_weight
from mpq.trace import LayerInfo

METHODS = ("rtn", "gptq", "awq")
DESCRIPTIONS = {
    "rtn": "rtn (round to nearest), weight-only",
    "gptq": "gptq (static groups, act-order, damping 0.01; block by block), weight-only",
    "awq": "awq (activation-aware input-channel scaling: 11 alphas, each with per-group clipping searched on 11 ratios, "
           "judged with plain rtn on each transformer block's output), weight-only",
}

Quantizer = Callable[[str, FormatSpec], dict[str, torch.Tensor]]


def extra_bytes(method: str, fmt: FormatSpec, in_features: int) -> int:
    """Bytes a method stores beside the format's own: AWQ's bf16 input scale per quantised layer."""
    return 2 * in_features if method == "awq" and fmt.quantized else 0


def rtn_quantizer(model: nn.Module) -> Quantizer:
    return lambda name, fmt: quantize_weight(linear_weight(get_module(model, name)), fmt)


@torch.no_grad()
def calibrated_tensors(method: str, model: nn.Module, layers: list[LayerInfo], groups: list[list[str]],
                       formats: list[FormatSpec], task, progress: bool = False
                       ) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Canonical tensors of every (layer, quantised format) by GPTQ or AWQ, computed block by block
    from the original weights of `model` and the calibration data of `task`."""
    if method not in ("gptq", "awq"):
        raise ValueError(f"method {method!r} takes no calibration: use one of gptq, awq")
    quantised = [fmt for fmt in formats if fmt.quantized]
    group_of = {name: list(group) for group in groups for name in group}
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    blocks = calibrate_blockwise(model, layers, groups, task)
    for block in tqdm(blocks, desc=f"{method} block by block", disable=not progress, unit="block"):
        done: set[str] = set()
        for name in block.layers:
            if name in done:
                continue
            members = [m for m in group_of.get(name, [name]) if m in block.layers]
            done.update(members)
            weights = {m: linear_weight(get_module(model, m)) for m in members}
            for fmt in quantised:
                if method == "gptq":
                    tensors = {m: gptq_quantize(w, fmt, block.stats.hessian[m]) for m, w in weights.items()}
                else:
                    tensors, _ = awq_quantize_group(weights, fmt, block.stats.absmean[name], block.stats.hessian[name],
                                                    block.judge)
                out.update({(m, fmt.name): t for m, t in tensors.items()})
    return out


def make_quantizer(method: str, model: nn.Module, tensors: dict[tuple[str, str], dict[str, torch.Tensor]] | None = None
                   ) -> Quantizer:
    """A function (layer name, format) -> canonical tensors of that layer's weight in `model`:
    round to nearest, or the tensors GPTQ/AWQ computed (`calibrated_tensors`) for quantised formats."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    rtn = rtn_quantizer(model)
    if method == "rtn":
        return rtn
    if tensors is None:
        raise ValueError(f"method {method} needs its calibrated tensors (calibrated_tensors)")
    # The weight cache keeps what it gets, so each entry is handed over once.
    return lambda name, fmt: tensors.pop((name, fmt.name)) if fmt.quantized else rtn(name, fmt)


def method_quantizer(method: str, model: nn.Module, layers: list[LayerInfo], groups: list[list[str]],
                     formats: list[FormatSpec], task, progress: bool = False) -> Quantizer:
    """The quantizer of `method` for this model and calibration data (GPTQ/AWQ computed now)."""
    if method == "rtn":
        return make_quantizer(method, model)
    return make_quantizer(method, model, calibrated_tensors(method, model, layers, groups, formats, task, progress))
