"""Per-layer sensitivity: how much the output degrades when only one layer takes one format.

Signals:
- "kl": the model's own output divergence (KL of next-token distributions for causal LMs,
  1 - cosine of embeddings for encoders) with only that layer quantised: one calibration pass per
  (layer, format), linear in layers x formats x calibration tokens. A pass for a layer of block i
  replays blocks 0..i-1 from records instead of running them (mpq.replay: bit-identical).
- "local": the layer's own relative output error ||x (W - Wq)^T||^2 / ||x W^T||^2 on its
  calibration inputs (for an embedding table: over the rows its tokens look up), all layers and
  formats in one pass (hooks), blind to what follows the layer (and, for a head tied to the input
  table, to the table's share: "kl", "fisher" and "hessian" see both uses of the one weight).
- "fisher": 1/2 sum(F * (W - Wq)^2) with F the empirical Fisher diagonal (squared gradients of
  the next-token loss on the calibration text): one forward and one backward pass per batch,
  whatever the number of layers. An encoder has no loss with labels; near the original weights
  1 - cos(u, u0) is 1/2 |J dW|^2 (u the unit embedding, J its Jacobian), and for r ~ N(0, I)
  the gradient g of r . u has E[g^2] = diag(J^T J): one random probe per sentence, the same one
  forward and one backward pass per batch, and F = sum g^2 / sentences predicts 1 - cos itself.
- "hessian": as HAWQ-v2, 1/2 x the layer's mean Hessian diagonal (Hutchinson's trace estimate)
  x the squared rounding error: curvature per layer, not per weight. The loss is the next-token
  loss for causal LMs and 1 - cos to the original's embeddings for encoders.
The table is plain data (sensitivity.json), keyed by a content hash of model, data, formats and
signal, and reused whenever that key comes again.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from mpq.apply import QuantizedWeightCache, applied, get_module
from mpq.float_twin import float32_twin, upcasts_while_running
from mpq.formats import FormatSpec
from mpq.models import model_device, to_device
from mpq.qlinear import linear_weight
from mpq.quantize import sixteen_bit_dtype
from mpq.replay import BlockReplay, block_chain, check, record_pass, replay_depths
from mpq.tasks import quality_forward
from mpq.trace import LayerInfo

log = logging.getLogger(__name__)
VERSION = 4  # 2: measured in float32 (measurement_model); 3: tables clipped under gptq/awq; 4: tied heads are layers


@dataclass
class SensitivityTable:
    key: str
    metric: str  # "kl" or "1-cos"
    formats: list[str]
    layers: list[str]
    values: dict[str, dict[str, float]]  # layer -> format -> degradation (lower is better)
    calib: dict  # source, samples, seq_len, tokens
    seconds: float
    version: int = VERSION

    def save(self, path: Path) -> None:
        from mpq.io import write_json_atomic

        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "SensitivityTable":
        return cls(**json.loads(Path(path).read_text()))


def cache_dir() -> Path:
    from mpq.io import cache_root

    return cache_root() / "sensitivity"


def find_cached(key: str, *places: Path) -> SensitivityTable | None:
    for path in (*places, cache_dir() / f"{key}.json"):
        try:
            table = SensitivityTable.load(path)
        except (OSError, ValueError, TypeError):
            continue
        if table.key == key and table.version == VERSION:
            log.info("reusing sensitivity table %s", path)
            return table
    return None


def _lossless(module: nn.Module, fmt: FormatSpec) -> bool:
    """Keeping a 16-bit weight in its own dtype changes nothing: no pass needed."""
    dtype = linear_weight(module).dtype
    return not fmt.quantized and sixteen_bit_dtype(dtype) == dtype


@contextmanager
def layers_run(model: nn.Module, layers: list[LayerInfo]) -> Iterator[set[str]]:
    """The names of `layers` whose modules in `model` run within it (one pass over the
    calibration data tells which layers its sensitivities can measure at all)."""
    ran: set[str] = set()
    hooks = [get_module(model, layer.name).register_forward_pre_hook(lambda module, args, name=layer.name: ran.add(name))
             for layer in layers]
    try:
        yield ran
    finally:
        for hook in hooks:
            hook.remove()


def never_measured(layers: list[LayerInfo], ran: set[str]) -> list[str]:
    """Layers (not experts: the report counts those by expert) that the calibration data never
    ran: every format changes nothing there, so their sensitivity reads 0 whatever it would be."""
    return [layer.name for layer in layers if layer.name not in ran and layer.routed_share == 1.0]


MEASURE_BACKEND = "reference"  # float32 dequantise-and-multiply: no bf16 rounding in the measurement


def measurement_model(model: nn.Module, lazy: bool = True) -> nn.Module:
    """A float32 twin of the model to measure divergences in.

    In a bf16 model any change to any weight reshuffles bf16 roundings downstream, which alone
    costs about 1e-4 of KL on the demo, per layer and whatever the change: summed over 42 layers
    that floor outweighed the real INT8 error 15 to 1. In float32 the floor vanishes, so each
    layer's number is its quantisation error. Quantised tensors still come from the original
    weights (QuantizedWeightCache over `model`). `lazy`: the twin's blocks upcast the model's own
    tensors while they run (mpq.float_twin), so it holds no second copy of them; the gradient
    signals differentiate the twin's weights, and take a whole float32 copy (`lazy=False`) instead."""
    return float32_twin(model, lazy)


def _block_replay(work: nn.Module, layers: list[LayerInfo], task, reference) -> tuple[BlockReplay | None, dict[str, int]]:
    """A replay of `work`'s blocks for the per-layer passes (mpq.replay) and each layer's depth in
    it; None where it has no blocks or a replayed pass is not exactly a full one."""
    chain = block_chain(work, layers)
    if not chain:
        return None, {}
    device = model_device(work)
    record = record_pass(lambda batch: quality_forward(work, **to_device(batch, device)), task.calibration_inputs())
    replay = BlockReplay([blocks for _, blocks in chain], lambda: task.reference(work), record)
    return (replay, replay_depths(chain, layers)) if check(replay, reference) else (None, {})


def measure_sensitivity(model: nn.Module, work: nn.Module, layers: list[LayerInfo], formats: list[FormatSpec], task,
                        key: str, calib: dict, cache: QuantizedWeightCache, progress: bool = True, *,
                        replay_blocks: bool = True, reference: object = None) -> SensitivityTable:
    """Sensitivity of every (layer, format) of `model`, measured in its float32 twin `work`.
    `replay_blocks=False`: every pass runs every block (what block replay is checked and timed against).
    `reference`: `task.reference(work, held=True)` where the caller holds it already (compile does)."""
    start = time.time()
    reference = task.reference(work, held=True) if reference is None else reference
    replay, depths = _block_replay(work, layers, task, reference) if replay_blocks else (None, {})
    values: dict[str, dict[str, float]] = {}
    jobs = [(layer, fmt) for layer in layers for fmt in formats]
    for layer, fmt in tqdm(jobs, desc="sensitivity", disable=not progress, unit="pass"):
        module = get_module(model, layer.name)
        if not layer.takes(fmt):
            continue
        if _lossless(module, fmt):
            score = 0.0
        else:
            skipped = nullcontext() if replay is None else replay.skipping(depths[layer.name])
            # entered first: records it makes for a new depth come from the model with no layer quantised
            with skipped, applied(work, {layer.name: fmt}, cache, backend=MEASURE_BACKEND):
                score = task.divergence(work, reference)
        values.setdefault(layer.name, {})[fmt.name] = score
    return SensitivityTable(key=key, metric=task.metric, formats=[f.name for f in formats],
                            layers=[layer.name for layer in layers], values=values, calib=calib,
                            seconds=round(time.time() - start, 2))


def _rounding_errors(model: nn.Module, layer: LayerInfo, formats: list[FormatSpec], cache: QuantizedWeightCache
                     ) -> dict[str, torch.Tensor | None]:
    """W - dequant(Q(W)) in float32 for each format the layer can take; None where it is lossless."""
    from mpq.quantize import dequantize_weight

    module = get_module(model, layer.name)
    weight = linear_weight(module).float()
    return {fmt.name: None if _lossless(module, fmt) else weight - dequantize_weight(cache.get(layer.name, fmt), fmt)
            for fmt in formats if layer.takes(fmt)}


@torch.no_grad()
def measure_local(model: nn.Module, work: nn.Module, layers: list[LayerInfo], formats: list[FormatSpec], task,
                  key: str, calib: dict, cache: QuantizedWeightCache, progress: bool = True) -> SensitivityTable:
    """The "local" signal: each layer's relative output error per format, in one calibration pass."""
    start = time.time()
    errors: dict[str, dict[str, float]] = {}
    energy: dict[str, float] = {}
    hooks = []
    for layer in tqdm(layers, desc="local sensitivity", disable=not progress, unit="layer"):
        weight = linear_weight(get_module(work, layer.name)).float()
        rounding = _rounding_errors(model, layer, formats, cache)
        deltas = {name: delta for name, delta in rounding.items() if delta is not None}
        errors[layer.name] = {name: 0.0 for name in rounding}
        energy[layer.name] = 0.0

        def hook(module, inputs, output, name=layer.name, weight=weight, deltas=deltas, table=layer.is_embedding):
            if table:  # a lookup's output is the rows of its tokens; their error, the same rows of delta
                ids = inputs[0].reshape(-1)
                energy[name] += weight[ids].pow(2).sum().item()
                for fmt_name, delta in deltas.items():
                    errors[name][fmt_name] += delta[ids].pow(2).sum().item()
                return
            x = inputs[0].reshape(-1, weight.shape[1]).float()
            energy[name] += torch.nn.functional.linear(x, weight).pow(2).sum().item()
            for fmt_name, delta in deltas.items():
                errors[name][fmt_name] += torch.nn.functional.linear(x, delta).pow(2).sum().item()

        hooks.append(get_module(work, layer.name).register_forward_hook(hook))
    try:
        task.reference(work)  # one pass over the calibration data; the hooks do the measuring
    finally:
        for handle in hooks:
            handle.remove()
    values = {name: {fmt: err / max(energy[name], 1e-30) for fmt, err in per.items()} for name, per in errors.items()}
    return SensitivityTable(key=key, metric="local", formats=[f.name for f in formats],
                            layers=[layer.name for layer in layers], values=values, calib=calib,
                            seconds=round(time.time() - start, 2))


@contextmanager
def _differentiable(params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the weights take gradients; after it, as they were and with no grad left."""
    was = {name: param.requires_grad for name, param in params.items()}
    try:
        for param in params.values():
            param.requires_grad_(True)
        yield
    finally:
        for name, param in params.items():
            param.requires_grad_(was[name])
            param.grad = None


def _predicts_tokens(task) -> bool:
    return hasattr(task, "calib_ids")


def _calibration_batches(task) -> list:
    """The batches the second-order signals run: windows of token ids (causal and seq2seq LMs) or
    an encoder's tokenised sentence batches."""
    return list(task.calib_ids.split(8)) if _predicts_tokens(task) else task.calib_batches


def _fisher_losses(task, work: nn.Module, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One differentiable loss per calibration batch whose squared gradients sum to the signal's F
    (see the module's notes): the next-token loss, or an encoder's random projection r . u."""
    if _predicts_tokens(task):
        for ids in _calibration_batches(task):
            yield task.loss(work, ids)
        return
    sentences = sum(len(batch["input_ids"]) for batch in task.calib_batches)
    for batch in task.calib_batches:
        units = task.pooled(work, batch)
        probes = torch.randn(units.shape, generator=generator).to(units.device)
        yield (units * probes).sum() / sentences ** 0.5


def _hessian_losses(task, work: nn.Module) -> Iterator[torch.Tensor]:
    """Up to HESSIAN_BATCHES differentiable losses whose curvature the signal estimates."""
    if _predicts_tokens(task):
        for ids in _calibration_batches(task)[:HESSIAN_BATCHES]:
            yield task.loss(work, ids)
        return
    batches = task.calib_batches[:HESSIAN_BATCHES]
    reference = task.embeddings(work, batches)  # the original's, for the batches used only
    start = 0
    for batch in batches:
        units = task.pooled(work, batch)
        yield (1.0 - (units * reference[start:start + len(units)].to(units.device)).sum(-1)).mean()
        start += len(units)


def _differentiable_twin(model: nn.Module, work: nn.Module) -> nn.Module:
    """`work`, or a whole float32 copy where `work`'s blocks upcast while running: gradients of
    those upcasts would not reach the weights the signals read them from."""
    return measurement_model(model, lazy=False) if upcasts_while_running(work) else work


def measure_fisher(model: nn.Module, work: nn.Module, layers: list[LayerInfo], formats: list[FormatSpec], task,
                   key: str, calib: dict, cache: QuantizedWeightCache, progress: bool = True) -> SensitivityTable:
    """The "fisher" signal: second-order estimate of the loss increase from each layer's rounding."""
    work = _differentiable_twin(model, work)
    start = time.time()
    params = {layer.name: get_module(work, layer.name).weight for layer in layers}
    fisher = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in params.items()}
    generator = torch.Generator().manual_seed(0)
    batches = len(_calibration_batches(task))
    with _differentiable(params):
        for loss in tqdm(_fisher_losses(task, work, generator), total=batches, desc="fisher sensitivity",
                         disable=not progress, unit="batch"):
            work.zero_grad(set_to_none=True)
            loss.backward()
            for name, param in params.items():
                if param.grad is not None:  # None: a layer the output does not use (BERT's pooler, for mean pooling)
                    fisher[name] += param.grad.float().pow(2)
    values: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for layer in layers:
            module = get_module(model, layer.name)
            weight_fisher = fisher[layer.name]
            if type(module).__name__ == "Conv1D":  # its parameter is [in, out]; formats see [out, in]
                weight_fisher = weight_fisher.t()
            values[layer.name] = {name: 0.0 if delta is None else 0.5 * float((weight_fisher * delta.pow(2)).sum())
                                  for name, delta in _rounding_errors(model, layer, formats, cache).items()}
    return SensitivityTable(key=key, metric="fisher", formats=[f.name for f in formats],
                            layers=[layer.name for layer in layers], values=values, calib=calib,
                            seconds=round(time.time() - start, 2))


HUTCHINSON_PROBES = 4
HESSIAN_BATCHES = 4


def hutchinson_traces(loss: torch.Tensor, params: list[torch.Tensor], probes: int, generator: torch.Generator) -> list[float]:
    """Estimates of tr(d2 loss / d p2) for each parameter p: the mean of v^T H v over Rademacher
    probes v, each H v a second backward pass through the gradient."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None]  # a parameter the loss does not use has no curvature
    traces = [0.0] * len(params)
    for probe in range(probes):
        vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
        dot = sum((grads[i] * vs[i]).sum() for i in used)
        hvps = torch.autograd.grad(dot, [params[i] for i in used], retain_graph=probe < probes - 1, allow_unused=True)
        for i, hv in zip(used, hvps):
            if hv is not None:
                traces[i] += float((hv * vs[i]).sum()) / probes
    return traces


def measure_hessian(model: nn.Module, work: nn.Module, layers: list[LayerInfo], formats: list[FormatSpec], task,
                    key: str, calib: dict, cache: QuantizedWeightCache, progress: bool = True) -> SensitivityTable:
    """The "hessian" signal (HAWQ-v2): 1/2 x mean Hessian diagonal of the loss in each layer's weight
    x the squared rounding error, the trace estimated by Hutchinson's method (E[v^T H v] over
    Rademacher v; one Hessian-vector product, a second backward pass, per probe)."""
    work = _differentiable_twin(model, work)
    start = time.time()
    params = {layer.name: get_module(work, layer.name).weight for layer in layers}
    traces = {name: 0.0 for name in params}
    generator = torch.Generator().manual_seed(0)
    batches = min(HESSIAN_BATCHES, len(_calibration_batches(task)))
    # the fused attention kernels have no second derivative; the plain math one does
    with _differentiable(params), sdpa_kernel(SDPBackend.MATH):
        for loss in tqdm(_hessian_losses(task, work), total=batches, desc="hessian sensitivity", disable=not progress,
                         unit="batch"):
            estimates = hutchinson_traces(loss, list(params.values()), HUTCHINSON_PROBES, generator)
            for name, trace in zip(params, estimates):
                traces[name] += trace / batches
    values: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for layer in layers:
            # a trace estimate can come out negative (a saddle, or noise); curvature below 0 is no safety
            mean_diagonal = max(traces[layer.name], 0.0) / params[layer.name].numel()
            values[layer.name] = {name: 0.0 if delta is None else 0.5 * mean_diagonal * float(delta.pow(2).sum())
                                  for name, delta in _rounding_errors(model, layer, formats, cache).items()}
    return SensitivityTable(key=key, metric="hessian", formats=[f.name for f in formats],
                            layers=[layer.name for layer in layers], values=values, calib=calib,
                            seconds=round(time.time() - start, 2))


MEASURES = {"kl": measure_sensitivity, "local": measure_local, "fisher": measure_fisher,
            "hessian": measure_hessian}  # signal -> measure
SIGNALS = tuple(MEASURES)
