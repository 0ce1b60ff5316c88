"""Plain torch reference for every quantised linear: dequantise to float32, then F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpq.formats import FormatSpec
from mpq.quantize import dequantize_weight


def linear_reference(x: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: FormatSpec,
                     bias: torch.Tensor | None) -> torch.Tensor:
    weight = dequantize_weight(tensors, fmt)
    y = F.linear(x.float(), weight, None if bias is None else bias.float())
    return y.to(x.dtype)
