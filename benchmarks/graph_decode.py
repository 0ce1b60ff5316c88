"""Greedy decoding with the host taken out: a static KV cache, and each decode step replayed from one CUDA graph.

An eager decode step launches every layer from Python. On the H200 machine an eager INT4 call took
84-154 us of host time against 10-35 us of kernel, so the eager tokens/s of the demo measured the
host: 109 tokens/s for its all-INT4 config against 154 for the unquantised model
(benchmarks/results/kernels-NVIDIA_H200-*.json). Here the step after the prompt is captured once,
after warm-up steps in which mpq's layers chose their launch configs, and replayed: the token it
picks, where it is kept and the next position are all worked out inside the graph, so between
steps the host only replays. That is what a caller gets from CUDA graphs (or
torch.compile(mode="reduce-overhead")): tokens/s bound by the kernels and the model's other ops.

benchmarks/gpu_kernels.py calls `decode_report` for the demo unquantised and for its first config.
On the CPU, `static_greedy` runs the same steps eagerly (tests compare its tokens with generate's).
"""

from __future__ import annotations

import time

import torch

WARMUP_STEPS = 3  # eager steps before the capture: launch configs chosen, lazily made buffers made


def static_greedy(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, graph: bool = False,
                  warm_up: bool = False) -> tuple[list[int], float]:
    """`tokens` greedy token ids after `prompt` ([1, P] ids) through a StaticCache, and the seconds
    the tokens after the first took (the first comes from the prompt's forward). `graph`: the
    decode step is captured once in a CUDA graph and replayed. `warm_up` (implied by `graph`): the
    warm-up steps run first and are rewound, as before a capture; on the CPU, a test of the rewind."""
    from transformers import StaticCache

    from mpq.kv_cache import cache_argument

    if tokens < WARMUP_STEPS + 1:
        raise ValueError(f"tokens={tokens}: at least {WARMUP_STEPS + 1}, for the warm-up steps before a capture")
    device = prompt.device
    length = prompt.shape[1]
    static_cache = StaticCache(config=model.config, max_cache_len=length + tokens)
    cache = {cache_argument(model): static_cache}
    with torch.no_grad():
        logits = model(input_ids=prompt, **cache, use_cache=True, cache_position=torch.arange(length, device=device)).logits
        first = logits[:, -1:].argmax(-1)  # [1, 1]
        token = first.clone()  # the step's input, overwritten by its output
        position = torch.tensor([length], device=device)
        later = torch.empty(tokens - 1, dtype=torch.long, device=device)  # the tokens after the first

        def step() -> None:
            # positions given, not left to the cache's count: transformers >= 5 counts inside the
            # cache and ignores cache_position, older releases take it
            out = model(input_ids=token, **cache, cache_position=position, position_ids=position.view(1, 1),
                        use_cache=True).logits
            token.copy_(out[:, -1:].argmax(-1))
            later.index_copy_(0, position - length, token.view(1))
            position.add_(1)

        run = step
        if graph or warm_up:
            side = torch.cuda.Stream() if graph else None  # stream(None) runs on the current one
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step()
            if graph:
                torch.cuda.current_stream().wait_stream(side)
                captured = torch.cuda.CUDAGraph()
                with torch.cuda.graph(captured):  # records the step; runs nothing
                    step()
                run = captured.replay
            # back to the first decode step: the warm-up's slots are written again by the steps timed
            token.copy_(first)
            position.fill_(length)
            rewind_cache(static_cache, length)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(tokens - 1):
            run()
        synchronize(device)
        seconds = time.perf_counter() - start
    return [int(first)] + later.tolist(), seconds


def rewind_cache(cache: object, length: int) -> None:
    """Sets a StaticCache back to holding `length` tokens. transformers >= 5 keeps each layer's count
    in a device tensor (`cumulative_length`) that picks the slot each step writes; a replayed graph
    advances it in place, so it is set in place. Older releases write where cache_position says."""
    for layer in getattr(cache, "layers", ()):
        count = getattr(layer, "cumulative_length", None)
        if isinstance(count, torch.Tensor):
            count.fill_(length)
        elif count is not None:
            raise TypeError(f"{type(layer).__name__} counts its tokens on the host; its steps cannot be replayed from a graph")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_generate(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> list[int]:
    """generate()'s greedy token ids after `prompt`: what the static loop must reproduce."""
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def decode_report(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> dict:
    """tokens/s of the static loop, eager and replayed from a CUDA graph, and whether each gave
    generate()'s tokens. A capture that fails is reported, not raised: the eager rows still stand."""
    expected = greedy_generate(model, prompt, tokens)
    ids, seconds = static_greedy(model, prompt, tokens)
    report = {"static_eager_tokens_per_s": (tokens - 1) / seconds, "static_eager_matches_generate": ids == expected}
    try:
        ids, seconds = static_greedy(model, prompt, tokens, graph=True)
    except Exception as error:  # noqa: BLE001 - an op the capture refuses: say which
        report["graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return report
    report.update({"graph_tokens_per_s": (tokens - 1) / seconds, "graph_matches_generate": ids == expected})
    return report
