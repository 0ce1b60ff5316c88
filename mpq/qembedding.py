"""QuantizedEmbedding: a token-embedding table stored in one of mpq's formats.

The table [vocabulary, dim] is quantised like a linear weight [out, in] (rows are tokens, groups
run along the embedding dimension), so it uses the same canonical tensors, checkpoints and byte
counts. A lookup reads only the rows of the tokens asked for and dequantises those: a gather, not
a matmul, so the same torch code serves the CPU and CUDA (its cost is a few rows per token,
nothing a kernel would win back). Rounded to nearest: GPTQ and AWQ weigh a layer's input
activations, and an embedding's input is a token id (under them, only the range is clipped:
mpq.methods).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpq.formats import FormatSpec
from mpq.quantize import dequantize_weight


def embedding_rows(ids: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: FormatSpec) -> torch.Tensor:
    """Rows `ids` (any shape) of the table the canonical tensors stand for, float32 [..., dim]."""
    flat = ids.reshape(-1)
    rows = {name: tensor.index_select(0, flat) for name, tensor in tensors.items()}
    return dequantize_weight(rows, fmt).reshape(*ids.shape, -1)


class QuantizedEmbedding(nn.Module):
    """An nn.Embedding whose table is held as canonical tensors; outputs `dtype` (the model's)."""

    def __init__(self, fmt: FormatSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_dtype = dtype
        device = torch.device(device) if device is not None else next(iter(tensors.values())).device
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.to(device))
        table = tensors["qweight" if fmt.quantized else "weight"]
        self.num_embeddings = table.shape[0]
        self.embedding_dim = table.shape[1] * (2 if fmt.bits == 4 else 1)

    @property
    def kernel(self) -> str:
        return "F.embedding" if not self.fmt.quantized else "gather + dequantise rows (torch)"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.fmt.quantized:
            return F.embedding(ids, self.weight).to(self.out_dtype)
        tensors = {name: t for name, t in self.named_buffers(recurse=False)}
        return embedding_rows(ids, tensors, self.fmt).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}, kernel={self.kernel}"
