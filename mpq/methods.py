"""Quantisation methods: how a layer's weight becomes the canonical tensors of a format.

- rtn: round to nearest (mpq.quantize), needs no data;
- gptq: second-order error compensation with the layer's input Hessian (mpq.gptq);
- awq: activation-aware per-channel scaling searched on calibration rows (mpq.awq).
A method may be chosen per format: "int8=rtn,int4=gptq" (a name before "=" is a format, or a
family of them: "int4" covers int4-g32 ... int4-pc); formats not named round to nearest.
Embedding tables round to nearest: both other methods weigh a layer's input activations, and a
table's input is a token id. Under gptq or awq a table's range is still clipped where that
rounds it better (mpq.clipping, plain squared error): 2-4% less calibration divergence for
all-MiniLM-L6-v2 at uniform INT4. The same search ahead of GPTQ (each group's range clipped on
its block of H before the column sweep) was measured and left out: it helped INT4 per-channel
(held-out cosine 0.9652 -> 0.9721) but hurt INT4-g32 and g64 and INT8, whose rounding errors
GPTQ already compensates. A table tied to the output head is the head's tensors: the head's
method rounds them (GPTQ on the head's inputs), and the lookups read the same rows. All three produce the same packed formats (AWQ adds one bf16 `input_scale` vector per layer), so
kernels, checkpoints and loading are shared. Sensitivity is measured with the method that will
be used, because the tensors measured are the tensors emitted (QuantizedWeightCache).
GPTQ and AWQ run block by block (mpq.blockwise): every format of a block's layers is computed
while that block alone is in memory in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from mpq.apply import get_module
from mpq.awq import awq_quantize_group
from mpq.blockwise import calibrate_blockwise
from mpq.clipping import clip_ratios
from mpq.formats import FormatSpec
from mpq.gptq import gptq_quantize
from mpq.hot_rows import hot_row_ids, token_counts_for
from mpq.qlinear import linear_weight
from mpq.quantize import quantize_weight
from mpq.spill import kept
from mpq.trace import LayerInfo, is_embedding

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq")
AUTO = "auto"  # per format, the method measured best (mpq.method_choice)
DESCRIPTIONS = {
    "rtn": "rtn (round to nearest), weight-only",
    "gptq": "gptq (static groups, act-order, damping 0.01; block by block), weight-only",
    "awq": "awq (activation-aware input-channel scaling: 11 alphas, each with per-group clipping searched on 11 ratios, "
           "judged with plain rtn on each transformer block's output), weight-only",
}

Quantizer = Callable[[str, FormatSpec], dict[str, torch.Tensor]]


def _entries(method: str) -> dict[str, str]:
    if "=" not in method:
        return {"": method.strip()}
    entries = {}
    for part in method.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--method {method!r}: write one method (rtn, gptq, awq) or FORMAT=METHOD pairs, "
                             "e.g. int8=rtn,int4=gptq")
        entries[key.strip()] = value.strip()
    return entries


def method_of(method: str, fmt: FormatSpec) -> str:
    """The method that rounds `fmt` under `method` ("gptq", or per format "int8=rtn,int4=gptq");
    unquantised formats and formats not named are "rtn"."""
    if not fmt.quantized:
        return "rtn"
    entries = _entries(method)
    if "" in entries:
        return entries[""]
    if fmt.name in entries:
        return entries[fmt.name]
    family = [key for key in entries if fmt.name.startswith(key + "-")]
    return entries[max(family, key=len)] if family else "rtn"


def compact_method(chosen: dict[str, str], formats: list[FormatSpec]) -> str:
    """The shortest method text that gives each format in `chosen` (name -> method) its method:
    "gptq" when all agree, "int8=rtn,int4=gptq" when each bit width agrees, else one pair per format."""
    by_width: dict[str, set[str]] = {}
    for name, method in chosen.items():
        by_width.setdefault(name.split("-")[0], set()).add(method)
    candidates = [",".join(f"{key}={value}" for key, value in chosen.items())]
    if all(len(methods) == 1 for methods in by_width.values()):
        candidates.insert(0, ",".join(f"{key}={next(iter(methods))}" for key, methods in by_width.items()))
    if len(set(chosen.values())) == 1:
        candidates.insert(0, next(iter(chosen.values())))
    named = [fmt for fmt in formats if fmt.name in chosen]
    return next(text for text in candidates if all(method_of(text, fmt) == chosen[fmt.name] for fmt in named))


def check_method(method: str, formats: list[FormatSpec]) -> None:
    """Raise ValueError (saying what to write) for an unknown method or a format name matching none of `formats`."""
    if method == AUTO:
        return
    entries = _entries(method)
    for key, value in entries.items():
        if value not in METHODS:
            raise ValueError(f"--method {method!r}: {value!r} is not one of {', '.join(METHODS)} (or write auto alone)")
        if key and not any(f.name == key or f.name.startswith(key + "-") for f in formats):
            raise ValueError(f"--method {method!r}: {key!r} names none of the formats {', '.join(f.name for f in formats)}")


def describe(method: str, formats: list[FormatSpec]) -> str:
    """For the card: the method of each quantised format (one line when they all share one)."""
    used = {fmt.name: method_of(method, fmt) for fmt in formats if fmt.quantized}
    if len(set(used.values())) <= 1:
        return DESCRIPTIONS[next(iter(used.values()), "rtn")]
    return "; ".join(f"{name}: {DESCRIPTIONS[m]}" for name, m in used.items())


def extra_bytes(method: str, fmt: FormatSpec, layer: LayerInfo) -> int:
    """Bytes a method stores beside the format's own: AWQ's bf16 input scale per quantised linear."""
    return 2 * layer.in_features if method_of(method, fmt) == "awq" and not layer.is_embedding else 0


@dataclass
class Calibrated:
    """What GPTQ/AWQ computed from the calibration data."""
    tensors: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)  # (layer, format) -> tensors
    # Layers the calibration data never ran (LED's global-attention projections on plain text):
    # nothing is known of their inputs, so every calibrated format rounds them to nearest.
    never_ran: list[str] = field(default_factory=list)


def rtn_quantizer(model: nn.Module, token_counts: Mapping[int, int] | None = None) -> Quantizer:
    def quantize(name: str, fmt: FormatSpec) -> dict[str, torch.Tensor]:
        weight = linear_weight(get_module(model, name))
        return quantize_weight(weight, fmt, hot_ids=_hot_ids(name, fmt, weight, token_counts))

    return quantize


def _hot_ids(name: str, fmt: FormatSpec, weight: torch.Tensor, token_counts: Mapping[int, int] | None
             ) -> torch.Tensor | None:
    """The rows a +hot format keeps at int8 (mpq.hot_rows), None for any other format."""
    if not fmt.hot_rows:
        return None
    if token_counts is None:
        raise ValueError(f"{name} in {fmt.name}: the quantizer needs the calibration token counts (mpq.hot_rows)")
    return hot_row_ids(token_counts, weight.shape[0], fmt.hot_rows)


@torch.no_grad()
def calibrated_tensors(method: str, model: nn.Module, layers: list[LayerInfo], groups: list[list[str]],
                       formats: list[FormatSpec], task, progress: bool = False) -> Calibrated:
    """Canonical tensors of every (layer, quantised format) whose method (method_of) is GPTQ or
    AWQ, computed block by block from the original weights of `model` and the calibration data of
    `task`: one pass over the blocks serves every format."""
    quantised = [fmt for fmt in formats if method_of(method, fmt) in ("gptq", "awq") and not fmt.embedding_only]
    if not quantised:
        raise ValueError(f"method {method!r} calibrates none of the formats: use gptq or awq for one")
    group_of = {name: list(group) for group in groups for name in group}
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    blocks = calibrate_blockwise(model, layers, groups, task)
    never_ran: list[str] = []
    for block in tqdm(blocks, desc=f"{method} block by block", disable=not progress, unit="block"):
        never_ran += block.stats.unreached
        done: set[str] = set()
        for name in block.layers:
            if name in done:
                continue
            members = [m for m in group_of.get(name, [name]) if m in block.layers]
            done.update(members)
            weights = {m: linear_weight(get_module(model, m)) for m in members}
            for fmt in quantised:
                if not all(fmt.supports(*w.shape) for w in weights.values()):
                    continue  # a format these layers cannot take (int4-g128 of 64 inputs): no plan asks for it
                if method_of(method, fmt) == "gptq":
                    tensors = {m: gptq_quantize(w, fmt, block.stats.hessian[m]) for m, w in weights.items()}
                else:
                    tensors, _ = awq_quantize_group(weights, fmt, block.stats.absmean[name], block.stats.hessian[name],
                                                    block.judge)
                out.update({(m, fmt.name): kept(t) for m, t in tensors.items()})  # mpq.spill
    if never_ran:
        log.warning("%s: the calibration data never ran %s%s, so nothing is known of their inputs: rounded to nearest",
                    method, never_ran[0], f" and {len(never_ran) - 1} more layers" if len(never_ran) > 1 else "")
    return Calibrated(out, never_ran)


def make_quantizer(method: str, model: nn.Module, tensors: dict[tuple[str, str], dict[str, torch.Tensor]] | None = None,
                   token_counts: Mapping[int, int] | None = None) -> Quantizer:
    """A function (layer name, format) -> canonical tensors of that layer's weight in `model`:
    round to nearest, or the tensors GPTQ/AWQ computed (`calibrated_tensors`) for the formats
    whose method is one of them."""
    rtn = rtn_quantizer(model, token_counts)
    if not calibrates(method):
        return rtn
    if tensors is None:
        raise ValueError(f"method {method} needs its calibrated tensors (calibrated_tensors)")
    def quantize(name: str, fmt: FormatSpec) -> dict[str, torch.Tensor]:
        if method_of(method, fmt) == "rtn":
            return rtn(name, fmt)
        module = get_module(model, name)
        if is_embedding(module):  # of GPTQ/AWQ, only the clipping search applies to a looked-up table
            weight = linear_weight(module)
            return quantize_weight(weight, fmt, clip=clip_ratios(weight, fmt.base),
                                   hot_ids=_hot_ids(name, fmt, weight, token_counts))
        return tensors.pop((name, fmt.name))  # the weight cache keeps what it gets: each is handed over once

    return quantize


def calibrates(method: str) -> bool:
    """Whether `method` rounds some format by GPTQ or AWQ."""
    return any(value in ("gptq", "awq") for value in _entries(method).values())


def method_quantizer(method: str, model: nn.Module, layers: list[LayerInfo], groups: list[list[str]],
                     formats: list[FormatSpec], task, progress: bool = False) -> Quantizer:
    """The quantizer of `method` for this model and calibration data (GPTQ/AWQ computed now)."""
    if method == AUTO:
        raise ValueError("--method auto is resolved by mpq.method_choice.choose_method, on held-out data")
    check_method(method, formats)
    counts = token_counts_for(task, formats)
    if all(method_of(method, f) == "rtn" or f.embedding_only for f in formats):
        return make_quantizer(method, model, {}, counts)  # rtn, and a table's rounding, need no calibrated tensors
    return make_quantizer(method, model, calibrated_tensors(method, model, layers, groups, formats, task, progress).tensors,
                          counts)


def rounded_to_nearest(never_ran: list[str], specs: Mapping[str, FormatSpec], method: str) -> list[str]:
    """The layers of a plan (`specs`: layer -> format) whose format's method is GPTQ or AWQ but
    which were rounded to nearest because the calibration data never ran them."""
    return [name for name in never_ran if name in specs and method_of(method, specs[name]) in ("gptq", "awq")]
