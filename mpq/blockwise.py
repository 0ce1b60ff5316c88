"""Calibration block by block: each transformer block is upcast, fed and measured alone.

GPTQ and AWQ need each layer's calibration inputs. Rather than a float32 twin of the whole model
holding every layer's statistics at once, the model's blocks (the entries of its top-level
nn.ModuleLists: Llama's decoder layers, BERT's encoder layers, a T5's encoder blocks and then its
decoder blocks) are walked one at a time, in the order the model runs them. For block i, the
model's lazy float32 twin (mpq.float_twin) runs each calibration batch with the blocks before it
replayed (each returns what the block before i returned: mpq.replay.returning), a float32 copy of
block i in its place, and stops once block i returned. So block i is called exactly as the model's
own loop calls it (its own attention mask where layers alternate sliding and global attention, a
T5's position bias from block 0, a decoder's encoder output), and each block runs once per batch.
The caller gets its layers' statistics and a judge of candidate weights on the block's output
(which it may use to quantise), and its outputs become what the next block is fed. Memory is one
float32 block, its statistics and two blocks' activations over the calibration rows, whatever the
depth. Layers outside the blocks (lm_head, a pooler) come last, with every block replayed; their
first input rows in the whole pass below must come out of that too, or they are fed the whole model
(a head that reads an earlier block's output, which replay does not give it).

A model whose later blocks read something other than what the earlier ones return (a KV cache
shared across layers, say) would be walked wrongly: the first output row of every block, taken in
one whole pass of the first batch, must come out of the walk too. From the first block where it
does not, the layers are fed the whole model instead, in passes that keep their statistics under a
bound, and judged one by one.

Every block sees the unquantised model's activations ("true sequential" off): the formats are
chosen later, by the search, so every format of every layer is computed from the same inputs.
"""

from __future__ import annotations

import copy
import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from torch import nn

from mpq.awq import Judge
from mpq.calib_stats import InputStats, StatsRecorder
from mpq.float_twin import float32_twin, named_block_lists
from mpq.formats import FormatSpec
from mpq.quantize import dequantize_weight
from mpq.models import model_device, to_device
from mpq.replay import StopPass, record_pass, returning
from mpq.trace import LayerInfo

log = logging.getLogger(__name__)

# Layers fed the whole model (no walk reaches them) have their statistics gathered in passes of at
# most this many bytes: all of a T5-large's would take about 4 GB (a [K, K] float32 matrix per
# input; K = 4096 for each block's feed-forward output), more than its bf16 weights. A pass costs
# one forward over the calibration data.
STATS_PASS_BYTES = 512 * 2**20
# How far (relative) a walked block's first output row may lie from the whole pass's: rounding
# where kernels are not deterministic; a block fed wrong inputs is off by far more.
WALK_TOLERANCE = 1e-4


@dataclass
class BlockCalibration:
    """One block's quantisable layers (full names) with their input statistics, and a judge of
    candidate weights on the block's whole output (None for the layers outside every block)."""
    name: str
    layers: list[str]
    stats: InputStats
    judge: Judge | None


def _output_of(out) -> tuple[torch.Tensor, bool]:
    return (out[0], True) if isinstance(out, (tuple, list)) else (out, False)


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


def _first_row(out) -> torch.Tensor:
    """The first row of a block's output hidden states, kept to check a walked block against."""
    return _output_of(out)[0][:1].detach().clone()


def _probe(work: nn.Module, lists: list[tuple[str, nn.ModuleList]], outside: list[str], batch: dict
           ) -> tuple[list[int], dict, dict[str, torch.Tensor]]:
    """One whole pass of `batch`: the order in which `lists` first run, the first output row of
    each of their blocks ((list, block) -> tensor) and the first input row of each layer in
    `outside` (name -> tensor). It stops once it has them all, before the last layer's matmul (a
    vocabulary's logits for every token are not needed)."""
    order: list[int] = []
    rows: dict[tuple[int, int], torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    blocks_in_all = sum(len(blocks) for _, blocks in lists)

    def stop_if_done() -> None:
        if len(rows) == blocks_in_all and len(inputs) == len(outside):
            raise StopPass

    hooks = []
    for which, (_, blocks) in enumerate(lists):
        for index, block in enumerate(blocks):
            def keep(module, args, out, key=(which, index)) -> None:
                if key[0] not in order:
                    order.append(key[0])
                rows.setdefault(key, _first_row(out))
                stop_if_done()
            hooks.append(block.register_forward_hook(keep))
    for name in outside:
        def keep_input(module, args, name=name) -> None:
            inputs.setdefault(name, _first_row(args))
            stop_if_done()
        hooks.append(work.get_submodule(name).register_forward_pre_hook(keep_input))
    _hooked_pass(work, [batch], hooks)
    return order, rows, inputs


def _hooked_pass(work: nn.Module, batches: list[dict], hooks: list) -> None:
    """Each batch through `work`, stopped where a hook raises StopPass; then `hooks` are removed."""
    try:
        record_pass(lambda batch: work(**batch), batches)()
    finally:
        for hook in hooks:
            hook.remove()


def _same_row(walked: torch.Tensor, whole: torch.Tensor) -> bool:
    """Whether a walked block's first output row is the whole pass's (up to rounding: bit for bit
    on the CPU, where the same float32 arithmetic runs)."""
    if walked.shape != whole.shape:
        return False
    return float((walked.float() - whole.float()).norm()) <= WALK_TOLERANCE * float(whole.float().norm())


def _whole_passes(work: nn.Module, names: list[str], represent: dict[str, str], in_features: dict[str, int],
                  batches: list[dict], stats_bytes: int) -> Iterator[BlockCalibration]:
    """`names` fed the whole model, once per `stats_passes` of them; judged one by one (no judge)."""
    passes = stats_passes(names, represent, in_features, stats_bytes)
    for index, members in enumerate(passes):
        recorder = StatsRecorder({name: work.get_submodule(name) for name in members}, represent)
        for batch in batches:
            work(**batch)
        name = "model" if len(passes) == 1 else f"model, pass {index + 1} of {len(passes)}"
        yield BlockCalibration(name, members, recorder.finish(), None)


@contextmanager
def _in_place_of(blocks: nn.ModuleList, index: int, stand_in: nn.Module) -> Iterator[None]:
    """`stand_in` runs as blocks[index] within it."""
    original = blocks[index]
    blocks[index] = stand_in
    try:
        yield
    finally:
        blocks[index] = original


def _run_to(work: nn.Module, block: nn.Module, batches: list[dict]) -> tuple[list[tuple[tuple, dict]], list]:
    """Each batch through `work` up to `block` (in place in it): what the block was called with
    and what it returned, each batch stopped once it returned."""
    calls: list[tuple[tuple, dict]] = []
    outputs: list = []

    def catch(module, args, kwargs) -> None:
        calls.append((args, kwargs))

    def stop(module, args, out) -> None:
        outputs.append(out)
        raise StopPass

    _hooked_pass(work, batches, [block.register_forward_pre_hook(catch, with_kwargs=True),
                                 block.register_forward_hook(stop)])
    return calls, outputs


@torch.no_grad()
def calibrate_blockwise(model: nn.Module, layers: list[LayerInfo], groups: list[list[str]], task,
                        device: torch.device | str | None = None,
                        stats_bytes: int | None = None) -> Iterator[BlockCalibration]:
    """Yield each block's calibration in the order the model runs its blocks, then that of the
    layers outside them. A block's float32 copy lives only until the caller asks for the next one.
    Embedding tables are left out: their input is token ids, not activations to gather statistics
    of. Layers no walk reaches (a model without block lists; the blocks from one whose walked
    output is not the model's own) are fed the whole model, once per `stats_passes` of them: their
    statistics are held a pass at a time, at most `stats_bytes` (STATS_PASS_BYTES). A list the
    calibration data never runs gives its layers isotropic statistics (InputStats.unreached)."""
    device = torch.device(device) if device is not None else model_device(model)
    names = [layer.name for layer in layers if not layer.is_embedding]
    in_features = {layer.name: layer.in_features for layer in layers}
    represent = {name: group[0] for group in groups for name in group}
    stats_bytes = STATS_PASS_BYTES if stats_bytes is None else stats_bytes
    batches = [to_device(batch, device) for batch in task.calibration_inputs()]
    # on the model's device, a twin whose blocks upcast while they run (no second copy of them)
    work = float32_twin(model) if device == model_device(model) else copy.deepcopy(model).float().to(device)
    lists = [(name, blocks) for name, blocks in named_block_lists(work)
             if any(layer.startswith(name + ".") for layer in names)]
    if not lists:
        yield from _whole_passes(work, names, represent, in_features, batches, stats_bytes)
        return

    outside = [name for name in names if not any(name.startswith(list_name + ".") for list_name, _ in lists)]
    order, rows, outside_rows = _probe(work, lists, outside, batches[0])
    calibrated: set[str] = set()
    for which, (list_name, _) in enumerate(lists):
        if which not in order:  # a list the model runs only when asked (a vision tower, for text): nothing to walk
            never = [name for name in names if name.startswith(list_name + ".")]
            recorder = StatsRecorder({name: work.get_submodule(name) for name in never}, represent)
            yield BlockCalibration(f"{list_name} (never run)", never, recorder.finish(), None)  # isotropic, unreached
            calibrated.update(never)
    done: list[tuple[list[nn.Module], list]] = []  # lists walked: their blocks, what the last returned
    for which in order:
        list_name, blocks = lists[which]
        originals = model.get_submodule(list_name)
        previous: list = []  # what the block before returned, one per batch
        for index in range(len(blocks)):
            prefix = f"{list_name}.{index}."
            inside = [name for name in names if name.startswith(prefix)]
            block = copy.deepcopy(originals[index]).float().to(device)
            recorder = StatsRecorder({name: block.get_submodule(name[len(prefix):]) for name in inside}, represent)
            with ExitStack() as replayed:
                for skipped, records in done:
                    replayed.enter_context(returning(skipped, records))
                if index:  # each record is read once: no clone
                    replayed.enter_context(returning(list(blocks)[:index], previous, clone=False))
                replayed.enter_context(_in_place_of(blocks, index, block))
                calls, outputs = _run_to(work, block, batches)
            stats = recorder.finish()
            if len(outputs) != len(batches):
                raise RuntimeError(f"the model never reached {prefix[:-1]} on some calibration batches")
            if not _same_row(_first_row(outputs[0]), rows[(which, index)]):
                log.info("%s walked alone computes what the whole model does not (a channel between blocks): "
                         "it and the layers after it are fed the whole model", prefix[:-1])
                rest = [name for name in names if name not in calibrated]
                yield from _whole_passes(work, rest, represent, in_features, batches, stats_bytes)
                return
            hidden = [_output_of(out)[0] for out in outputs]
            yield BlockCalibration(prefix[:-1], inside, stats, _block_judge(block, prefix, calls, hidden))
            calibrated.update(inside)
            del block, calls, hidden
            previous = outputs
        done.append((list(blocks), previous))

    if outside:
        recorder = StatsRecorder({name: work.get_submodule(name) for name in outside}, represent)
        seen: dict[str, torch.Tensor] = {}  # each outside layer's first input row, as the replayed pass feeds it

        def keep_input(module, args, name: str) -> None:  # returns None: a pre-hook's value would replace the input
            seen.setdefault(name, _first_row(args))

        hooks = [work.get_submodule(name).register_forward_pre_hook(partial(keep_input, name=name)) for name in outside]
        try:
            with ExitStack() as replayed:
                for skipped, records in done:
                    replayed.enter_context(returning(skipped, records))
                for batch in batches:
                    work(**batch)
        finally:
            for hook in hooks:
                hook.remove()
        stats = recorder.finish()
        if all(name in seen and _same_row(seen[name], row) for name, row in outside_rows.items()):
            yield BlockCalibration("outside blocks", outside, stats, None)
        else:  # every replayed block returned the last one's output: a layer reading an earlier block's sees that
            log.info("a layer outside the blocks reads what the replayed blocks do not give it (an earlier block's "
                     "output, say): the layers outside the blocks are fed the whole model")
            yield from _whole_passes(work, outside, represent, in_features, batches, stats_bytes)
