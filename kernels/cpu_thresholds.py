"""From how many tokens a CPU layer leaves torch's weight-only kernel for float32 tiles: measured here.

torch's INT8/INT4 CPU kernels cost the same per token at any token count, while a float32 GEMM
over dequantised tiles (mpq.kernels.cpu) reuses each weight across tokens. Which wins from how many
tokens depends on the CPU, its vector ISA above all: on a 2-core AVX2 EPYC the tiles won from 64
(INT8) and 128 (INT4) tokens, on a 2-core AVX-512 one almost never (benchmarks/cpu_kernels.py).
So once per machine (CPU, threads, ISA, torch) a probe times both paths on a 1024 x 1024 layer
at PROBE_TOKENS and takes the smallest count from which the tiles are at least 10% faster there
and at every larger count probed (NEVER where they are not at the largest). The answer is kept in
$MPQ_CACHE_DIR/cpu-tiles.json; the probe takes about a second.

MPQ_CPU_TILES pins it instead: "8:64,4:128" (INT8 from 64 tokens, INT4 from 128), "never", or
"auto" (the default: measured).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import torch

from mpq.errors import MpqError

log = logging.getLogger(__name__)
NEVER = 1 << 40  # no layer has this many tokens
PROBE_TOKENS = (32, 64, 128, 256, 512)
MARGIN = 0.9  # the tiles must take at most this share of the kernel's time: a tie keeps the kernel
FILENAME = "cpu-tiles.json"
PROBE_FORMATS = {8: "int8", 4: "int4-g128"}


def pinned() -> dict[int, int] | None:
    """The thresholds MPQ_CPU_TILES pins, None for "auto"."""
    value = os.environ.get("MPQ_CPU_TILES", "auto").strip()
    if value == "auto":
        return None
    if value == "never":
        return {bits: NEVER for bits in PROBE_FORMATS}
    problem = MpqError(f"MPQ_CPU_TILES={value!r}: write auto, never, or bits:tokens for 8 and 4, such as 8:64,4:128")
    try:
        found = {int(bits): int(tokens) for bits, tokens in (part.split(":") for part in value.split(","))}
    except ValueError:
        raise problem from None
    if set(found) != set(PROBE_FORMATS) or min(found.values()) < 1:
        raise problem
    return found


def describe(tokens: int) -> str:
    """A threshold in words: its token count, or "never"."""
    return "never" if tokens >= NEVER else str(tokens)


def signature() -> str:
    from mpq.environment import hardware

    return f"{hardware()} | torch {torch.__version__}"


def thresholds() -> dict[int, int]:
    """bits -> tokens from which a layer takes float32 tiles: pinned, stored for this machine, or probed now."""
    fixed = pinned()
    if fixed is not None:
        return fixed
    from mpq.io import cache_root, write_json_atomic

    path, key = cache_root() / FILENAME, signature()
    stored = _read(path)
    known = _entry(stored.get(key))
    if known is not None:
        return known
    measured = probe()
    log.info("float32 tiles from %s tokens on this CPU (measured)", measured)
    try:
        write_json_atomic(path, {**stored, key: measured})
    except OSError as exc:  # a read-only home still runs; the next process measures again
        log.warning("cannot keep the CPU thresholds (%s)", exc)
    return measured


def _read(path) -> dict:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _entry(entry) -> dict[int, int] | None:
    """A stored machine's thresholds, None where the entry is missing or damaged (then: probe)."""
    try:
        found = {int(bits): int(tokens) for bits, tokens in entry.items()}
    except (AttributeError, TypeError, ValueError):
        return None
    return found if set(found) == set(PROBE_FORMATS) else None


def from_tokens(wins: list[bool]) -> int:
    """The smallest of PROBE_TOKENS from which the tiles won at it and at every larger one."""
    threshold = NEVER
    for tokens, won in zip(reversed(PROBE_TOKENS), reversed(wins)):
        if not won:
            break
        threshold = tokens
    return threshold


def least_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of `repeats` calls of `fn` after one warm-up call (allocations, thread wake-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)  # on a shared machine other work only ever adds time


@torch.no_grad()
def probe() -> dict[int, int]:
    """Time torch's kernel against the float32 tiles on this CPU (see the module's docstring)."""
    from mpq.formats import get_format
    from mpq.kernels.cpu import linear_cpu_kernel, linear_cpu_tiles, prepare_cpu
    from mpq.kernels.cpu_int4_layout import int4_row_layout
    from mpq.quantize import quantize_weight

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 1024, generator=generator) * 0.02
    found = {}
    for bits, name in PROBE_FORMATS.items():
        if bits == 4 and int4_row_layout() is None:  # no tiles to take: the kernel serves every M
            found[bits] = NEVER
            continue
        fmt = get_format(name)
        prepared = prepare_cpu(quantize_weight(weight, fmt), fmt)
        wins = []
        for tokens in PROBE_TOKENS:
            x = torch.randn(tokens, 1024, generator=generator).to(torch.bfloat16)
            kernel = least_seconds(lambda: linear_cpu_kernel(x, prepared, fmt, None))
            tiles = least_seconds(lambda: linear_cpu_tiles(x, prepared, fmt, None))
            wins.append(tiles < MARGIN * kernel)
        found[bits] = from_tokens(wins)
    return found
