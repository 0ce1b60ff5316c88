"""Decode through a mixture's experts in one launch per format: experts stacked, not looped.

RoutedExperts runs a mixture as a loop: it asks the GPU which experts got tokens (a host sync),
then launches each of those experts' two projections in turn. At decode, a handful of tokens
routed to top-k experts each, that is 2 x top-k launches of a few microseconds of weights each
(Qwen3-30B-A3B: 16 a mixture, 768 a token), and the launches, not the weights, set the pace.

Here each projection's experts that share a format are stacked once ([E_f, N, K/2] packed
weights, [E_f, N, K/G] scales...); each expert's layer then holds a view of its slice, so no byte
is held twice and the per-expert path (prefill) still reads the same memory. One grouped launch
per format (mpq.kernels.triton_w4a16.w4a16_grouped, w8a16_grouped) runs every (token, expert)
pair at once, each pair's row against its own expert's weights, and the slots of the pairs
(expert id -> place in the stack) are gathered on the GPU, so nothing waits for the host.
Experts the plan keeps in 16 bits (the "dense" backend) stack too, into a launch of their own
(mpq.kernels.triton_dense_grouped), so a 16-bit expert does not send the whole mixture back to the
loop: where Triton runs, that is on CUDA with Triton usable and not turned off (MPQ_KERNELS=reference),
or where the mixture's other experts run Triton (the CPU interpreter). On the CPU, or where an
expert is on the reference path, the mixture keeps the loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from mpq.formats import FormatSpec
from mpq.qlinear import QuantizedLinear

GROUPED_TOKENS = 16  # up to this many tokens (the kernels' decode regime) a mixture runs grouped


@dataclass
class ExpertStack:
    """The experts of one projection that share a format, stacked along a leading dimension."""

    fmt: FormatSpec
    tensors: dict[str, torch.Tensor]  # qweight, scales (zeros), or a 16-bit weight: [experts in this stack, ...]
    slots: torch.Tensor  # int32 [E + 1]: expert id -> its place here, -1 where another stack holds it (and for id E)
    input_scale: torch.Tensor | None  # AWQ's per-expert input divisors [experts here, K], or None
    first: QuantizedLinear | None  # the stack's first expert layer: its tensors must still be views of the stack
    # (None: a stack no layer reads, built to time a launch: mpq.grouped_latency)

    def run(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row of x through its expert (ids[p]); rows whose expert another stack holds come out 0."""
        from mpq.kernels import triton_dense_grouped, triton_w4a16, triton_w8a16  # imports triton on first use

        slots = self.slots[ids]
        if self.input_scale is not None:
            x = x * self.input_scale[slots.clamp(min=0)].to(x.dtype)
        if not self.fmt.quantized:
            return triton_dense_grouped.dense_grouped(x, slots, self.tensors["weight"])
        if self.fmt.bits == 8:
            return triton_w8a16.w8a16_grouped(x, slots, self.tensors["qweight"], self.tensors["scales"])
        return triton_w4a16.w4a16_grouped(x, slots, self.tensors["qweight"], self.tensors["scales"],
                                          self.tensors.get("zeros"), self.fmt.group_along(x.shape[-1]))

    def intact(self) -> bool:
        """Whether the layers still read the stack: moving the model to another device copies each
        view apart, so the first layer's tensors no longer start the stacks (a cast keeps them:
        QuantizedLinear._apply)."""
        return all(self.first._buffers[name].data_ptr() == tensor.data_ptr() for name, tensor in self.tensors.items()) \
            and (self.input_scale is None or self.first.input_scale.data_ptr() == self.input_scale.data_ptr())


@dataclass
class ProjectionStacks:
    """One projection (gate_up or down) of every expert of a mixture, as one stack per format."""

    stacks: list[ExpertStack]
    bias: torch.Tensor | None  # [E, N]: the experts' biases, stacked likewise

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [P, K] -> [P, N], row p through expert ids[p] (ids == E: no expert; its row is the
        bias of expert E - 1 or 0, and its routing weight zeroes it)."""
        y = None
        for stack in self.stacks:
            part = stack.run(x, ids)
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias[ids.clamp(max=self.bias.shape[0] - 1)].to(y.dtype)
        return y

    def intact(self) -> bool:
        return all(stack.intact() for stack in self.stacks)


STACKED_BACKENDS = ("triton", "dense")


def triton_runs_on_cuda() -> bool:
    """Whether 16-bit layers on CUDA may run through a Triton launch: Triton usable, not turned off."""
    from mpq.qlinear import triton_available

    return torch.cuda.is_available() and triton_available() and os.environ.get("MPQ_KERNELS", "auto") in ("auto", "triton")


def groups_decode(projections: list[list[nn.Module]]) -> bool:
    """Whether a mixture's expert layers (each projection's) can run grouped: every one on Triton
    or 16-bit, and Triton runs here (one of them on Triton, or 16-bit ones all on CUDA where
    triton_runs_on_cuda)."""
    layers = [layer for projection in projections for layer in projection]
    if not layers or not all(isinstance(layer, QuantizedLinear) and layer.backend in STACKED_BACKENDS for layer in layers):
        return False
    return any(layer.backend == "triton" for layer in layers) or (
        all(next(layer.buffers()).is_cuda for layer in layers) and triton_runs_on_cuda())


def _stack_into(layers: list[QuantizedLinear], name: str) -> torch.Tensor:
    """Stack one tensor of these layers and point each layer at its slice (the old tensors go)."""
    stacked = torch.stack([layer._buffers[name] if name in layer._buffers else layer.bias for layer in layers])
    for layer, view in zip(layers, stacked):
        if name in layer._buffers:
            layer._buffers[name] = view
        else:  # the bias, a parameter
            layer.bias = nn.Parameter(view, requires_grad=False)
    return stacked


@torch.no_grad()
def stack_projection(layers: list[QuantizedLinear]) -> ProjectionStacks:
    """Stack one projection's expert layers by format (layers that groups_decode accepts)."""
    by_key: dict[tuple[str, bool], list[int]] = {}
    for e, layer in enumerate(layers):
        by_key.setdefault((layer.fmt.name, hasattr(layer, "input_scale")), []).append(e)
    device = next(layers[0].buffers()).device
    stacks = []
    for members in by_key.values():
        group = [layers[e] for e in members]
        tensors = {name: _stack_into(group, name) for name in ("qweight", "scales", "zeros", "weight")
                   if name in group[0]._buffers}
        input_scale = _stack_into(group, "input_scale") if hasattr(group[0], "input_scale") else None
        slots = torch.full((len(layers) + 1,), -1, dtype=torch.int32)
        slots[members] = torch.arange(len(members), dtype=torch.int32)
        stacks.append(ExpertStack(group[0].fmt, tensors, slots.to(device), input_scale, group[0]))
    bias = _stack_into(layers, "bias") if layers[0].bias is not None else None
    return ProjectionStacks(stacks, bias)


def describe_grouped(layer: QuantizedLinear, experts: int) -> str:
    """A grouped layer's kernels, in words (mpq inspect --kernels): its own above the decode sizes."""
    decode = "" if layer.fmt.quantized else " (triton dense_grouped)"
    return (f"{layer.kernel}; up to {GROUPED_TOKENS} tokens grouped{decode}: one launch per format over the "
            f"mixture's {experts} experts")
