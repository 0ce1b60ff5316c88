"""The Triton launchers as torch custom ops (`torch.ops.mpq.*`), with fake implementations, so
torch.compile and torch.export can trace through a quantised model instead of breaking on it."""

from __future__ import annotations

import torch


@torch.library.custom_op("mpq::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    from mpq.kernels.triton_w4a16 import w4a16_linear as launch

    return launch(x, qweight, scales, zeros, group_size, bias)


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("mpq::w8a16_linear", mutates_args=())
def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from mpq.kernels.triton_w8a16 import w8a16_linear as launch

    return launch(x, qweight, scales, bias)


@w8a16_linear.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))
