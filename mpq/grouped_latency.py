"""Latency of a mixture's experts where they decode grouped (CUDA, Triton, up to GROUPED_TOKENS tokens).

There a mixture does not run each routed expert as its own two launches (mpq.expert_stacks): each
projection runs one launch per format over every (token, expert) pair of the step, and the
loop's glue per expert (gathering its tokens, its gate, adding its output back, and the host
sync that finds which experts got tokens) is gone. A sum over experts, each timed as its own
launch, would count launches and glue that no longer happen. So mpq.latency.profile asks this
module for, per mixture:

- per projection and format, one grouped launch over the step's pairs timed twice: with the
  step's expected distinct experts routed to the stack (their weights read, from DRAM: the calls
  rotate over other experts) and with none (its fixed cost: the launch, its programs, x read,
  zeros written). A format's launch then costs fixed + per expert x the expected calls of its
  experts, and a format no expert takes costs nothing;
- the mixture's whole call, as the unquantised model runs it (the loop) and grouped (every expert
  in one format), each less its layers' time: the glue a grouped call saves. The unquantised step,
  and so the latency model's rest, paid the loop's glue; a plan that groups gets it back.

Measured once per shape (layer entries in the device's latency cache), like every other entry.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch import nn

from mpq.apply import QuantizedWeightCache, applied
from mpq.expert_stacks import GROUPED_TOKENS, ExpertStack
from mpq.formats import FormatSpec
from mpq.kernels import triton_supports
from mpq.latency import MAX_WORKING_SET, seconds_per_call
from mpq.quantize import quantize_weight

ROUTE_DRAWS = 8  # routes a mixture's timed calls rotate over, so that they read other experts each call


def groups_here(device: torch.device, tokens: int) -> bool:
    """Whether mixtures decode grouped on `device` for steps of `tokens` rows (mpq.expert_stacks)."""
    from mpq.qlinear import triton_available

    return (device.type == "cuda" and tokens <= GROUPED_TOKENS and triton_available()
            and os.environ.get("MPQ_KERNELS", "auto") in ("auto", "triton"))


def stackable(fmt: FormatSpec, in_features: int) -> bool:
    """Whether an expert layer in `fmt` runs in a grouped launch: 16-bit, or on a Triton kernel."""
    return not fmt.quantized or triton_supports(fmt, in_features)


@torch.no_grad()
def time_grouped_launch(n: int, k: int, fmt: FormatSpec, experts: int, pairs: int, active: int, dtype: torch.dtype,
                        device: torch.device, budget_s: float, working_set: int) -> list[float]:
    """[fixed, per expert] seconds of a grouped launch of `pairs` rows through a stack of [n, k]
    experts in `fmt`: timed with `active` distinct experts routed to (the pairs spread over them,
    sorted by expert as RoutedExperts sorts them), and with none (every row another stack's).

    The stack holds up to `experts` (the mixture's count) as far as `working_set` bytes allow, and
    the routed calls rotate over disjoint sets of `active` of them, so that a call reads experts
    the last ones did not leave in the cache. Routed calls come first: the launch's config is tuned
    on them, and the unrouted ones then run that config (one tuning key), not one tuned to do nothing."""
    per_expert = fmt.weight_bytes(n, k)
    held = max(active, min(experts, -(-min(working_set, MAX_WORKING_SET) // per_expert)))
    generator = torch.Generator(device).manual_seed(n * 31 + k)
    stored = [quantize_weight((torch.randn(n, k, generator=generator, device=device) * 0.02).to(dtype), fmt)
              for _ in range(held)]
    stack = ExpertStack(fmt, {name: torch.stack([t[name] for t in stored]) for name in stored[0]},
                        torch.cat([torch.arange(held, dtype=torch.int32), torch.tensor([-1], dtype=torch.int32)]).to(device),
                        None, None)
    del stored
    x = torch.randn(pairs, k, generator=generator, device=device).to(dtype)
    spread = torch.arange(pairs, device=device) * active // pairs  # pair -> one of `active` experts, sorted
    routed = itertools.cycle([spread + first for first in range(0, held - active + 1, active)])
    unrouted = torch.full((pairs,), held, device=device)  # id E: slot -1
    busy = seconds_per_call(lambda: stack.run(x, next(routed)), device, budget_s)
    idle = seconds_per_call(lambda: stack.run(x, unrouted), device, budget_s)
    return [idle, max(0.0, (busy - idle) / active)]


def decode_routes(mixture: nn.Module, tokens: int, dtype: torch.dtype, device: torch.device,
                  draws: int = ROUTE_DRAWS) -> list[tuple[tuple, torch.Tensor]]:
    """`draws` random decode calls of a RoutedExperts: (the call's arguments as its mixture hands
    them over, mpq.experts.RoutedExperts.routed_call; the top-k distinct experts of each token)."""
    generator = torch.Generator().manual_seed(tokens)
    hidden = mixture.expert(0).down_proj.out_features
    top_k = mixture.picks()
    routes = []
    for _ in range(draws):
        x = torch.randn(tokens, hidden, generator=generator).to(dtype)
        index = torch.stack([torch.randperm(mixture.num_experts, generator=generator)[:top_k] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(dtype)
        routes.append((mixture.routed_call(x.to(device), index.to(device), weights.to(device)), index))
    return routes


@torch.no_grad()
def glue_saved(model: nn.Module, path: str, stacks: list[list[str]], fmt: FormatSpec, launch: list[dict],
               original_seconds: dict[str, float], tokens: int, dtype: torch.dtype, device: torch.device,
               budget_s: float) -> float:
    """Seconds a grouped call of the mixture at `path` spends less than the loop outside its layers'
    launches: (loop call - its layers as timed alone) - (grouped call in `fmt` - its launches as
    `launch` predicts them). `original_seconds`: the model's own layers' times, as it holds them."""
    mixture = model.get_submodule(path)
    routes = decode_routes(mixture, tokens, dtype, device)
    touched = sum(index.unique().numel() for _, index in routes) / len(routes)
    turn = itertools.cycle([call for call, _ in routes])
    loop = seconds_per_call(lambda: mixture(*next(turn)), device, budget_s)
    loop_layers = touched * sum(original_seconds[stack[0]] for stack in stacks)
    with applied(model, {name: fmt for stack in stacks for name in stack}, QuantizedWeightCache(model)):
        if not mixture.runs_grouped():
            raise RuntimeError(f"{path} does not run grouped in {fmt.name}: cannot time its grouped call")
        grouped = seconds_per_call(lambda: mixture(*next(turn)), device, budget_s)
    grouped_launches = sum(seconds[fmt.name][0] + seconds[fmt.name][1] * touched for seconds in launch)
    # Neither call spends less than nothing outside its launches: a difference below 0 is timing noise.
    return max(0.0, loop - loop_layers) - max(0.0, grouped - grouped_launches)


def profile_mixtures(model: nn.Module, info: dict[str, list], formats: list[FormatSpec], tokens: int,
                     calls: dict[str, float], original_seconds: dict[str, float], dtype: torch.dtype, device: torch.device,
                     cache, budget_s: float, working_set: dict[str, int]) -> list[dict]:
    """Each RoutedExperts of `model` whose expert layers are all profiled (in `info`): its stacks
    (each projection's layer names, by expert), per stack the [fixed, per expert] seconds of each
    format's grouped launch, and the glue a grouped call saves (see the module's docstring).
    `calls`: each expert layer's expected calls a step; `original_seconds`: the model's own layers'
    times; `cache`: mpq.latency's entry cache; `working_set`: bytes per format (mpq.latency)."""
    from mpq.experts import RoutedExperts

    mixtures = []
    for path, module in model.named_modules():
        if not isinstance(module, RoutedExperts):
            continue
        experts = module.num_experts
        stacks = [[f"{path}.{e}.{projection}" for e in range(experts)] for projection in (module.expert(0).up_name, "down_proj")]
        if not all(name in info for stack in stacks for name in stack):
            continue  # experts the plan cannot hold (kept as stored): the loop, timed per layer
        top_k = module.picks()
        pairs = tokens * top_k
        active = min(pairs, experts, max(1, round(experts * calls.get(stacks[0][0], 1.0))))  # distinct experts a step
        launch = []
        for stack in stacks:
            n, k, _ = info[stack[0]]
            seconds = {}
            for fmt in formats:
                if not (fmt.fits(n, k, False) and stackable(fmt, k)):
                    continue
                key = (f"grouped|{fmt.name}|E{experts}|P{pairs}|active{active}|K{k}|N{n}|{dtype}"
                       f"|ws{working_set[fmt.name]}")
                seconds[fmt.name] = list(cache.get("entries", key, lambda: time_grouped_launch(
                    n, k, fmt, experts, pairs, active, dtype, device, budget_s, working_set[fmt.name])))
            launch.append(seconds)
        common = [fmt for fmt in formats if all(fmt.name in seconds for seconds in launch)]
        # the glue is timed in a quantised format where there is one: 16-bit experts alone group only on CUDA
        glue_format = next((fmt for fmt in common if fmt.quantized), common[0] if common else None)
        saved = 0.0
        if glue_format is not None:
            shapes = "+".join(f"{info[stack[0]][0]}x{info[stack[0]][1]}" for stack in stacks)
            key = f"mixture|{module.source_type}|E{experts}|top{top_k}|M{tokens}|{shapes}|{dtype}|{glue_format.name}"
            saved = cache.get("entries", key, lambda: glue_saved(
                model, path, stacks, glue_format, launch, original_seconds, tokens, dtype, device, budget_s))
        mixtures.append({"path": path, "stacks": stacks, "launch": launch, "glue_saved": saved})
    return mixtures
