"""What calibration-aware quantisers need to know about each layer's inputs, from one pass.

- GPTQ: H = X^T X / n, the [K, K] second moment of the layer's inputs.
- AWQ: the mean magnitude of each input channel, and a sample of input rows to score scales on.
Layers that read the same tensor (q/k/v, gate/up) see the same X: one statistic serves the group.
"""

from __future__ import annotations

import torch
from torch import nn

from mpq.apply import get_module
from mpq.trace import LayerInfo

SAMPLE_ROWS = 1024  # input rows kept per layer for AWQ's scale search


class InputStats:
    """Per-layer input statistics gathered by hooks while the calibration data runs through `model`."""

    def __init__(self, hessian: dict[str, torch.Tensor], absmean: dict[str, torch.Tensor],
                 sample: dict[str, torch.Tensor], rows: int) -> None:
        self.hessian = hessian
        self.absmean = absmean
        self.sample = sample
        self.rows = rows


@torch.no_grad()
def collect_input_stats(model: nn.Module, layers: list[LayerInfo], groups: list[list[str]], task,
                        seed: int = 0) -> InputStats:
    """Run the calibration data through `model` (the float32 twin) once, hooking every layer."""
    represent = {name: group[0] for group in groups for name in group}
    owners = sorted({represent.get(layer.name, layer.name) for layer in layers})
    sums: dict[str, torch.Tensor] = {}
    absums: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    generator = torch.Generator().manual_seed(seed)
    hooks = []
    for name in owners:
        def hook(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1])
                absums[name] = torch.zeros(x.shape[1])
                samples[name], counts[name] = [], 0
            sums[name] += x.T @ x
            absums[name] += x.abs().sum(0)
            counts[name] += x.shape[0]
            keep = torch.randperm(x.shape[0], generator=generator)[: SAMPLE_ROWS // 4]
            samples[name].append(x[keep])

        hooks.append(get_module(model, name).register_forward_hook(hook))
    try:
        task.reference(model)  # one pass over the calibration data; the hooks do the work
    finally:
        for handle in hooks:
            handle.remove()
    hessian, absmean, sample = {}, {}, {}
    for layer in layers:
        owner = represent.get(layer.name, layer.name)
        hessian[layer.name] = sums[owner] / counts[owner]
        absmean[layer.name] = absums[owner] / counts[owner]
        rows = torch.cat(samples[owner])
        sample[layer.name] = rows[torch.randperm(rows.shape[0], generator=generator)[:SAMPLE_ROWS]]
    return InputStats(hessian, absmean, sample, min(counts.values()) if counts else 0)
