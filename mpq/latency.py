"""Latency model: each layer's measured kernel time in each format, plus the rest of the model.

`profile` times, on the machine at hand and through the very modules an emitted model runs
(QuantizedLinear and fused groups, built by apply.build_layers: Triton on CUDA, torch's CPU
kernels on the CPU), every layer shape x format at the regime's token count M (decode: M = batch;
prefill: M = batch x sequence), each fusable group of layers that share an input fused as well,
and the unquantised model's whole step once. The rest of the model (attention, norms,
embeddings, the head, Python) is that step less its layers' times as the model holds them
(its own dtype: float32 layers of a float32 model, not their 16-bit copies). A plan's predicted
step time is the rest plus its layers' (or fused groups') times. An input embedding table that the
plan quantises is timed as what it is, a lookup of M rows. Layer entries are cached per
device and shape; the whole latency model by a content hash (model, regime, formats, device),
so a second compile of the model, at any budget, measures nothing again.

Which format is fast is measured, not assumed: on a memory-bound decode step INT4 reads a quarter
of the bytes, while in a compute-bound prefill the dequantisation can make it slower than 16 bits.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from mpq.apply import build_layers
from mpq.environment import hardware
from mpq.errors import MpqError
from mpq.formats import FormatSpec, get_format
from mpq.fusion import fusion_groups
from mpq.io import cache_root, write_json_atomic
from mpq.kv_cache import encode, forward_with_cache
from mpq.memory import float_dtype_of
from mpq.models import GENERATIVE, SEQ2SEQ_LM, model_device
from mpq.quantize import quantize_weight
from mpq.trace import LayerInfo

log = logging.getLogger(__name__)
VERSION = 5  # 2: the rest is split off with the original layers' times, not 16-bit ones; 3: profiles timed
# on a busy machine (layers alone outlasting the step) are re-timed, and version-2 caches may hold such;
# 4: mixtures that decode grouped (CUDA) are predicted as grouped launches (mpq.grouped_latency);
# 5: each layer counts as often as a real step calls it (a seq2seq decode step: no encoder layer)
REGIMES = ("decode", "prefill")
MAX_WORKING_SET = 256 * 2**20  # beyond any last-level cache (CPU L3, GPU L2)
MAX_COPIES = 512
ORIGINAL = "original"  # pseudo-format of the layer as the unquantised model holds it


@dataclass(frozen=True)
class Regime:
    """What one timed step is. decode: one new token per sequence with `length` tokens in the KV
    cache; prefill: `length` tokens per sequence at once (for encoders: one forward pass)."""

    kind: str = "decode"
    batch: int = 1
    length: int = 128

    @property
    def tokens(self) -> int:
        """Rows M of every layer's matmul in this regime."""
        return self.batch if self.kind == "decode" else self.batch * self.length

    def describe(self) -> str:
        if self.kind == "decode":
            return f"decode step, batch {self.batch}, {self.length} tokens in the KV cache (M = {self.tokens})"
        return f"prefill, batch {self.batch} x {self.length} tokens (M = {self.tokens})"


def make_regime(kind: str | None, batch: int, length: int, task: str, max_positions: int | None = None) -> Regime:
    """The regime the user asked for, checked; default decode for causal LMs, prefill for encoders."""
    kind = kind or ("decode" if task in GENERATIVE else "prefill")
    if kind not in REGIMES:
        raise MpqError(f"--regime {kind!r} is not one of {', '.join(REGIMES)}")
    if kind == "decode" and task not in GENERATIVE:
        raise MpqError("--regime decode needs a causal or seq2seq LM: an encoder has no decode step; use --regime prefill")
    if batch < 1 or length < 1:
        raise MpqError(f"--batch and --length must be at least 1 (got {batch}, {length})")
    if max_positions is not None and length + 1 > max_positions:
        raise MpqError(f"--length {length} exceeds the model's {max_positions} positions: give a smaller --length")
    return Regime(kind, batch, length)


def parse_seconds(text: str | float) -> float:
    """'25ms', '800us', '0.02s' or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    raw = text.strip().lower()
    for suffix, scale in (("us", 1e-6), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if raw.endswith(suffix):
            raw, factor = raw[: -len(suffix)], scale
            break
    else:
        factor = 1.0
    try:
        value = float(raw) * factor
    except ValueError:
        raise MpqError(f"cannot read the time {text!r}: write it like 25ms, 800us or 0.02s") from None
    if value <= 0:
        raise MpqError(f"a latency limit must be positive, got {text!r}")
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device | str = "cpu", budget_s: float = 0.12, samples: int = 9) -> float:
    """Seconds of one call of `fn`: the least of `samples` timings, each the mean of enough
    back-to-back calls to fill budget_s / samples, after warm-up (caches, autotuning, the
    allocator). The least, not the median: on a shared machine other work only ever adds time."""
    device = torch.device(device)
    # Warm-up, by time rather than by count: the first calls of a new shape pay for kernel
    # selection, allocations and thread wake-up, and on the CPU that lasted longer than 2 calls.
    begin, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - begin < budget_s / 4:
        fn()
        calls += 1
    _sync(device)
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < budget_s / samples:
        fn()
        calls += 1
        if device.type == "cuda" and calls % 8 == 0:
            _sync(device)
    _sync(device)
    per_sample = max(1, round(calls * (budget_s / samples) / (time.perf_counter() - start)))
    times = []
    for _ in range(samples):
        _sync(device)
        begin = time.perf_counter()
        for _ in range(per_sample):
            fn()
        _sync(device)
        times.append((time.perf_counter() - begin) / per_sample)
    return min(times)


def device_signature(device: torch.device | str) -> str:
    """What a measured time depends on besides the shape: the processor (or GPU), threads, torch,
    and on the CPU from how many tokens a layer leaves torch's kernel (or, for the 16-bit dtypes
    that MPQ_CPU_MATMUL routes, its 16-bit GEMM) for float32 tiles."""
    signature = f"{hardware()} | {torch.device(device).type} | torch {torch.__version__}"
    if torch.device(device).type == "cpu":
        from mpq.cpu_matmul import SIXTEEN_BIT, routes
        from mpq.kernels.cpu import DENSE_FLOAT32_FROM_TOKENS, float32_from_tokens
        from mpq.kernels.cpu_thresholds import describe

        tiles = [f"int{bits} M={describe(float32_from_tokens(bits))}" for bits in (4, 8)]
        tiles += [f"{dtype} M={DENSE_FLOAT32_FROM_TOKENS}" for dtype in SIXTEEN_BIT if routes(dtype)]
        signature += " | float32 tiles from " + ", ".join(tiles)
    return signature


@torch.no_grad()
def _random_inputs(model: nn.Module, regime: Regime, device: torch.device) -> torch.Tensor:
    vocab = getattr(model.config, "vocab_size", 1000)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (regime.batch, regime.length), generator=generator).to(device)


def model_step(model: nn.Module, task: str, regime: Regime):
    """A callable that runs one step of `regime` on `model` (the thing whose time is predicted).
    A seq2seq LM's source and target are both `length` tokens: its prefill runs the encoder on the
    source and the decoder on the target (every layer at M = batch x length); its decode step is
    one decoder token, the encoder's outputs and the cross-attention's keys and values cached."""
    device = model_device(model)
    ids = _random_inputs(model, regime, device)
    if task not in GENERATIVE:
        mask = torch.ones_like(ids)
        return lambda: model(input_ids=ids, attention_mask=mask)
    seq2seq = task == SEQ2SEQ_LM
    if regime.kind == "prefill":
        if seq2seq:
            return lambda: model(input_ids=ids, decoder_input_ids=ids, use_cache=False)
        return lambda: model(input_ids=ids, use_cache=False)
    with torch.no_grad():
        encoded = encode(model, ids) if seq2seq else None
        _, past = forward_with_cache(model, ids, encoder_outputs=encoded)
    if hasattr(past, "activate_past_recording"):
        # a sliding-window layer past its window (Gemma 2-4, Mistral) keeps the states it drops
        # until the crop, so that the crop can take the new token back out
        past.activate_past_recording()
    token = ids[:, -1:]

    def step() -> None:
        forward_with_cache(model, token, past, encoder_outputs=encoded)
        past.crop(-1)  # drop the new token: every step sees `length` cached tokens

    return step


@torch.no_grad()
def calls_per_step(model: nn.Module, task: str, regime: Regime, names: list[str]) -> dict[str, int]:
    """How often each of the layers `names` runs in one step, counted on a real step: a seq2seq
    LM's decode step runs no encoder layer, nor the cross-attention's key and value projections
    (cached from the first step); a layer a model calls from several places runs more than once."""
    step = model_step(model, task, regime)
    counts = dict.fromkeys(names, 0)
    hooks = [model.get_submodule(name).register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
             for name in names]
    try:
        step()
    finally:
        for hook in hooks:
            hook.remove()
    return counts


@torch.no_grad()
def measure_step(model: nn.Module, task: str, regime: Regime, budget_s: float = 0.6) -> float:
    """Measured seconds of one step of `regime` on `model` as it is (quantised or not)."""
    return seconds_per_call(model_step(model, task, regime), model_device(model), budget_s)


def _entry_key(sizes: tuple[int, ...], in_features: int, fmt: str, tokens: int, bias: bool, dtype: torch.dtype,
               fused: bool, working_set: int) -> str:
    parts = "+".join(str(s) for s in sizes)
    return (f"{fmt}|M{tokens}|K{in_features}|N{parts}|{'fused' if fused else 'apart'}|{'bias' if bias else 'nobias'}"
            f"|{dtype}|ws{working_set}")


@torch.no_grad()
def time_layers(sizes: tuple[int, ...], in_features: int, fmt: FormatSpec, tokens: int, bias: bool,
                dtype: torch.dtype, device: torch.device, fused: bool, budget_s: float, working_set: int,
                original: bool = False) -> float:
    """Seconds to run layers of these output sizes on one input, as an emitted model runs them:
    one fused launch where `fused` (and the kernels allow), else one call each.

    In a model step every other layer's weights pass through the caches between two calls of one
    layer, so its weights are read cold-ish. Timed alone, a layer would find them hot and look
    compute-bound. So the calls rotate over copies of the layer that together fill `working_set`
    bytes (the model's size in this format), as a GPU benchmark flushes L2 between calls.
    `original`: the unquantised layer as the model holds it (its own dtype, whatever `fmt`)."""
    generator = torch.Generator().manual_seed(len(sizes) * 7919 + in_features)
    names = [f"l{i}" for i in range(len(sizes))]
    tensors, biases = {}, {}
    for name, size in zip(names, sizes):
        weight = (torch.randn(size, in_features, generator=generator) * 0.02).to(dtype)
        stored = {"weight": weight} if original else quantize_weight(weight, fmt)
        tensors[name] = {k: v.to(device) for k, v in stored.items()}
        biases[name] = torch.randn(size, generator=generator).to(dtype).to(device) if bias else None
    unit_bytes = sum(size * in_features * dtype.itemsize if original else fmt.weight_bytes(size, in_features)
                     for size in sizes)
    copies = max(1, min(MAX_COPIES, -(-min(working_set, MAX_WORKING_SET) // unit_bytes)))
    rotation = []
    for _ in range(copies):
        cloned = {n: {k: v.clone() for k, v in t.items()} for n, t in tensors.items()}
        layers = build_layers({n: fmt for n in names}, cloned, biases, {n: in_features for n in names},
                              [names] if fused and len(names) > 1 else [], device=device)
        rotation.append([layers[n] for n in names])
    x = (torch.randn(tokens, in_features, generator=generator)).to(dtype).to(device)
    turn = itertools.cycle(rotation)
    return seconds_per_call(lambda: [m(x) for m in next(turn)], device, budget_s)


@torch.no_grad()
def time_embedding(rows: int, dim: int, fmt: FormatSpec, tokens: int, dtype: torch.dtype, device: torch.device,
                   budget_s: float, original: bool = False) -> float:
    """Seconds to look up `tokens` random rows of a table, as an emitted model does (QuantizedEmbedding),
    or as the model holds it (`original`: nn.Embedding in its own dtype). A lookup reads a few rows,
    not the table, so there is no working set to rotate through."""
    from mpq.apply import build_layers

    generator = torch.Generator().manual_seed(rows * 31 + dim)
    table = (torch.randn(rows, dim, generator=generator) * 0.02).to(dtype)
    ids = torch.randint(0, rows, (tokens,), generator=generator).to(device)
    if original:
        layer = nn.Embedding(rows, dim, _weight=table).to(device)
    else:
        hot_ids = torch.arange(min(fmt.hot_rows, rows), dtype=torch.int32)  # which rows changes no timing
        tensors = {k: v.to(device) for k, v in quantize_weight(table, fmt, hot_ids=hot_ids if fmt.hot_rows else None).items()}
        layer = build_layers({"table": fmt}, {"table": tensors}, {"table": None}, {"table": dim},
                             device=device, embeddings={"table": dtype})["table"]
    return seconds_per_call(lambda: layer(ids), device, budget_s)


def mixture_seconds(mixture: dict, planned: dict[str, str], stack_of: dict[str, tuple[int, int]],
                    calls: dict[str, float]) -> float | None:
    """Predicted seconds of a mixture's `planned` expert layers (name -> format) where their formats
    all have a grouped launch (LatencyModel.mixtures); None where one has not (that layer's mixture
    takes the loop, timed per layer). `stack_of`: layer -> (mixture, projection).

    A plan of the whole mixture pays each format's launch once per projection, whatever share of
    the experts takes it, and gets the glue back. A plan of a part (one of the search's units)
    pays its layers' share of their launches and of the glue, so that units that take one format
    add up to the whole mixture in that format."""
    stacks, launch = mixture["stacks"], mixture["launch"]
    if any(fmt not in launch[stack_of[name][1]] for name, fmt in planned.items()):
        return None
    size = sum(len(stack) for stack in stacks)
    whole = len(planned) == size
    total = -mixture["glue_saved"] * len(planned) / size
    launched: set[tuple[int, str]] = set()
    for name, fmt in planned.items():
        s = stack_of[name][1]
        fixed, per_expert = launch[s][fmt]
        total += per_expert * calls.get(name, 1.0)
        if whole:
            launched.add((s, fmt))
        else:
            total += fixed / len(stacks[s])
    return total + sum(launch[s][fmt][0] for s, fmt in launched)


@dataclass
class LatencyModel:
    """Plain data (OUT/latency.json): per-layer and per-fused-group seconds and the model's rest."""

    regime: dict
    device: str
    layers: dict[str, list]  # layer -> [out_features, in_features, has_bias] (an embedding: [rows, dim, False])
    groups: list[list[str]]  # layers that share an input (fusable when they take one format)
    layer_seconds: dict[str, dict[str, float]]  # layer -> format -> seconds, run alone
    group_seconds: dict[str, dict[str, float]]  # "a|b" (a subset of a group) -> format -> seconds, fused
    baseline_seconds: float  # the unquantised model's step, measured
    rest_seconds: float  # the step less its layers' 16-bit times
    profile_seconds: float = 0.0
    reused: bool = False  # every number came from caches: nothing was timed this time
    key: str = ""  # content hash of model, regime, formats, groups, device and layers (see profile_key)
    notes: list[str] = field(default_factory=list)
    version: int = VERSION
    tables: list[str] = field(default_factory=list)  # the layers that are embedding lookups, not matmuls
    consistent: bool = True  # the layers alone took no longer than the whole step (else not cached: see profile)
    calls: dict[str, float] = field(default_factory=dict)  # a layer -> its calls per step where not 1: an expert of a
    # mixture its expected calls (see routed_calls); a seq2seq LM's encoder layers 0 in a decode step (calls_per_step)
    # Mixtures that decode grouped on this device (mpq.grouped_latency): each {"path", "stacks": a list of
    # layer names per projection, "launch": per projection, format -> [fixed, per expert] seconds of its
    # grouped launch, "glue_saved": seconds a grouped call spends less than the loop outside its launches}
    mixtures: list[dict] = field(default_factory=list)

    @cached_property
    def _has_bias(self) -> dict[str, bool]:  # once, not per call: the search asks for thousands of plans
        return {name: bool(info[2]) for name, info in self.layers.items()}

    @cached_property
    def _stack_of(self) -> dict[str, tuple[int, int]]:  # an expert layer -> (its mixture, its projection)
        return {name: (m, s) for m, mixture in enumerate(self.mixtures)
                for s, stack in enumerate(mixture["stacks"]) for name in stack}

    def _grouped_seconds(self, plan: dict[str, str]) -> tuple[float, set[str]]:
        """Seconds of the planned expert layers that the plan's formats let decode grouped, and those layers."""
        by_mixture: dict[int, dict[str, str]] = {}
        for name, fmt in plan.items():
            where = self._stack_of.get(name)
            if where is not None:
                by_mixture.setdefault(where[0], {})[name] = fmt
        total, done = 0.0, set()
        for m, planned in by_mixture.items():
            seconds = mixture_seconds(self.mixtures[m], planned, self._stack_of, self.calls)
            if seconds is not None:
                total += seconds
                done.update(planned)
        return total, done

    def layers_seconds(self, plan: dict[str, str]) -> float:
        """Seconds of the planned layers alone, fused as an emitted model fuses them, a mixture's
        experts grouped where they decode grouped."""
        total, done = self._grouped_seconds(plan) if self.mixtures else (0.0, set())
        for names in fusion_groups(plan, self.groups, self._has_bias):  # members run together, as often as the first
            total += self.group_seconds["|".join(names)][plan[names[0]]] * self.calls.get(names[0], 1.0)
            done.update(names)
        return total + sum(self.layer_seconds[name][fmt] * self.calls.get(name, 1.0)
                           for name, fmt in plan.items() if name not in done)

    def predict(self, plan: dict[str, str]) -> float:
        """Predicted seconds of one step of the whole model under `plan`."""
        return self.rest_seconds + self.layers_seconds(plan)

    def speedup(self, plan: dict[str, str]) -> float:
        return self.baseline_seconds / self.predict(plan)

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "LatencyModel":
        return cls(**json.loads(Path(path).read_text()))


def profile_key(model_key: str, regime: Regime, formats: list[FormatSpec], groups: list[list[str]],
                device: torch.device | str, layers: list[str]) -> str:
    from mpq.fingerprint import data_fingerprint

    return data_fingerprint(model_key, asdict(regime), [f.name for f in formats], groups, device_signature(device),
                            VERSION, layers)


def models_dir() -> Path:
    return cache_root() / "latency" / "models"


def find_profile(key: str, *places: Path) -> LatencyModel | None:
    """A latency model measured before for this key (in OUT or the cache), so that a rerun or another
    budget predicts with the very same numbers and a resumed study stays the same problem; never
    one whose layers took longer than its whole step (timed on a busy machine: measured again)."""
    for path in (*places, models_dir() / f"{key}.json"):
        try:
            found = LatencyModel.load(path)
        except (OSError, ValueError, TypeError):
            continue
        if found.key == key and found.version == VERSION and found.consistent:
            found.reused = True
            return found
    return None


# Layers timed alone that sum to more than this many whole-model steps were timed on a busy machine.
INCONSISTENT = 1.2


class _EntryCache:
    """Measured layer times per device, by shape, format, token count and working set."""

    def __init__(self, device: torch.device, use_cache: bool) -> None:
        self.signature = device_signature(device)
        digest = hashlib.sha256(self.signature.encode()).hexdigest()[:16]
        self.path = cache_root() / "latency" / f"{digest}.json"
        self.data = {"device": self.signature, "version": VERSION, "entries": {}}
        if use_cache:
            try:
                cached = json.loads(self.path.read_text())
                if cached.get("device") == self.signature and cached.get("version") == VERSION:
                    self.data = cached
            except (OSError, ValueError):
                pass
        self.hits = self.misses = 0
        self.refresh = False  # time every entry again (once: see time_again), replacing what the cache holds
        self._timed: set[tuple[str, str]] = set()  # the entries timed since time_again

    def get(self, table: str, key: str, measure):
        if key in self.data[table] and (not self.refresh or (table, key) in self._timed):
            self.hits += 1
            return self.data[table][key]
        self.misses += 1
        value = measure()
        self.data[table][key] = value
        self._timed.add((table, key))
        return value

    def time_again(self) -> None:
        """From now on, time each entry asked for once more, whatever the cache holds (a layer shape
        that several layers share: once, not once per layer)."""
        self.refresh = True
        self._timed.clear()

    def save(self) -> None:
        try:
            write_json_atomic(self.path, self.data)
        except OSError as exc:  # a read-only home still profiles; only reuse is lost
            log.warning("cannot write the latency cache (%s)", exc)


def _head_bytes(model: nn.Module, layers: dict) -> int:
    """Bytes of the output head's weight (an LM's vocabulary projection, often tied) when it is
    not one of the quantisable layers, else 0."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or any(model.get_submodule(name) is head for name in layers):
        return 0
    return weight.numel() * weight.element_size()


def _subsets(group: list[str]) -> list[list[str]]:
    return [list(c) for size in range(2, len(group) + 1) for c in itertools.combinations(group, size)]


@torch.no_grad()
def routed_calls(share: float, tokens: int) -> tuple[float, int]:
    """An expert that gets `share` of a step's `tokens` (top_k / experts), routed independently:
    its expected calls per step (the chance any token picks it) and the tokens of a call (those
    it gets, given it is called). Decode at batch 1: `share` calls of 1 token."""
    calls = 1.0 - (1.0 - share) ** tokens
    return calls, max(1, round(share * tokens / calls))


def profile(model: nn.Module, task: str, layers: list[LayerInfo], formats: list[FormatSpec], regime: Regime,
            groups: list[list[str]], use_cache: bool = True, budget_s: float = 0.12,
            progress: bool = False, key: str = "") -> LatencyModel:
    """Measure the latency model of `model` in `regime` on the device the model is on."""
    from tqdm import tqdm

    start = time.time()
    device = model_device(model)
    cache = _EntryCache(device, use_cache)
    dtype = float_dtype_of(model)
    info = {layer.name: [layer.out_features, layer.in_features, layer.has_bias] for layer in layers}
    tables = {layer.name for layer in layers if layer.is_embedding}
    # the weight bytes one step reads, were every layer in one format (see time_layers): the
    # quantisable matmuls' own and the output head's (not an embedding table's: a step reads a few
    # of its rows); "original": the layers as the model holds them, in their own dtype
    head = _head_bytes(model, info)
    matmuls = [shape for name, shape in info.items() if name not in tables]
    working_set = {fmt.name: head + sum(fmt.weight_bytes(n, k) if fmt.supports(n, k) else n * k * dtype.itemsize
                                        for n, k, _ in matmuls) for fmt in formats}
    working_set[ORIGINAL] = head + sum(n * k * dtype.itemsize for n, k, _ in matmuls)
    working_set = {name: -(-ws // 2**20) * 2**20 for name, ws in working_set.items()}  # whole MiB: stable keys
    # One job per (layer or fusable subset of a group, format): where its seconds go, and what to time.
    # Layers of one shape share their cache entry, so each distinct shape is timed once.
    layer_seconds: dict[str, dict[str, float]] = {name: {} for name in info}
    group_seconds: dict[str, dict[str, float]] = {}
    original_seconds: dict[str, float] = {}
    # the experts of a mixture: each runs on its share of the tokens, on some steps only
    routed = {layer.name: routed_calls(layer.routed_share, regime.tokens) for layer in layers if layer.routed_share < 1.0}
    jobs: list[tuple[dict, str, tuple[int, ...], int, FormatSpec | None, bool, bool, bool, int]] = []
    for name, (n, k, bias) in info.items():
        table = name in tables
        tokens = routed[name][1] if name in routed else regime.tokens
        jobs += [(layer_seconds[name], fmt.name, (n,), k, fmt, bias, False, table, tokens) for fmt in formats
                 if fmt.fits(n, k, table)]
        jobs.append((original_seconds, name, (n,), k, None, bias, False, table, tokens))  # None: as the model holds it
    for group in groups:
        for names in _subsets(group):
            if len({info[n][2] for n in names}) > 1:
                continue  # a biased and an unbiased layer never fuse
            sizes, (_, k, bias) = tuple(info[n][0] for n in names), info[names[0]]
            target = group_seconds.setdefault("|".join(names), {})
            jobs += [(target, fmt.name, sizes, k, fmt, bias, True, False, regime.tokens) for fmt in formats
                     if all(fmt.fits(info[n][0], info[n][1], False) for n in names)]

    def time_jobs() -> None:
        for target, slot, sizes, k, fmt, bias, fused, table, tokens in tqdm(jobs, desc="profile", disable=not progress,
                                                                            unit="entry"):
            fmt_name = ORIGINAL if fmt is None else fmt.name
            if table:
                entry_key = f"embedding|{fmt_name}|M{regime.tokens}|rows{sizes[0]}|dim{k}|{dtype}"
                target[slot] = cache.get("entries", entry_key, lambda: time_embedding(
                    sizes[0], k, fmt or get_format("fp16"), regime.tokens, dtype, device, budget_s, original=fmt is None))
                continue
            ws = working_set[fmt_name]
            entry_key = _entry_key(sizes, k, fmt_name, tokens, bias, dtype, fused, ws)
            target[slot] = cache.get("entries", entry_key, lambda: time_layers(
                sizes, k, fmt or get_format("fp16"), tokens, bias, dtype, device, fused, budget_s, ws,
                original=fmt is None))

    calls = {name: expected for name, (expected, _) in routed.items()}
    # every other layer as often as a real step runs it: once, for most
    counted = calls_per_step(model, task, regime, [name for name in info if name not in routed])
    calls.update({name: float(count) for name, count in counted.items() if count != 1})

    def layers_alone() -> float:  # the model's own layers' seconds in a step, each as often as it runs
        return sum(t * calls.get(name, 1.0) for name, t in original_seconds.items())

    time_jobs()
    # Timed afresh on every profile (the caller keeps the whole model by key): on a shared machine
    # the speed of the moment drifts by more than the 15% the predictions aim at.
    baseline = measure_step(model, task, regime, budget_s=1.0)
    original = layers_alone()
    notes = []
    if original > INCONSISTENT * baseline:
        # The model's own layers, timed alone, cannot take longer than the whole step: the times
        # were taken while something else loaded the machine (now or, for cached entries, when
        # they were measured). Time every entry again, so that no stale entry stays in the cache.
        notes.append(f"the layers timed alone ({original * 1e3:.3f} ms) took longer than the "
                     f"whole model's step ({baseline * 1e3:.3f} ms), so every layer was timed again")
        cache.time_again()
        time_jobs()
        baseline = measure_step(model, task, regime, budget_s=1.0)
        original = layers_alone()
    from mpq import grouped_latency  # it imports this module: not at the top

    mixtures = []
    if grouped_latency.groups_here(device, regime.tokens):
        mixtures = grouped_latency.profile_mixtures(model, info, formats, regime.tokens, calls, original_seconds, dtype,
                                                    device, cache, budget_s, working_set)
        if mixtures:
            saved = sum(mixture["glue_saved"] for mixture in mixtures)
            notes.append(f"{len(mixtures)} mixtures decode grouped here (one launch per projection and format): their "
                         f"experts are predicted so, and the {saved * 1e3:.3f} ms a step the loop spent outside its "
                         "launches comes off where a plan groups them")
    cache.save()
    rest = baseline - original
    consistent = rest >= 0
    if not consistent:
        notes.append(f"the layers timed alone ({original * 1e3:.3f} ms) took longer than the whole model's step "
                     f"({baseline * 1e3:.3f} ms): the rest is taken as 0, so predictions run high; this profile "
                     "is not kept (a busy machine?), so the next compile times it again")
        rest = 0.0
    return LatencyModel(regime=asdict(regime), device=cache.signature, layers=info, groups=[list(g) for g in groups],
                        layer_seconds=layer_seconds, group_seconds=group_seconds, baseline_seconds=baseline,
                        rest_seconds=rest, profile_seconds=round(time.time() - start, 2),
                        reused=cache.misses == 0, notes=notes, key=key, tables=sorted(tables), consistent=consistent,
                        calls=calls, mixtures=mixtures)


def measure_plans(model: nn.Module, task: str, regime: Regime, runs: list, rounds: int = 3) -> list[float]:
    """Measured step seconds of each of `runs` (context managers that put a plan into `model`):
    `rounds` passes over all of them, the least per plan, so a burst of other work on the machine
    during one pass does not count against one plan."""
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            with run():
                best[i] = min(best[i], measure_step(model, task, regime, budget_s=0.3))
    return best
