"""Skip the blocks that a measured layer cannot change.

The "kl" signal runs the whole model once per (layer, format). A layer of block i changes nothing
before block i, so blocks 0..i-1 would compute again exactly what they computed with no layer
quantised. `BlockReplay` records what block i-1 returned for each calibration batch (one pass,
itself replayed up to the block recorded before), and while a layer of block i is measured,
blocks 0..i-1 return those records instead of running. Block i gets the very tensors it would
have got, so every number is bit-identical to a full pass, at about half the blocks' cost on
average. The blocks are those of every list the model runs, end to end: an encoder-decoder's
decoder layers skip the whole encoder (which returns its last block's records) and the decoder
blocks before theirs, and a head after every block skips them all.

A model whose later blocks read something other than their inputs from earlier ones (a KV cache
shared across layers, say) would be measured wrongly, so `check` first compares a replayed pass
with a full one, and replay is off where they differ.

A record pass needs nothing after the block it records: given a `record` pass (`record_pass`),
each batch stops there (the record hook raises `StopPass`), so the later blocks, the head and
the log-probabilities of every calibration token are not computed for nothing.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from itertools import accumulate
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map

from mpq.float_twin import named_block_lists
from mpq.trace import LayerInfo

log = logging.getLogger(__name__)


def _cloned(out):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


class StopPass(Exception):
    """Raised by a record hook once its block has returned: the rest of the forward is not needed."""


def record_pass(run_batch: Callable[[Any], object], batches: list) -> Callable[[], None]:
    """A pass for BlockReplay's `record`: `run_batch` on each of `batches` (in `run_pass`'s order,
    computing what it computes up to the blocks), each stopped once the recorded block returned."""
    def run() -> None:
        for batch in batches:
            try:
                run_batch(batch)
            except StopPass:
                pass
    return run


class BlockReplay:
    """Replays the first blocks of `lists` (the nn.ModuleLists of `work` in the order it runs them:
    a decoder's layers; an encoder's blocks, then a decoder's) during passes of `run_pass` (one
    forward over the calibration batches, always in the same order). Depth d skips the first d
    blocks of the lists taken end to end: a list skipped whole returns what its last block
    returned (an encoder's output), the list d ends inside what its block before d returned.
    `record`: a `record_pass` over the same batches, which records stop early in; else records run
    `run_pass`."""

    def __init__(self, lists: list[nn.ModuleList], run_pass: Callable[[], object],
                 record: Callable[[], None] | None = None) -> None:
        self.blocks = [block for blocks in lists for block in blocks]
        self.ends = list(accumulate(len(blocks) for blocks in lists))  # depth at each list's end
        self.run_pass = run_pass
        self.record = record
        self.recorded_for = 0  # the replay's depth the records serve (0: none held)
        self.records: list = []  # what block recorded_for - 1 returned, one per batch
        self.finished: dict[int, list] = {}  # a list's end -> what its last block returned, one per batch

    def _record(self, depth: int) -> None:
        """Run one pass (replayed as deep as the records held allow) and keep block depth-1's
        outputs, and those of the last block of each list that ends before it, where not kept yet."""
        start = self.recorded_for if self.recorded_for < depth else 0
        kept: dict[int, list] = {end: [] for end in self.ends if start < end < depth and end not in self.finished}
        kept[depth] = []

        def keep(end: int):
            def hook(module, args, out) -> None:
                kept[end].append(_cloned(out))
                if end == depth and self.record is not None:
                    raise StopPass
            return hook

        hooks = [self.blocks[end - 1].register_forward_hook(keep(end)) for end in kept]
        try:
            with torch.no_grad(), self.skipping(start):
                (self.run_pass if self.record is None else self.record)()
        finally:
            for hook in hooks:
                hook.remove()
        self.finished.update({end: records for end, records in kept.items() if end in self.ends})
        self.records, self.recorded_for = kept[depth], depth

    @contextmanager
    def skipping(self, depth: int) -> Iterator[None]:
        """Within it, the first `depth` blocks do not run: each returns what the last skipped block
        of its list returned for the batch (only that one's output reaches the block after it)."""
        if depth <= 0:
            yield
            return
        if self.recorded_for != depth:
            self._record(depth)
        with ExitStack() as skipped:
            start = 0
            for end in self.ends:
                if start >= depth:
                    break
                stop = min(end, depth)
                records = self.records if stop == depth else self.finished[end]
                skipped.enter_context(returning(self.blocks[start:stop], records))
                start = end
            yield


def block_chain(model: nn.Module, layers: list[LayerInfo]) -> list[tuple[str, nn.ModuleList]]:
    """The top-level block lists of `model` (mpq.float_twin) holding some of `layers`, in the order
    the model runs them (its layers' order)."""
    first: dict[str, tuple[int, nn.ModuleList]] = {}
    lists = named_block_lists(model)
    for layer in sorted(layers, key=lambda layer: layer.order):
        for name, blocks in lists:
            if layer.name.startswith(name + "."):
                first.setdefault(name, (layer.order, blocks))
    return [(name, blocks) for name, (_, blocks) in sorted(first.items(), key=lambda item: item[1][0])]


def replay_depths(chain: list[tuple[str, nn.ModuleList]], layers: list[LayerInfo]) -> dict[str, int]:
    """Each layer's depth for BlockReplay over `chain`: the blocks that run before it. A layer after
    every block (a head) skips them all, unless it is tied to the input table (quantised, it
    changes what block 0 reads); one before or between the lists, none."""
    offsets: dict[str, int] = {}
    total = 0
    for name, blocks in chain:
        offsets[name] = total
        total += len(blocks)
    inside = {layer.name: name for layer in layers for name in offsets if layer.name.startswith(name + ".")}
    last = max((layer.order for layer in layers if layer.name in inside), default=None)
    return {layer.name: offsets[inside[layer.name]] + block_of(layer.name, inside[layer.name]) if layer.name in inside
            else (total if last is not None and layer.order > last and not layer.tied_table else 0) for layer in layers}


@contextmanager
def returning(skipped: list[nn.Module], records: list, clone: bool = True) -> Iterator[None]:
    """Within it, the consecutive blocks `skipped` run nothing: on its i-th call each returns
    records[i], what the last of them returned for the i-th batch (only the last one's output
    reaches the block after it; the others' are ignored by the next skipped one). The last one
    returns a clone where `clone`: records used again must survive a block that writes into its input."""
    calls = [0] * len(skipped)
    last = len(skipped) - 1

    def replayed(j: int):
        def forward(*args, **kwargs):
            out = records[calls[j]]
            calls[j] += 1
            return _cloned(out) if clone and j == last else out
        forward.runs_nothing = True  # so mpq.float_twin does not upcast a block that only replays
        return forward

    own = [block.__dict__.get("forward") for block in skipped]  # an instance's own (accelerate's hooks)
    for j, block in enumerate(skipped):
        block.forward = replayed(j)
    try:
        yield
    finally:
        for block, forward in zip(skipped, own):
            del block.forward
            if forward is not None:
                block.forward = forward


def block_of(name: str, blocks_name: str) -> int:
    """The index of the block holding layer `name` (0 for a layer outside the blocks: nothing skipped)."""
    prefix = blocks_name + "."
    if not name.startswith(prefix):
        return 0
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))


def check(replay: BlockReplay, reference) -> bool:
    """Whether a pass replayed up to the last block gives exactly `reference`, the full pass's output."""
    with replay.skipping(len(replay.blocks) - 1):
        same = _same(replay.run_pass(), reference)
    if not same:
        log.info("block replay off: a replayed pass differs from a full one")
    return same
