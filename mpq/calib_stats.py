"""What calibration-aware quantisers need to know about each layer's inputs, from one pass.

- GPTQ and AWQ: H = X^T X / n, the [K, K] second moment of the layer's inputs (AWQ scores its
  scales by the output error tr(dW H dW^T), GPTQ compensates rounding with H^-1);
- AWQ: the mean magnitude of each input channel, which its scales are powers of.
Layers that read the same tensor (q/k/v, gate/up) see the same X: one statistic serves the group,
so memory is one [K, K] matrix per distinct input, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpq.apply import get_module
from mpq.trace import LayerInfo


@dataclass
class InputStats:
    hessian: dict[str, torch.Tensor]  # layer -> X^T X / n, float32 [K, K] (shared within a group)
    absmean: dict[str, torch.Tensor]  # layer -> mean |x| per input channel, float32 [K]
    rows: int  # calibration rows (tokens) seen by the least-fed layer


@torch.no_grad()
def collect_input_stats(model: nn.Module, layers: list[LayerInfo], groups: list[list[str]], task) -> InputStats:
    """Run the calibration data through `model` (the float32 twin) once, hooking every layer."""
    represent = {name: group[0] for group in groups for name in group}
    owners = sorted({represent.get(layer.name, layer.name) for layer in layers})
    sums: dict[str, torch.Tensor] = {}
    absums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name in owners:
        def hook(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1])
                absums[name] = torch.zeros(x.shape[1])
                counts[name] = 0
            sums[name] += x.T @ x
            absums[name] += x.abs().sum(0)
            counts[name] += x.shape[0]

        hooks.append(get_module(model, name).register_forward_hook(hook))
    try:
        task.reference(model)  # one pass over the calibration data; the hooks do the work
    finally:
        for handle in hooks:
            handle.remove()
    for name in sums:
        sums[name] /= counts[name]
        absums[name] /= counts[name]
    owner = {layer.name: represent.get(layer.name, layer.name) for layer in layers}
    hessian = {name: sums[o] for name, o in owner.items()}  # one tensor per group, shared
    absmean = {name: absums[o] for name, o in owner.items()}
    return InputStats(hessian, absmean, min(counts.values()) if counts else 0)
