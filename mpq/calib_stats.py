"""What calibration-aware quantisers need to know about each layer's inputs.

- GPTQ and AWQ: H = X^T X / n, the [K, K] second moment of the layer's inputs (AWQ scores its
  scales by the output error tr(dW H dW^T), GPTQ compensates rounding with H^-1);
- AWQ: the mean magnitude of each input channel, which its scales are powers of.
Layers that read the same tensor (q/k/v, gate/up) see the same X: one statistic serves the group,
so memory is one [K, K] matrix per distinct input, not per layer. mpq.blockwise decides which
modules are hooked and feeds them, one block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpq.qlinear import linear_weight


@dataclass
class InputStats:
    hessian: dict[str, torch.Tensor]  # layer -> X^T X / n, float32 [K, K] (shared within a group)
    absmean: dict[str, torch.Tensor]  # layer -> mean |x| per input channel, float32 [K]
    rows: int  # calibration rows (tokens) seen by the least-fed layer
    unreached: list[str]  # layers (not experts) the calibration data never ran: isotropic statistics


class StatsRecorder:
    """Hooks the modules of `root` that stand for some layers and sums their inputs' statistics.

    `modules` maps each layer's name to the module (under `root`) that computes it; `represent`
    maps a layer to the first layer of its shared-input group, which alone is hooked."""

    def __init__(self, modules: dict[str, nn.Module], represent: dict[str, str]) -> None:
        self.owner = {name: represent.get(name, name) for name in modules}
        self.modules = modules
        # the experts of a mixture (mpq.experts): the router may send them no calibration token
        self.routed = {name for name, module in modules.items() if getattr(module, "routed_share", 1.0) < 1.0}
        self.sums: dict[str, torch.Tensor] = {}
        self.absums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [modules[name].register_forward_hook(self._hook(name))
                        for name in sorted(set(self.owner.values()))]

    def _hook(self, name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                self.absums[name] = torch.zeros(x.shape[1], device=x.device)
                self.counts[name] = 0
            self.sums[name] += x.T @ x
            self.absums[name] += x.abs().sum(0)
            self.counts[name] += x.shape[0]
        return hook

    def finish(self) -> InputStats:
        """Removes the hooks; the statistics of every layer (a group's members share one tensor)."""
        for handle in self.handles:
            handle.remove()
        # divided in place: a copy would hold every [K, K] sum twice at the peak
        hessian = {o: self.sums[o].div_(self.counts[o]).cpu() for o in self.sums}
        absmean = {o: self.absums[o].div_(self.counts[o]).cpu() for o in self.sums}
        missing = sorted(name for name, o in self.owner.items() if o not in hessian)
        for name in missing:
            # An expert the router sent no calibration token to, or a layer the model runs only when
            # asked (LED's global-attention projections, without a global attention mask): nothing
            # is known of its inputs, so they are taken as isotropic (H = I, |x| = 1), under which
            # GPTQ and AWQ round to nearest.
            k = linear_weight(self.modules[name]).shape[1]
            hessian[self.owner[name]], absmean[self.owner[name]] = torch.eye(k), torch.ones(k)
        return InputStats({name: hessian[o] for name, o in self.owner.items()},
                          {name: absmean[o] for name, o in self.owner.items()},
                          min(self.counts.values()) if self.counts else 0,
                          [name for name in missing if name not in self.routed])
