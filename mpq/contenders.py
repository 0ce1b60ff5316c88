"""What a user would pick instead of an mpq config, built by mpq itself so all are judged alike.

- the original model in fp32, bf16 or fp16;
- bitsandbytes LLM.int8 and NF4 through transformers (`pip install mpq-compiler[bnb]`);
- plans in mpq's own formats: uniform INT8 / INT4 (by any method), the folk rule "first and last
  blocks and the head in 16 bits, the rest INT4", and random per-layer assignments of a given size
  (what sensitivity must beat to be worth measuring).
Plans are plain data (layer -> format), run through the same QuantizedLinear modules and kernels
as mpq's configs.
"""

from __future__ import annotations

import importlib.util
import random

import torch

from mpq.float_twin import named_block_lists
from mpq.errors import MpqError
from mpq.models import DTYPES, LoadedModel, auto_class, load_model
from mpq.replay import block_of
from mpq.search import uniform_plan

BNB_MODES = ("int8", "nf4")


def load_original(name: str, dtype: str | None = None, bnb: str | None = None, device: str = "cpu") -> LoadedModel:
    """The model `name` as stored, cast to `dtype`, or quantised on load by bitsandbytes (`bnb`)."""
    if dtype is not None and dtype not in DTYPES:
        raise MpqError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if bnb is None:
        loaded = load_model(name, DTYPES[dtype] if dtype else "auto")
        loaded.model.to(device)
        return loaded
    return _load_bnb(name, bnb, device)


def _load_bnb(name: str, mode: str, device: str) -> LoadedModel:
    if mode not in BNB_MODES:
        raise MpqError(f"--bnb {mode!r}: use one of {', '.join(BNB_MODES)}")
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MpqError("bitsandbytes contenders need it installed: pip install 'mpq-compiler[bnb]'")
    plain = load_model(name)  # resolves demos and folders, and gives the tokenizer and task
    config = (BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    loader = auto_class(plain.task, plain.model.config)
    try:
        model = loader.from_pretrained(plain.path, quantization_config=config, device_map=device)
    except Exception as exc:
        raise MpqError(f"bitsandbytes {mode} cannot load {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=plain.tokenizer, task=plain.task, source=name, path=plain.path)


def first_last_plan(costs: dict[str, dict[str, int]], high: str, low: str, lists: list[str]) -> dict[str, str]:
    """The folk rule: layers of the first and last blocks of each list of blocks (a decoder's; an
    encoder's and a decoder's), and every layer outside the blocks (lm_head, a pooler), in `high`;
    the rest in `low` (a layer that cannot take a format keeps its largest, as in uniform_plan)."""
    def place(layer: str) -> tuple[str, int] | None:
        for name in lists:
            if layer.startswith(name + "."):
                return name, block_of(layer, name)
        return None

    where = {layer: place(layer) for layer in costs}
    edges: set[tuple[str, int]] = set()
    for name in lists:
        indices = [p[1] for p in where.values() if p is not None and p[0] == name]
        if indices:
            edges |= {(name, min(indices)), (name, max(indices))}
    highs, lows = uniform_plan(costs, high), uniform_plan(costs, low)
    return {layer: highs[layer] if p is None or p in edges else lows[layer] for layer, p in where.items()}


def rule_plan(model, costs: dict[str, dict[str, int]], high: str = "fp16", low: str = "int4-g128") -> dict[str, str]:
    return first_last_plan(costs, high, low, [name for name, _ in named_block_lists(model)])


def random_plans(costs: dict[str, dict[str, int]], target: int, count: int, seed: int = 0,
                 tied: list[list[str]] = (), tolerance: float = 0.02, fixed_bytes: int = 0) -> list[dict[str, str]]:
    """`count` random assignments of formats to layers whose bytes fall within `tolerance` below
    `target` (total bytes, `fixed_bytes` of untouched tensors included). Each starts from a uniformly
    random format per layer (per tied group, so the plan stays fusable), then random layers are
    stepped down while it is too large and up while it is too small and a step fits."""
    rng = random.Random(seed)
    members = {name: group for group in tied for name in group}
    units = sorted({tuple(members.get(layer, [layer])) for layer in costs})
    options = {unit: sorted(costs[unit[0]], key=costs[unit[0]].get) for unit in units}  # cheapest first
    unit_bytes = {unit: {fmt: sum(costs[layer][fmt] for layer in unit) for fmt in options[unit]} for unit in units}
    floor = fixed_bytes + sum(unit_bytes[u][options[u][0]] for u in units)
    if floor > target:
        raise ValueError(f"no plan fits in {target} bytes: the smallest takes {floor}")
    plans = []
    for _ in range(count):
        pick = {unit: rng.randrange(len(options[unit])) for unit in units}

        def total() -> int:
            return fixed_bytes + sum(unit_bytes[u][options[u][pick[u]]] for u in units)

        while total() > target:
            unit = rng.choice([u for u in units if pick[u] > 0])
            pick[unit] -= 1
        for _ in range(50 * len(units)):
            if total() >= target * (1 - tolerance):
                break
            unit = rng.choice(units)
            if pick[unit] + 1 < len(options[unit]):
                step = unit_bytes[unit][options[unit][pick[unit] + 1]] - unit_bytes[unit][options[unit][pick[unit]]]
                if total() + step <= target:
                    pick[unit] += 1
        plans.append({layer: options[unit][pick[unit]] for unit in units for layer in unit})
    return plans
