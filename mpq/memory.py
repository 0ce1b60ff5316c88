"""Sizes: parsing "6GB"/"750MiB", and the exact resident-weight-bytes model the search obeys."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.formats import FormatSpec
from mpq.qlinear import linear_weight
from mpq.trace import LayerInfo, table_aliases

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'6GB' -> 6e9, '6GiB' -> 6*2**30, '750MB', '1.5GiB', '123456' (bytes)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise MpqError(f"cannot read size {text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB (e.g. 6GB, 750MiB) or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


def _side_state(model: nn.Module) -> list[torch.Tensor]:
    """Tensors that quantisation libraries hang on a weight outside parameters and buffers:
    bitsandbytes keeps LLM.int8's row scales in `weight.SCB` and NF4's block scales in
    `weight.quant_state`; without them their models would look smaller than they are."""
    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(getattr(weight, "SCB", None), torch.Tensor):
            out.append(weight.SCB)
        state = getattr(weight, "quant_state", None)
        if state is not None and hasattr(state, "as_dict"):
            out.extend(t for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor))
    return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (and quantisation state kept beside
    them), each shared tensor counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers(), *_side_state(model)]:
        key = _storage_key(tensor)
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


@dataclass
class MemoryModel:
    """Resident bytes of any plan: the untouched rest plus each layer's bytes in its format."""

    fixed_bytes: int
    layer_bytes: dict[str, dict[str, int]]  # layer -> format name -> weight bytes

    def total(self, plan: dict[str, str]) -> int:
        return self.fixed_bytes + sum(self.layer_bytes[layer][fmt] for layer, fmt in plan.items())

    def smallest(self) -> int:
        return self.fixed_bytes + sum(min(options.values()) for options in self.layer_bytes.values())

    def largest(self) -> int:
        return self.fixed_bytes + sum(max(options.values()) for options in self.layer_bytes.values())


def memory_model(model: nn.Module, layers: list[LayerInfo], formats: list[FormatSpec], method: str = "rtn") -> MemoryModel:
    from mpq.methods import extra_bytes

    weights = {layer.name: linear_weight(model.get_submodule(layer.name)) for layer in layers}
    quantizable = sum(w.numel() * w.element_size() for w in weights.values())
    options = {
        layer.name: {fmt.name: fmt.weight_bytes(layer.out_features, layer.in_features)
                     + extra_bytes(method, fmt, layer)
                     for fmt in formats if layer.takes(fmt)}
        for layer in layers
    }
    for name, opts in options.items():
        if not opts:
            raise MpqError(f"layer {name} takes none of the formats asked for: add fp16 or int8 to --formats")
    # A token table's module is replaced whatever its format, and its own buffers go with it
    # (Gemma's embed_scale: mpq.json keeps the factor), at every path it is looked up under.
    tables = [layer.name for layer in layers if layer.is_embedding] + [layer.tied_table for layer in layers if layer.tied_table]
    dropped = {_storage_key(buffer): buffer.untyped_storage().nbytes()
               for table in tables for path in [table, *table_aliases(model, table)]
               for buffer in model.get_submodule(path).buffers(recurse=False)}
    return MemoryModel(fixed_bytes=resident_bytes(model) - quantizable - sum(dropped.values()), layer_bytes=options)


_BLOCK_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass(frozen=True)
class KeptTensors:
    """Tensors of the model that no plan layer holds, alike but for their block: they stay as stored."""

    pattern: str  # their path with block indices as *, e.g. model.layers.*.mlp.experts.gate_up_proj
    owner: str  # the type of the module that holds them, e.g. MixtralExperts
    dims: int  # 3 for the stacked weights of a mixture of experts, which no 2-D format takes
    count: int
    bytes: int

    def describe(self, code: bool = False) -> str:
        """One line; `code`: the pattern in backticks (Markdown)."""
        shape = f", {self.dims}-D" if self.dims > 2 else ""
        pattern = f"`{self.pattern}`" if code else self.pattern
        return f"{pattern} {format_size(self.bytes)} ({self.count} x {self.owner}{shape})"


def kept_as_stored(model: nn.Module, layers: list[LayerInfo]) -> list[KeptTensors]:
    """What stays in the model's own dtype whatever the plan (norms, position tables, biases, a
    mixture of experts' stacked weights), grouped by path and largest first: where the bytes that
    no format can shrink are."""
    held = {_storage_key(linear_weight(model.get_submodule(layer.name))) for layer in layers}
    owners = dict(model.named_modules())
    groups: dict[tuple[str, str, int], list[int]] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        key = _storage_key(tensor)
        if key in held or key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        owner = type(owners.get(name.rpartition(".")[0], model)).__name__
        groups.setdefault((_BLOCK_INDEX.sub("*", name), owner, tensor.dim()), []).append(tensor.numel() * tensor.element_size())
    kept = [KeptTensors(pattern, owner, dims, len(sizes), sum(sizes)) for (pattern, owner, dims), sizes in groups.items()]
    return sorted(kept, key=lambda k: -k.bytes)


def kept_summary(kept: list[KeptTensors], top: int = 3, code: bool = False) -> str:
    """The largest kept tensor groups in a line, e.g. for an error that a budget cannot be met."""
    return "; ".join(k.describe(code) for k in kept[:top])


def kept_to_json(kept: list[KeptTensors], top: int = 10) -> list[dict]:
    return [asdict(k) for k in kept[:top]]


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()


def float_dtype_of(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
