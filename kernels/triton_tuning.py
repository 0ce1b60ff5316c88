"""Which launch config a Triton kernel runs with: each candidate timed on the real call, once per shape.

Why not `triton.autotune`: a config's cost is not its kernel's alone (split-K configs used to add
two launches, zeroing an fp32 sum and casting it back, which cost as much as the whole GEMV on a
4096x4096 INT4 layer at M = 1; now their last program per tile finishes the sum, with its atomics
and counters: kernels/split_sums.py), and the timer captures each candidate's whole call in a CUDA
graph. Here every candidate is timed as it will run, so the fastest call wins.
The choice is cached per (kernel, M bucket, N, K, ...): prefill lengths vary from call to call,
and timing every new M would stall generation, so M is rounded up to a power of two. It is also
stored on disk (kernels/tuning_store.py), so a later process on the same GPU skips the timing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

from mpq.kernels import tuning_store

log = logging.getLogger(__name__)

Config = dict[str, int]  # BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, and num_warps / num_stages for the compiler
_CHOSEN: dict[Hashable, Config] = {}
_TUNING: dict[Hashable, dict] = {}  # per key: what its first call spent compiling ahead and timing, and each time


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (1 stays 1: the decode case has its own code path)."""
    return 1 << (m - 1).bit_length()


FLUSH_BYTES = 256 * 2**20  # read before each timed replay: more than any current GPU's L2 (an H200's: 50 MB)


def gpu_time_ms(run: Callable[[], object], warmup: int = 5, replays: int = 50) -> float:
    """Median device time of one call of `run` in ms, its weights read from DRAM.

    The call is captured once in a CUDA graph and the graph is replayed: a Python launch of these
    kernels takes longer on the host than a decode-sized kernel runs on the GPU (on the H200
    machine: 84-154 us an eager INT4 call at M <= 16, 10-35 us its kernel in a graph), so timing
    eager calls measured the host, and the tuner picked among equal-looking candidates at random.
    Before each replay a reduction reads FLUSH_BYTES, so the call finds none of its weights in L2,
    as in a model whose layers evict each other, and finds L2 holding clean lines. (Triton's
    do_bench, which timed the candidates until 2026-12-04, zeroes a buffer instead: L2 is then full
    of dirty lines, whose write-back a timed call may pay as it evicts them. On the H200 the tuner's
    best times were 1.18-1.56x, 4-10 us over, the same configs' times over rotating weight copies,
    rotating_time_ms, which has no flush; part of that is the graph's launch, which rotating_time_ms
    shares among many calls. Not yet timed on a GPU.) do_bench replayed for 20 ms, over a thousand
    replays of a decode call; 50 here."""
    import statistics

    import torch

    run()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")  # read only: its values do not matter
    for _ in range(warmup):
        flush.sum()
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        flush.sum()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def rotating_time_ms(calls: list[Callable[[], object]], replays: int = 30) -> float:
    """Median device time per call of `calls` run in turn, each on its own copy of the weights, all
    captured in one CUDA graph: with more bytes between two reads of a copy than the L2 cache holds,
    every call reads its weights from DRAM, as a layer in a model does, and no flush is needed (a
    flush before each call, as in do_bench, leaves the L2 full of dirty lines whose write-back the
    next call pays for). Launch gaps inside the graph stay in, as in a graph-captured decode step."""
    import statistics

    import torch

    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def usable_cores() -> int:
    """The cores this process may run on (under a CPU limit, fewer than the host has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compile_threads(jobs: int) -> int:
    """Threads that compile `jobs` configs ahead of timing: MPQ_COMPILE_THREADS if set (0: none,
    each config compiles when first timed), else one per usable core; never more than the jobs."""
    wanted = os.environ.get("MPQ_COMPILE_THREADS")
    return max(0, min(int(wanted) if wanted else usable_cores(), jobs))


def compile_ahead(configs: list[Config], compile_one: Callable[[Config], object]) -> float:
    """Compile every config in threads before any is timed; returns the seconds it took.

    A shape's first call compiles every candidate (about 0.6 s each for sm_90 on this project's
    2-core CI machines; 112 of them for INT4 at M = 1 with Triton 3.9), and timing them one by one
    compiled them one after another. Triton's compiler releases the GIL for most of its work, so
    threads compile side by side (2 cores: 1.9-2.2x, benchmarks/first_call.py); the timing then finds
    each compiled.
    A config that fails to compile here fails again when timed, and is skipped there."""
    threads = compile_threads(len(configs))
    if not threads:
        return 0.0
    start = time.perf_counter()

    def attempt(config: Config) -> None:
        try:
            compile_one(config)
        except Exception as error:  # noqa: BLE001 - the timing reports it
            log.debug("config %s did not compile ahead: %s", config, error)

    # The first on this thread: a JIT function makes its per-device kernel cache on its first
    # compile, and threads racing to make it each made one (Triton 3.4: a kernel compiled twice).
    attempt(configs[0])
    if len(configs) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(configs) - 1), thread_name_prefix="mpq-compile") as pool:
            list(pool.map(attempt, configs[1:]))
    return time.perf_counter() - start


def choose_config(key: Hashable, candidates: list[Config], run: Callable[[Config], object],
                  timer: Callable[[Callable[[], object]], float] | None = None,
                  compile_one: Callable[[Config], object] | None = None) -> Config:
    """The fastest candidate for `key`, timed once (a candidate that fails to compile or launch,
    such as one needing more shared memory than the device has, is skipped). `compile_one`, when
    given, compiles a candidate without running it; all are then compiled in parallel first."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    stored = tuning_store.recall(key, candidates)
    if stored is not None:  # chosen by an earlier process on this GPU, Triton and kernels
        _CHOSEN[key] = stored
        return stored
    timer = timer or gpu_time_ms
    compile_s = compile_ahead(candidates, compile_one) if compile_one is not None else 0.0
    start = time.perf_counter()
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
    tuning_store.remember(key, candidates[best])
    # every candidate's time too: what the fastest of each code path took is a finding (benchmarks/gpu_kernels.py)
    _TUNING[key] = {"candidates": len(candidates), "ran": len(times), "compile_ahead_s": compile_s,
                    "timing_s": time.perf_counter() - start, "best_ms": ms,
                    "timed": [[candidates[index], took] for took, index in times]}
    log.info("%s: %s (%.4f ms, fastest of %d; compiled ahead in %.1f s, timed in %.1f s)", key, candidates[best], ms,
             len(times), compile_s, _TUNING[key]["timing_s"])
    return candidates[best]


def chosen_config(key: Hashable) -> Config | None:
    """The config already chosen for `key`, if any (the launchers' fast path)."""
    return _CHOSEN.get(key)


def chosen_configs() -> dict[Hashable, Config]:
    """The configs chosen so far (the benchmark records them beside its timings)."""
    return dict(_CHOSEN)


def tuning_costs() -> dict[Hashable, dict]:
    """Per key chosen so far: candidates, how many ran, seconds compiling ahead and timing, best ms,
    and each candidate that ran with its time ([config, ms], in the candidates' order)."""
    return dict(_TUNING)
