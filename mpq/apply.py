"""Module surgery: put QuantizedLinear layers into a model for a plan, and take them out again."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from mpq.formats import FormatSpec
from mpq.qlinear import QuantizedLinear, linear_weight
from mpq.quantize import quantize_weight


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace the submodule at `name`; returns the one it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


class QuantizedWeightCache:
    """Canonical tensors per (layer, format), so each weight is quantised once per compile."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._tensors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def get(self, name: str, fmt: FormatSpec, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
        key = (name, fmt.name)
        if key not in self._tensors:
            module = module if module is not None else get_module(self.model, name)
            self._tensors[key] = quantize_weight(linear_weight(module), fmt)
        return self._tensors[key]


def build_layer(module: nn.Module, fmt: FormatSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
    out_features, in_features = linear_weight(module).shape
    return QuantizedLinear(fmt, tensors, module.bias, in_features, out_features)


@contextmanager
def applied(model: nn.Module, plan: dict[str, FormatSpec], cache: QuantizedWeightCache
            ) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Within the block, `model` runs with the plan's layers quantised; yields their canonical tensors."""
    originals: dict[str, nn.Module] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for name, fmt in plan.items():
            module = get_module(model, name)
            tensors[name] = cache.get(name, fmt, module)
            originals[name] = set_module(model, name, build_layer(module, fmt, tensors[name]))
        yield tensors
    finally:
        for name, module in originals.items():
            set_module(model, name, module)
