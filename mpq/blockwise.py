"""Calibration block by block: each transformer block is upcast, fed and measured alone.

GPTQ and AWQ need each layer's calibration inputs. Rather than a float32 twin of the whole model,
the model's repeated blocks (the nn.ModuleList holding most of the quantisable layers: Llama's
decoder layers, BERT's encoder layers) are taken one at a time. The inputs of block 0 are caught
once in a float32 "skeleton": a copy of the model with its blocks replaced by stand-ins
(embeddings, final norm and head only). Then each block is copied to float32, run on those inputs
to gather its layers' statistics, handed to the caller (which quantises its layers, and may judge
candidates on the block's output), and its outputs become the next block's inputs. Memory is one
float32 block plus one block's activations over the calibration rows, whatever the depth: the path
to models that do not fit in memory twice. Layers outside the blocks (lm_head, a pooler) come last,
from the skeleton fed the last block's outputs. A model whose layers sit in more than one list (an
encoder-decoder) is fed whole instead, in as many passes as keep its statistics under a bound.

Every block sees the unquantised model's activations ("true sequential" off): the formats are
chosen later, by the search, so every format of every layer is computed from the same inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mpq.awq import Judge
from mpq.calib_stats import InputStats, StatsRecorder
from mpq.float_twin import float32_twin
from mpq.formats import FormatSpec
from mpq.quantize import dequantize_weight
from mpq.models import model_device, to_device
from mpq.trace import LayerInfo


# The statistics of a model fed whole are gathered in passes of at most this many bytes: an
# encoder-decoder as big as T5-large holds about 4 GB of them (a [K, K] float32 matrix per input;
# K = 4096 for each block's feed-forward output), more than its bf16 weights. A pass costs one
# forward over the calibration data.
STATS_PASS_BYTES = 512 * 2**20


@dataclass
class BlockCalibration:
    """One block's quantisable layers (full names) with their input statistics, and a judge of
    candidate weights on the block's whole output (None for the layers outside every block)."""
    name: str
    layers: list[str]
    stats: InputStats
    judge: Judge | None


def find_blocks(model: nn.Module, layer_names: list[str]) -> str | None:
    """Name of the nn.ModuleList whose entries hold the most quantisable layers (None if none do)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(1 for layer in layer_names if layer.startswith(name + "."))
            if count > best_count:
                best, best_count = name, count
    return best


def another_stack(model: nn.Module, layer_names: list[str], blocks_name: str) -> bool:
    """Whether layers outside `blocks_name` sit in blocks of another list (a seq2seq model's encoder
    beside its decoder)."""
    lists = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 1 and name != blocks_name]
    return any(layer.startswith(f"{name}.") for name in lists for layer in layer_names
               if not layer.startswith(f"{blocks_name}."))


class _Caught(Exception):
    """Raised by block 0's stand-in once it holds its inputs: the rest of the forward is not needed."""


class _StandIn(nn.Module):
    """A block's place in the skeleton: block 0's catches its inputs (then raises) or returns the
    last block's outputs; the others pass the hidden states on."""

    def __init__(self, first: bool) -> None:
        super().__init__()
        self.first = first
        self.caught: list[tuple[tuple, dict]] = []
        self.replay: list[torch.Tensor] | None = None
        self.as_tuple = False  # whether the real blocks return (hidden, ...) rather than hidden

    def forward(self, *args, **kwargs):
        if self.first and self.replay is None:
            self.caught.append((args, kwargs))
            raise _Caught
        hidden = self.replay.pop(0) if self.first else _hidden_of(args, kwargs)
        return (hidden,) if self.as_tuple else hidden


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output_of(out) -> tuple[torch.Tensor, bool]:
    return (out[0], True) if isinstance(out, (tuple, list)) else (out, False)


def _skeleton(model: nn.Module, blocks_name: str) -> tuple[nn.Module, list[_StandIn]]:
    """A float32 copy of `model` with stand-ins for its blocks (the original is left as it was)."""
    blocks = model.get_submodule(blocks_name)
    originals = list(blocks)
    stand_ins = [_StandIn(i == 0) for i in range(len(originals))]
    try:
        for i, stand_in in enumerate(stand_ins):
            blocks[i] = stand_in
        skeleton = copy.deepcopy(model).float()
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    copied = skeleton.get_submodule(blocks_name)
    return skeleton, [copied[i] for i in range(len(copied))]


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Put an [out, in] float weight into an nn.Linear (or a transformers Conv1D, stored [in, out])."""
    module.weight.data = weight.t().contiguous() if type(module).__name__ == "Conv1D" else weight


def _block_judge(block: nn.Module, prefix: str, calls: list[tuple[tuple, dict]], outputs: list[torch.Tensor]) -> Judge:
    """Squared error of the block's output on the calibration rows, with the given layers' weights
    replaced by candidate tensors (dequantised, AWQ's input scale folded in)."""
    @torch.no_grad()
    def judge(tensors: dict[str, dict[str, torch.Tensor]], fmt: FormatSpec) -> float:
        modules = {name: block.get_submodule(name[len(prefix):]) for name in tensors}
        saved = {name: module.weight.data for name, module in modules.items()}
        try:
            for name, module in modules.items():
                _set_weight(module, dequantize_weight(tensors[name], fmt).to(saved[name].device))
            error = 0.0
            for (args, kwargs), reference in zip(calls, outputs):
                out, _ = _output_of(block(*args, **kwargs))
                error += float(((out - reference) ** 2).sum())
            return error
        finally:
            for name, module in modules.items():
                module.weight.data = saved[name]
    return judge


def statistic_bytes(in_features: int) -> int:
    """Bytes of one distinct input's statistics: its [K, K] second moment and [K] mean magnitude, float32."""
    return (in_features ** 2 + in_features) * 4


def stats_passes(names: list[str], represent: dict[str, str], in_features: dict[str, int],
                 stats_bytes: int) -> list[list[str]]:
    """`names` split, in order, into passes whose statistics (one [K, K] and one [K] float32 tensor
    per distinct input) take at most `stats_bytes` each; a group stays in one pass, and a statistic
    bigger than the bound has a pass of its own."""
    units: dict[str, list[str]] = {}  # the first layer of each distinct input -> the layers reading it
    for name in names:
        units.setdefault(represent.get(name, name), []).append(name)
    passes: list[list[str]] = []
    used = 0
    for owner, members in units.items():
        size = statistic_bytes(in_features[owner])
        if not passes or used + size > stats_bytes:
            passes.append([])
            used = 0
        passes[-1].extend(members)
        used += size
    return passes


@torch.no_grad()
def calibrate_blockwise(model: nn.Module, layers: list[LayerInfo], groups: list[list[str]], task,
                        device: torch.device | str | None = None,
                        stats_bytes: int | None = None) -> Iterator[BlockCalibration]:
    """Yield each block's calibration in order, then that of the layers outside the blocks. A block's
    float32 copy lives only until the caller asks for the next one. Embedding tables are left out:
    their input is token ids, not activations to gather statistics of. A model with no one list of
    blocks (an encoder-decoder) is fed whole, once per `stats_passes` of its layers: its statistics
    are held a pass at a time, at most `stats_bytes` (STATS_PASS_BYTES), for one more forward pass each."""
    device = torch.device(device) if device is not None else model_device(model)
    names = [layer.name for layer in layers if not layer.is_embedding]
    represent = {name: group[0] for group in groups for name in group}
    batches = [to_device(batch, device) for batch in task.calibration_inputs()]
    blocks_name = find_blocks(model, names)
    if blocks_name is not None and another_stack(model, names, blocks_name):
        blocks_name = None  # an encoder-decoder's decoder blocks are fed by its encoder's: no one list replays alone
    if blocks_name is None:  # no one list of blocks: the whole model is fed, its layers judged one by one
        # on the model's device, a twin whose blocks upcast while they run (no second copy of them)
        work = float32_twin(model) if device == model_device(model) else copy.deepcopy(model).float().to(device)
        inputs = {layer.name: layer.in_features for layer in layers}
        passes = stats_passes(names, represent, inputs, STATS_PASS_BYTES if stats_bytes is None else stats_bytes)
        for index, members in enumerate(passes):
            recorder = StatsRecorder({name: work.get_submodule(name) for name in members}, represent)
            for batch in batches:
                work(**batch)
            name = "model" if len(passes) == 1 else f"model, pass {index + 1} of {len(passes)}"
            yield BlockCalibration(name, members, recorder.finish(), None)
        return

    skeleton, stand_ins = _skeleton(model, blocks_name)
    skeleton.to(device)
    for batch in batches:
        try:
            skeleton(**batch)
        except _Caught:
            pass
    calls = stand_ins[0].caught
    if len(calls) != len(batches):
        raise RuntimeError(f"the model never reached {blocks_name}.0 on some calibration batches")
    blocks = model.get_submodule(blocks_name)
    as_tuple = False
    for index in range(len(blocks)):
        prefix = f"{blocks_name}.{index}."
        inside = [name for name in names if name.startswith(prefix)]
        block = copy.deepcopy(blocks[index]).float().to(device)
        recorder = StatsRecorder({name: block.get_submodule(name[len(prefix):]) for name in inside}, represent)
        outputs = []
        for args, kwargs in calls:
            out, as_tuple = _output_of(block(*args, **kwargs))
            outputs.append(out)
        stats = recorder.finish()
        yield BlockCalibration(prefix[:-1], inside, stats, _block_judge(block, prefix, calls, outputs))
        calls = [_with_hidden(args, kwargs, out) for (args, kwargs), out in zip(calls, outputs)]
        del block

    outside = [name for name in names if not name.startswith(blocks_name + ".")]
    if outside:
        for stand_in in stand_ins:
            stand_in.as_tuple = as_tuple
        stand_ins[0].replay = [_hidden_of(args, kwargs) for args, kwargs in calls]
        recorder = StatsRecorder({name: skeleton.get_submodule(name) for name in outside}, represent)
        for batch in batches:
            skeleton(**batch)
        yield BlockCalibration("outside blocks", outside, recorder.finish(), None)
