"""Fused groups: layers that read the same input and take the same format run as one matmul.

The trace knows which layers share an input (q/k/v, gate/up); the plan says their formats. Where
a group agrees, one QuantizedLinear holds the members' packed tensors concatenated along the
output dimension, and each member is replaced by a FusedSlice that returns its part. The first
member called with an input runs the fused matmul for all; the others take their slices of the
same result, so the model's own code (which calls q_proj, k_proj, v_proj in turn) is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from mpq.formats import FormatSpec
from mpq.packed_weight import PackedWeight
from mpq.qlinear import QuantizedLinear, choose_backend, out_features_of


def fusion_groups(plan: dict[str, str], shared_input_groups: list[list[str]], has_bias: dict[str, bool]) -> list[list[str]]:
    """Each run of 2+ planned layers in a shared-input group with one format and one bias-ness."""
    groups = []
    for members in shared_input_groups:
        by_key: dict[tuple, list[str]] = {}
        for name in members:
            if name in plan:
                by_key.setdefault((plan[name], has_bias[name]), []).append(name)
        groups.extend(names for names in by_key.values() if len(names) > 1)
    return groups


class FusedLinear(nn.Module):
    """One matmul for several layers; remembers its last input until every member took its part."""

    def __init__(self, layer: QuantizedLinear, sizes: list[int]) -> None:
        super().__init__()
        self.layer = layer
        self.sizes = sizes
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._taken = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input or self._taken >= len(self.sizes):
            self._parts = torch.split(self.layer(x), self.sizes, dim=-1)
            self._input, self._taken = x, 0
        self._taken += 1
        part = self._parts[index]
        if self._taken == len(self.sizes):  # everyone has theirs: drop the references
            self._input, self._parts = None, ()
        return part


class FusedSlice(nn.Module):
    """Stands in for one member layer of a fused group."""

    def __init__(self, fused: FusedLinear, index: int, owner: bool) -> None:
        super().__init__()
        self.index = index
        self.in_features = fused.layer.in_features
        self.out_features = fused.sizes[index]
        if owner:  # the first member registers the shared module; the others only point at it
            self.fused = fused
        else:
            object.__setattr__(self, "fused", fused)

    @property
    def kernel(self) -> str:
        return f"{self.fused.layer.kernel} (fused x{len(self.fused.sizes)})"

    @property
    def weight(self) -> torch.Tensor | PackedWeight:
        """This member's rows of the fused weight: a view of a dense one, else what may be read of a packed one."""
        whole = self.fused.layer.weight
        if isinstance(whole, torch.Tensor):
            start = sum(self.fused.sizes[:self.index])
            return whole[start:start + self.out_features]
        return PackedWeight(whole.dtype, whole.device, torch.Size((self.out_features, self.in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {len(self.fused.sizes)}, out={self.out_features}"


def fusable(fmt: FormatSpec, sizes: list[int], in_features: int, backend: str | None = None,
             device: torch.device | str = "cpu") -> bool:
    """Whether members of these output sizes fuse: only where the fused shape takes the same kernel."""
    kinds = {choose_backend(fmt, size, in_features, backend, device) for size in sizes}
    return kinds == {choose_backend(fmt, sum(sizes), in_features, backend, device)}


def fuse(names: list[str], fmt: FormatSpec, tensors: dict[str, dict[str, torch.Tensor]],
         biases: dict[str, torch.Tensor | None], in_features: int, backend: str | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> dict[str, FusedSlice] | None:
    """FusedSlices for one group, or None where the fused shape would take a different kernel.
    `dtype`: that of the members' weights (QuantizedLinear's)."""
    sizes = [out_features_of(tensors[n]) for n in names]
    total = sum(sizes)
    device = device if device is not None else next(iter(tensors[names[0]].values())).device
    if not fusable(fmt, sizes, in_features, backend, device):
        return None
    cat = {key: torch.cat([tensors[n][key] for n in names]) for key in tensors[names[0]]}
    bias = None if biases[names[0]] is None else torch.cat([biases[n] for n in names])
    fused = FusedLinear(QuantizedLinear(fmt, cat, bias, in_features, total, backend, device, dtype), sizes)
    return {name: FusedSlice(fused, i, owner=(i == 0)) for i, name in enumerate(names)}
