"""A float32 twin of a 16-bit model that holds its blocks' weights once, in the model's own tensors.

Sensitivities are measured in float32 (see mpq.sensitivity.measurement_model): in bf16, rounding
noise alone swamps an INT8 layer's error. A float32 copy of the whole model costs twice a bf16
model's bytes on top of the model itself (28 GB beside a 14 GB 7B model), yet a forward needs only
the block it is running in float32.

So the twin is a copy of the model's structure in which every transformer block (each entry of a
top-level nn.ModuleList: a decoder's layers, or an encoder-decoder's two stacks) shares the
model's own 16-bit parameters and buffers, and holds float32 copies of them only while its forward
runs: a pre-hook swaps upcast tensors in, a post-hook (called even when the forward raises) swaps
the shared ones back. An upcast is exact, so every block computes what the float32 copy computed,
bit for bit (tests/test_float_twin.py; benchmarks/architectures.py checks the logits of all 40
architectures it builds). What lies outside the blocks (embeddings, the final norm, the head,
rotary tables) is copied to float32 once, so model-level code that asks the twin for its dtype
sees float32, as it would.

A block replayed by mpq.replay (its forward replaced on the instance) runs nothing, so its tensors
are not upcast. The second-order signals (fisher, hessian) take gradients of the twin's weights,
which a lazy twin's blocks do not hold: they make themselves a whole float32 copy (`lazy=False`).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from mpq.spill import kept


def _narrow_float(tensor: torch.Tensor | None) -> bool:
    """A floating tensor narrower than float32 (what a float32 copy would upcast)."""
    return tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32


def _float32_copy(tensor: torch.Tensor, as_parameter: bool, requires_grad: bool = False,
                  keep: Callable[[torch.Tensor], torch.Tensor] = lambda wide: wide) -> torch.Tensor:
    """`tensor` upcast to float32 (and passed through `keep`), as a Parameter where it stands in for one."""
    wide = keep(tensor.detach().float())
    return nn.Parameter(wide, requires_grad=requires_grad) if as_parameter else wide


def named_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The top-level nn.ModuleLists of more than one entry, with their names (lists nested in one,
    such as a block's experts, belong to its blocks)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if not any(name.startswith(outer + ".") for outer, _ in found):
                found.append((name, module))
    return found


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The top-level nn.ModuleLists of more than one entry (see named_block_lists)."""
    return [module for _, module in named_block_lists(model)]


class _UpcastWhileRunning:
    """The hooks of one block: float32 copies of its 16-bit tensors for the length of a forward.

    Buffers are upcast only where the block had them when the twin was made, as `.float()` would
    have upcast them; a module swapped in later (mpq.apply's quantised layers) keeps its buffers as
    stored, as it would in a float32 copy. Its floating parameters (a quantised layer's bias, taken
    from the module it replaced) are upcast, as that module's were."""

    def __init__(self, block: nn.Module) -> None:
        self.buffers = {(id(module), name) for module in block.modules()
                        for name, buffer in module._buffers.items() if _narrow_float(buffer)}
        self.saved: list[tuple[dict, str, torch.Tensor]] = []

    def before(self, block: nn.Module, args, kwargs=None) -> None:
        if getattr(block.__dict__.get("forward"), "runs_nothing", False) or self.saved:  # replayed, or re-entered
            return
        upcast: dict[int, torch.Tensor] = {}  # a tensor shared by two modules stays one tensor
        for module in block.modules():
            for store, upcast_as_parameter in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in store.items():
                    if not _narrow_float(tensor) or (not upcast_as_parameter and (id(module), name) not in self.buffers):
                        continue
                    if id(tensor) not in upcast:
                        upcast[id(tensor)] = _float32_copy(tensor, upcast_as_parameter)
                    self.saved.append((store, name, tensor))
                    store[name] = upcast[id(tensor)]

    def after(self, block: nn.Module, args, *rest) -> None:
        for store, name, tensor in reversed(self.saved):
            store[name] = tensor
        self.saved = []


def float32_twin(model: nn.Module, lazy: bool = True) -> nn.Module:
    """A float32 twin of `model` (the model itself when it is all float32 already). `lazy`: its
    blocks share the model's tensors and upcast them while they run; else a whole float32 copy."""
    if all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point()):
        return model
    blocks = [block for blocks in block_lists(model) for block in blocks] if lazy else []
    if not blocks:
        return copy.deepcopy(model).float()
    shared = {id(t): t for block in blocks for t in [*block.parameters(), *block.buffers()]}
    twin = copy.deepcopy(model, memo=dict(shared))  # the blocks' tensors are not copied: the same objects
    widened: dict[int, torch.Tensor] = {}
    for module in twin.modules():
        for store, as_parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in store.items():
                if id(tensor) in shared or not _narrow_float(tensor):
                    continue
                if id(tensor) not in widened:  # a table tied to a head stays tied
                    # held for the twin's life: mapped from a file during a compile (mpq.spill)
                    widened[id(tensor)] = _float32_copy(tensor, as_parameter, tensor.requires_grad, keep=kept)
                store[name] = widened[id(tensor)]
    for blocks in block_lists(twin):
        for block in blocks:
            hooks = _UpcastWhileRunning(block)
            block.register_forward_pre_hook(hooks.before, with_kwargs=True)
            block.register_forward_hook(hooks.after, always_call=True)
    twin._mpq_upcasts_while_running = True
    return twin


def upcasts_while_running(model: nn.Module) -> bool:
    """Whether `model` is a lazy twin: its blocks' weights are the original's 16-bit tensors."""
    return getattr(model, "_mpq_upcasts_while_running", False)
