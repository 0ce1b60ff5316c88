"""Module surgery: put QuantizedLinear layers (fused where allowed), QuantizedEmbedding tables and
the TiedEmbedding of a tied head into a model, and take them out."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from mpq.formats import FormatSpec
from mpq.fusion import fuse
from mpq.qembedding import QuantizedEmbedding, TiedEmbedding
from mpq.qlinear import QuantizedLinear, linear_weight, out_features_of
from mpq.quantize import quantize_weight
from mpq.spill import kept
from mpq.errors import MpqError
from mpq.float_twin import upcasts_while_running
from mpq.trace import embedding_scale, is_embedding, table_aliases, tied_table_of


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace the submodule at `name`; returns the one it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


class QuantizedWeightCache:
    """Canonical tensors per (layer, format), so each weight is quantised once per compile (held
    in files, mapped back, while mpq.spill's `spilling` is active).

    `quantizer` (name, format) -> tensors is the method (mpq.methods.make_quantizer); by default
    round to nearest."""

    def __init__(self, model: nn.Module, quantizer: Callable[[str, FormatSpec], dict[str, torch.Tensor]] | None = None) -> None:
        self.model = model
        self.quantizer = quantizer
        self._tensors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def get(self, name: str, fmt: FormatSpec) -> dict[str, torch.Tensor]:
        key = (name, fmt.name)
        if key not in self._tensors:
            if self.quantizer is None:
                tensors = quantize_weight(linear_weight(get_module(self.model, name)), fmt)
            else:
                tensors = self.quantizer(name, fmt)
            self._tensors[key] = kept(tensors)  # mapped from a file during a compile (mpq.spill)
        return self._tensors[key]

    def forget(self, fmt_name: str) -> None:
        """Drop every layer's tensors of one format (a format this cache's method will not serve)."""
        self._tensors = {key: value for key, value in self._tensors.items() if key[1] != fmt_name}


def build_layers(specs: dict[str, FormatSpec], tensors: dict[str, dict[str, torch.Tensor]],
                 biases: dict[str, torch.Tensor | None], in_features: dict[str, int],
                 fused_groups: list[list[str]] = (), backend: str | None = None,
                 device: torch.device | str | None = None,
                 embeddings: dict[str, torch.dtype] | None = None,
                 tied: dict[str, tuple[str, torch.dtype]] | None = None,
                 table_scales: dict[str, float] | None = None,
                 dtypes: dict[str, torch.dtype] | None = None) -> dict[str, nn.Module]:
    """The module to install for each planned layer: a QuantizedEmbedding for the tables named in
    `embeddings` (with the dtype they output), a FusedSlice in a fused group, else a
    QuantizedLinear; and for each head in `tied` (head -> its table's path and dtype) a
    TiedEmbedding at the table's path. A table in `table_scales` (path -> factor) multiplies its
    rows by it, as the table it replaces did. `dtypes`: the dtype of each layer's weight (what
    model code that peeks at it reads: mpq.packed_weight). Both compile (to measure) and load use
    this, so the loaded model is the measured one."""
    scales = table_scales or {}
    dtypes = dtypes or {}
    layers: dict[str, nn.Module] = {
        name: QuantizedEmbedding(specs[name], tensors[name], dtype, device, scales.get(name, 1.0))
        for name, dtype in (embeddings or {}).items()}
    for names in fused_groups:
        slices = fuse(names, specs[names[0]], tensors, biases, in_features[names[0]], backend, device, dtypes.get(names[0]))
        if slices:
            layers.update(slices)
    for name, fmt in specs.items():
        if name not in layers:
            out_features = out_features_of(tensors[name])
            layers[name] = QuantizedLinear(fmt, tensors[name], biases[name], in_features[name], out_features, backend, device,
                                           dtypes.get(name))
    for head, (table, dtype) in (tied or {}).items():
        layers[table] = TiedEmbedding(layers[head], head, dtype, tensors[head], scales.get(table, 1.0))
    return layers


def _scale_of(model: nn.Module, table: str) -> float:
    scale = embedding_scale(get_module(model, table))
    if scale is None:  # trace_model leaves such a table out of every plan
        raise MpqError(f"{table} is not a token table mpq can quantise (its forward does more than a row lookup): "
                       "leave it out of the plan")
    return scale


@contextmanager
def applied(model: nn.Module, plan: dict[str, FormatSpec], cache: QuantizedWeightCache,
            fused_groups: list[list[str]] = (), backend: str | None = None) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Within the block, `model` runs with the plan's layers quantised; yields each layer's canonical
    tensors and bias (what a checkpoint stores). The tensors come from the cache's model, so an
    upcast copy of that model can run the very same quantised weights."""
    modules = {name: get_module(model, name) for name in plan}
    tensors = {name: cache.get(name, fmt) for name, fmt in plan.items()}
    biases = {name: getattr(module, "bias", None) for name, module in modules.items()}
    in_features = {name: linear_weight(module).shape[1] for name, module in modules.items()}
    # a lazy float32 twin's blocks hold 16-bit weights that run upcast: its layers are float32 ones
    dtypes = {name: torch.float32 if upcasts_while_running(model) else linear_weight(module).dtype
              for name, module in modules.items()}
    tables = {name: module.weight.dtype for name, module in modules.items() if is_embedding(module)}
    tied = {name: (table, module.weight.dtype) for name, module in modules.items()
            if (table := tied_table_of(model, name)) is not None}
    table_scales = {name: _scale_of(model, name) for name in [*tables, *(table for table, _ in tied.values())]}
    aliases = {table: table_aliases(model, table) for table in table_scales}  # before any module is swapped
    originals: dict[str, nn.Module] = {}
    try:
        for name, layer in build_layers(plan, tensors, biases, in_features, fused_groups, backend, embeddings=tables,
                                        tied=tied, table_scales=table_scales, dtypes=dtypes).items():
            originals[name] = set_module(model, name, layer)
            for alias in aliases.get(name, ()):
                originals.setdefault(alias, set_module(model, alias, layer))
        yield {name: {**tensors[name], **({} if biases[name] is None else {"bias": biases[name]})} for name in plan}
    finally:
        for name, module in originals.items():
            set_module(model, name, module)
