"""Which launch config a Triton kernel runs with: each candidate timed on the real call, once per shape.

Why not `triton.autotune`: split-K configs add partial sums through fp32 atomics into a zeroed
buffer and cast it back, two extra launches that cost as much as the whole GEMV on a 4096x4096
INT4 layer at M = 1. Here every candidate is timed as it will run (its buffer, its cast), so a
config without split (no atomics, written in the activation dtype) wins where it is faster.
The choice is cached per (kernel, M bucket, N, K, ...): prefill lengths vary from call to call,
and timing every new M would stall generation, so M is rounded up to a power of two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

Config = dict[str, int]  # BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, and num_warps / num_stages for the compiler
_CHOSEN: dict[Hashable, Config] = {}


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (1 stays 1: the decode case has its own code path)."""
    return 1 << (m - 1).bit_length()


def gpu_time_ms(run: Callable[[], object]) -> float:
    """Median GPU time of one call, short enough to time a few dozen candidates in seconds."""
    from triton.testing import do_bench

    return do_bench(run, warmup=5, rep=20, return_mode="median")


def choose_config(key: Hashable, candidates: list[Config], run: Callable[[Config], object],
                  timer: Callable[[Callable[[], object]], float] | None = None) -> Config:
    """The fastest candidate for `key`, timed once (a candidate that fails to compile or launch,
    such as one needing more shared memory than the device has, is skipped)."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    timer = timer or gpu_time_ms
    times: list[tuple[float, int]] = []
    first_error: Exception | None = None
    for index, config in enumerate(candidates):
        try:
            times.append((timer(lambda: run(config)), index))
        except Exception as error:  # noqa: BLE001 - any failing candidate is just not chosen
            first_error = first_error or error
            log.debug("config %s failed for %s: %s", config, key, error)
    if not times:
        raise RuntimeError(f"no launch config ran for {key}: {first_error}") from first_error
    ms, best = min(times)
    _CHOSEN[key] = candidates[best]
    log.info("%s: %s (%.4f ms, fastest of %d)", key, candidates[best], ms, len(times))
    return candidates[best]


def chosen_configs() -> dict[Hashable, Config]:
    """The configs chosen so far (the benchmark records them beside its timings)."""
    return dict(_CHOSEN)
