"""QuantizedEmbedding: a token-embedding table stored in one of mpq's formats; TiedEmbedding: a
table that is the weight of a quantised output head (tied), read from the head's own tensors.

The table [vocabulary, dim] is quantised like a linear weight [out, in] (rows are tokens, groups
run along the embedding dimension), so it uses the same canonical tensors, checkpoints and byte
counts. A lookup reads only the rows of the tokens asked for and dequantises those: a gather, not
a matmul, so the same torch code serves the CPU and CUDA (its cost is a few rows per token,
nothing a kernel would win back). Rounded to nearest: GPTQ and AWQ weigh a layer's input
activations, and an embedding's input is a token id (under them, only the range is clipped:
mpq.methods).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mpq.formats import FormatSpec
from mpq.kernels.cpu import dequantize_rows_cpu
from mpq.kernels.cpu_int4_layout import int4_row_layout, int4_rows
from mpq.packed_weight import PackedWeight, cast_target, keeping_dtypes
from mpq.packing import unpack_int4_u8
from mpq.qlinear import QuantizedLinear
from mpq.quantize import HOT_TENSORS, dequantize_weight, tensor_bytes

log = logging.getLogger(__name__)


def embedding_rows(ids: torch.Tensor, tensors: dict[str, torch.Tensor], fmt: FormatSpec) -> torch.Tensor:
    """Rows `ids` (any shape) of the table the canonical tensors stand for, float32 [..., dim]."""
    flat = ids.reshape(-1)
    rows = {name: tensor.index_select(0, flat) for name, tensor in tensors.items() if name not in HOT_TENSORS}
    out = dequantize_weight(rows, fmt.base)
    if fmt.hot_rows:  # a token among the hot ids reads its int8 row instead
        hot_ids = tensors["hot_ids"]
        slot = torch.searchsorted(hot_ids, flat.to(hot_ids.dtype)).clamp(max=hot_ids.numel() - 1)
        hit = hot_ids.index_select(0, slot) == flat
        slot = slot[hit]
        out[hit] = tensors["hot_qweight"].index_select(0, slot).float() * tensors["hot_scales"].index_select(0, slot).float()[:, None]
    return out.reshape(*ids.shape, -1)


def _scaled(rows: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Rows times the table's embed_scale (mpq.trace.embedding_scale), in float32, rounded once to
    `dtype`: what `rows_in_dtype * scale` in the model's own forward rounds to."""
    return (rows.float() * scale if scale != 1.0 else rows).to(dtype)


class QuantizedEmbedding(nn.Module):
    """An nn.Embedding whose table is held as canonical tensors; outputs `dtype` (the model's),
    its rows multiplied by `scale` where the table it replaces did that (Gemma, BART)."""

    def __init__(self, fmt: FormatSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_dtype = dtype
        self.scale = scale
        device = torch.device(device) if device is not None else next(iter(tensors.values())).device
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor.to(device))
        table = tensors["qweight" if fmt.quantized else "weight"]
        self.num_embeddings = table.shape[0]
        self.embedding_dim = table.shape[1] * (2 if fmt.bits == 4 else 1)
        if fmt.quantized:  # what model code may read of the table (Llama 4 moves its ids to weight.device)
            self.weight = PackedWeight(dtype, device, torch.Size((self.num_embeddings, self.embedding_dim)), self._rows)

    def _apply(self, fn, recurse: bool = True):
        """Move with the model, keep the stored dtypes; the rows come out in the dtype the model is cast to."""
        self.out_dtype = cast_target(fn) or self.out_dtype
        result = super()._apply(keeping_dtypes(fn), recurse)
        if isinstance(self.weight, PackedWeight):
            self.weight = PackedWeight(self.out_dtype, self.qweight.device, self.weight.shape, self._rows)
        return result

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the quantised table, dequantised to float32, not yet scaled."""
        return embedding_rows(ids, {name: t for name, t in self.named_buffers(recurse=False)}, self.fmt)

    @property
    def kernel(self) -> str:
        if not self.fmt.quantized:
            name = "F.embedding"
        else:
            name = "gather + dequantise rows (torch)" + (f", {self.fmt.hot_rows} hot rows int8" if self.fmt.hot_rows else "")
        return name + (f", times {self.scale:g}" if self.scale != 1.0 else "")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.fmt.quantized:
            return _scaled(F.embedding(ids, self.weight), self.scale, self.out_dtype)
        return _scaled(self._rows(ids), self.scale, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}, kernel={self.kernel}"


class TiedEmbedding(nn.Module):
    """The input embedding table of a model whose output head shares its weight: a lookup
    dequantises the rows of its tokens from the head's QuantizedLinear, whichever backend holds
    them (the canonical tensors, or the CPU int4 kernel's own layout), so the one quantised weight
    serves both, as the one float weight did. It holds no tensors itself; the head is referenced,
    not registered, so it is saved, moved and counted once, as the head."""

    def __init__(self, head: QuantizedLinear, head_name: str, dtype: torch.dtype,
                 canonical: dict[str, torch.Tensor] | None = None, scale: float = 1.0) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # a plain attribute: nn.Module would register it a second time
        self.head_name = head_name
        self.out_dtype = dtype
        self.scale = scale  # the table's embed_scale (Gemma): the head reads the weight unscaled
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._own: dict[str, torch.Tensor] | None = None
        if self._reads_cpu_int4() and canonical is not None and not _rows_layout_matches(head, canonical):
            # a torch whose private int4 layout mpq does not know: keep a canonical copy rather than wrong rows
            self._own = {name: t for name, t in canonical.items() if name != "input_scale"}
            log.warning("the CPU int4 layout of %s is not the one mpq reads rows from: its tied table keeps "
                        "its own copy (%d bytes more)", head_name, tensor_bytes(self._own))

    def _reads_cpu_int4(self) -> bool:
        return self.head.backend == "cpu" and self.head.fmt.bits == 4

    @property
    def weight(self) -> torch.Tensor | PackedWeight:
        """The head's weight, which the table is: its dense tensor, or what may be read of its packed one."""
        head = self.head.weight
        return head if isinstance(head, torch.Tensor) else PackedWeight(self.out_dtype, head.device, head.shape, self._rows)

    def _apply(self, fn, recurse: bool = True):
        self.out_dtype = cast_target(fn) or self.out_dtype  # holds no tensors: the head moves them
        return super()._apply(fn, recurse)

    @property
    def kernel(self) -> str:
        scaled = f", times {self.scale:g}" if self.scale != 1.0 else ""
        return f"rows of {self.head_name}'s weight ({'F.embedding' if self.head.backend == 'dense' else 'gather + dequantise'}{scaled})"

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of the head's quantised weight, dequantised to float32, not yet scaled."""
        head = self.head
        flat = ids.reshape(-1)
        if self._own is not None:
            rows = embedding_rows(flat, self._own, head.fmt)
        elif self._reads_cpu_int4():
            rows = dequantize_rows_cpu(head._tensors(), head.fmt, flat, head.out_features, head.in_features)
        else:  # the canonical layout (the CPU int8 kernel reads it as it is)
            rows = embedding_rows(flat, head._tensors(), head.fmt)
        if hasattr(head, "input_scale"):  # AWQ: the head's weight is its dequantised tensors times this vector
            rows = rows * head.input_scale[: head.in_features].float()
        return rows.reshape(*ids.shape, -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.head.backend == "dense":
            return _scaled(F.embedding(ids, self.head.weight), self.scale, self.out_dtype)
        return _scaled(self._rows(ids), self.scale, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.head.fmt.name}, kernel={self.kernel}"


def _rows_layout_matches(head: QuantizedLinear, canonical: dict[str, torch.Tensor]) -> bool:
    """Whether int4_rows reads the head's CPU layout right: its first, last and a middle row
    (the last block is laid out differently from full ones) against the canonical integers."""
    if int4_row_layout() is None:
        return False
    n = head.out_features
    ids = torch.tensor(sorted({0, n // 2, n - 1}))
    got = int4_rows(head.qweight, ids, n, head.in_features)
    want = unpack_int4_u8(canonical["qweight"].index_select(0, ids)).long()
    return bool(torch.equal(got, want))
