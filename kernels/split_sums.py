"""Where split-K's partial sums meet: a zeroed fp32 buffer and one counter per output tile.

A config with SPLIT_K > 1 runs each output tile as SPLIT_K programs over parts of K. Each adds its
partial sum into the buffer through fp32 atomics and counts itself in; the program that counts
last reads the total, stores it in the activation dtype, and leaves the buffer and its counter at
zero again for the next call (kernels/triton_common.store_tile). So the buffers are zeroed once,
when made, and a split call is one launch: it used to be three (zero an fp32 output, the kernel,
cast it back), two more launches on a decode call whose kernel takes a few microseconds.

One pair of buffers per device, kept, grown (the old ones kept too) and never shrunk, so that a CUDA graph captured on its
own stream reuses the buffers eager calls (the tuner's among them) made and zeroed. Hence split
calls on one device must not run on two streams at once: they would add into one buffer. A graph
captured before any eager call made big enough buffers gets its own, zeroed by a memset the graph
records and shared with nothing: a kept buffer made during a capture would hold garbage until
that graph's first replay, and another graph or an eager call could read it before.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
# Grown out of, but never freed: a graph captured with them launches on their addresses, and torch
# keeps alive only what a capture itself allocated.
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []


def split_buffers(x: torch.Tensor, sums_needed: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At least `sums_needed` zeroed fp32 sums (the kernel lays its [M, N] output out in them as
    in the output) and `tiles` zeroed int32 counters on x's device. Flat, as kept: a view would
    cost host time every call."""
    sums, counts = _BUFFERS.get(x.device, (None, None))
    if sums is not None and sums.numel() >= sums_needed and counts.numel() >= tiles:
        return sums, counts
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return (torch.zeros(sums_needed, device=x.device, dtype=torch.float32),
                torch.zeros(tiles, device=x.device, dtype=torch.int32))
    if sums is not None:
        _OUTGROWN.append((sums, counts))
    sums = torch.zeros(max(sums_needed, 0 if sums is None else sums.numel()), device=x.device, dtype=torch.float32)
    counts = torch.zeros(max(tiles, 0 if counts is None else counts.numel()), device=x.device, dtype=torch.int32)
    _BUFFERS[x.device] = (sums, counts)
    return sums, counts
