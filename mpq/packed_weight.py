"""What model code may read of a weight that mpq holds packed: its dtype, device and shape.

Model code peeks at its layers' weights: Llama 4 moves the token ids to
`embed_tokens.weight.device`, HunYuan's router and HY-V4's indexer cast their input to
`weight.dtype`, Ergo takes its residual branch's dtype from `o_proj.weight.dtype`. A quantised
layer holds no dense weight, so it answers with a `PackedWeight`: the dtype of the weight it
stands in for (which follows the model's casts, `.half()` or `.to(torch.float32)`, as that
weight's would have), the device its tensors are on, and the [out, in] shape. It is not a tensor: code that reads the weight's values fails loudly rather than
multiplying by something else, and code that asks `isinstance(weight, torch.Tensor)` (T5's
feed-forward) takes its branch for no dense weight.

A token table's rows are the one value model code reads: Gemma 4's image-and-text forward takes
`embed_tokens.weight[pad_token_id, :]`. A quantised table's weight gives rows by index, as the
table's own lookup dequantises them (before its embed_scale, as a weight's rows are), in its dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class PackedWeight:
    dtype: torch.dtype
    device: torch.device
    shape: torch.Size
    rows: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)  # tables only

    def __getitem__(self, index) -> torch.Tensor:
        """Rows of a table, by token id (an int or an integer tensor, with or without a trailing `:`)."""
        ids = index[0] if isinstance(index, tuple) and len(index) == 2 and index[1] == slice(None) else index
        if self.rows is None or not (isinstance(ids, int) or (isinstance(ids, torch.Tensor) and not ids.is_floating_point()
                                                             and ids.dtype != torch.bool)):
            raise TypeError(f"mpq holds this {'table' if self.rows else 'weight'} packed: only rows by token id can be "
                            f"read from it, not [{index!r}]")
        ids = torch.as_tensor(ids, device=self.device)
        return self.rows(ids.reshape(-1)).reshape(*ids.shape, self.shape[1]).to(self.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def cast_target(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.dtype | None:
    """The floating dtype that `fn` (what nn.Module._apply passes: `.half()`, `.to(dtype)`,
    `.cuda()`) casts floating tensors to, None where it keeps their dtype (a move)."""
    wide = fn(torch.zeros((), dtype=torch.float32)).dtype
    if wide != torch.float32:
        return wide
    narrow = fn(torch.zeros((), dtype=torch.float16)).dtype
    return narrow if narrow != torch.float16 else None


def keeping_dtypes(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` as it moves a tensor, never as it casts one: what a packed layer's `_apply` passes on,
    so a cast of the model leaves the stored tensors as the checkpoint holds them (the kernels read
    them whatever the activations' dtype), the layer holds the bytes predicted, and its scales are
    never rounded again."""
    def moved(tensor: torch.Tensor) -> torch.Tensor:
        out = fn(tensor)
        return out if out.dtype == tensor.dtype else tensor.to(device=out.device)
    return moved
