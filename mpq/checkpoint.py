"""Save a quantised model as a config folder, and load it back (`mpq.load`).

A folder holds model.safetensors (packed integers, scales, zeros, and every other tensor of the
model, non-persistent buffers included, so the loaded model is the measured model), the model's
config and tokenizer files, and mpq.json (plan, card, sha256 of the weights). Loading reads
safetensors and JSON only, never pickles, and refuses a folder whose weights do not match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from mpq.card import card_markdown
from mpq.errors import MpqError
from mpq.expert_stacks import describe_grouped
from mpq.experts import RoutedExperts, route_experts
from mpq.io import atomic_folder, write_json_atomic
from mpq.models import auto_class
from mpq.plan import Plan
from mpq.apply import build_layers, set_module
from mpq.qembedding import QuantizedEmbedding, TiedEmbedding
from mpq.qlinear import linear_weight
from mpq.quantize import HOT_TENSORS
from mpq.trace import is_embedding, tied_parameter_groups

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "mpq.json"
CARD = "card.md"  # the quantisation card, readable (mpq.card)
ANCHOR = "mpq_device_anchor"  # an empty parameter: see load


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    names = []
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", ()):
            if module._buffers.get(buffer_name) is not None:
                names.append(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    return names


def checkpoint_tensors(model: nn.Module, layer_tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every tensor to save: canonical tensors (and biases) of the quantised layers, then the rest
    of the model (tied tensors once, under their first name)."""
    out: dict[str, torch.Tensor] = {}
    for layer, tensors in layer_tensors.items():
        for key, tensor in tensors.items():
            out[f"{layer}.{key}"] = tensor
    quantized = tuple(f"{layer}." for layer in layer_tensors)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(quantized):
            out[name] = tensor
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def _embedding_dtypes(model: nn.Module) -> dict[str, str]:
    """The quantised embedding tables and the dtype each outputs (the model's, which a meta
    skeleton cannot tell)."""
    return {name: str(module.out_dtype).removeprefix("torch.") for name, module in model.named_modules()
            if isinstance(module, QuantizedEmbedding)}


def _tied_tables(model: nn.Module) -> dict[str, dict[str, str]]:
    """Each quantised head whose weight is also the input table: head -> {table, dtype}."""
    return {module.head_name: {"table": name, "dtype": str(module.out_dtype).removeprefix("torch.")}
            for name, module in model.named_modules() if isinstance(module, TiedEmbedding)}


def _table_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each quantised table installed at more paths than its own (mpq.trace.table_aliases): its
    first path -> the others."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (QuantizedEmbedding, TiedEmbedding)):
            paths.setdefault(id(module), []).append(name)
    return {names[0]: names[1:] for names in paths.values() if len(names) > 1}


def _aliases_from(manifest: dict, folder: Path, model: nn.Module, tables: set[str]) -> dict[str, list[str]]:
    """The manifest's table aliases, checked: planned tables, aliased at token tables of the skeleton."""
    aliases = manifest.get("table_aliases", {})
    if not isinstance(aliases, dict):
        raise MpqError(f"{folder}: {MANIFEST} has malformed table_aliases; re-run mpq compile")
    for table, paths in aliases.items():
        if table not in tables or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise MpqError(f"{folder}: {MANIFEST} aliases table {table!r} at {paths!r}, which the plan does not allow; re-run mpq compile")
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                module = None
            if not is_embedding(module):
                raise MpqError(f"{folder}: {MANIFEST} aliases table {table} at {path}, which is not a token table of the model; "
                               "re-run mpq compile")
    return aliases


def _embedding_scales(model: nn.Module) -> dict[str, float]:
    """Each quantised table's row factor (embed_scale: Gemma, BART; 1.0 for an nn.Embedding),
    which a meta skeleton cannot tell."""
    return {name: module.scale for name, module in model.named_modules()
            if isinstance(module, (QuantizedEmbedding, TiedEmbedding))}


def _scales_from(manifest: dict, folder: Path, model: nn.Module, tables: set[str]) -> dict[str, float]:
    """The manifest's table factors, checked: finite numbers, for planned tables only, and one for
    every table that is a subclass of nn.Embedding (a checkpoint from before scaled tables holds
    plain nn.Embedding tables only, whose factor is 1)."""
    scales = manifest.get("embedding_scales", {})
    if not isinstance(scales, dict):
        raise MpqError(f"{folder}: {MANIFEST} has malformed embedding_scales; re-run mpq compile")
    for table, scale in scales.items():
        if table not in tables or isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise MpqError(f"{folder}: {MANIFEST} scales table {table!r} by {scale!r}, which the plan does not allow; "
                           "re-run mpq compile")
    for table in tables - set(scales):
        try:
            module = model.get_submodule(table)
        except AttributeError as exc:
            raise MpqError(f"{folder}: {MANIFEST} names table {table}, which the model does not have; re-run mpq compile") from exc
        if type(module) is not nn.Embedding:
            raise MpqError(f"{folder}: {MANIFEST} does not say what table {table} multiplies its rows by; re-run mpq compile")
    return {table: float(scale) for table, scale in scales.items()}


def _dtype(text: str, what: str, folder: Path) -> torch.dtype:
    if text not in ("float32", "bfloat16", "float16"):
        raise MpqError(f"{folder}: {what} has dtype {text!r}; re-run mpq compile")
    return getattr(torch, text)


def _table_dtypes(manifest: dict, folder: Path) -> dict[str, torch.dtype]:
    return {name: _dtype(dtype, f"embedding {name}", folder) for name, dtype in manifest.get("embeddings", {}).items()}


def _tied_from(manifest: dict, folder: Path, model: nn.Module, specs: dict) -> dict[str, tuple[str, torch.dtype]]:
    """The manifest's tied tables, checked against the skeleton: a planned head, a plain table."""
    out = {}
    for head, entry in manifest.get("tied_tables", {}).items():
        table = entry.get("table") if isinstance(entry, dict) else None
        try:
            module = model.get_submodule(table) if isinstance(table, str) else None
        except AttributeError:
            module = None
        if head not in specs or not is_embedding(module):
            raise MpqError(f"{folder}: {MANIFEST} ties {head} to table {table!r}, which the model or plan does not have; re-run mpq compile")
        out[head] = (table, _dtype(entry.get("dtype"), f"table {table}", folder))
    return out


def save_config(folder: Path, model: nn.Module, tokenizer, task: str, plan: Plan,
                layer_tensors: dict[str, dict[str, torch.Tensor]], card: dict, fused: list[list[str]] = ()) -> Path:
    """Write one config folder atomically. `model` must have the plan applied."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        save_file(checkpoint_tensors(model, layer_tensors), str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "mpq"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "task": task,
            "plan": plan.to_json(),
            "tied": tied_parameter_groups(model),
            "fused": [list(group) for group in fused],
            "embeddings": _embedding_dtypes(model),
            "tied_tables": _tied_tables(model),
            "embedding_scales": _embedding_scales(model),
            "table_aliases": _table_aliases(model),
            "non_persistent_buffers": _non_persistent_buffers(model),
            "routed_experts": [name for name, module in model.named_modules() if isinstance(module, RoutedExperts)],
            "sha256": {WEIGHTS: file_sha256(tmp / WEIGHTS)},
            "card": card,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        (tmp / CARD).write_text(card_markdown(manifest))
    return folder


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise MpqError(f"{folder} is not an mpq config (no {MANIFEST}): give a folder under OUT/configs/ written by mpq compile")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MpqError(f"{path} is corrupt ({exc}): re-run mpq compile to write the config again") from exc
    if manifest.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise MpqError(f"{path} has checkpoint version {manifest.get('checkpoint_version')!r}; this mpq reads {CHECKPOINT_VERSION}: re-run mpq compile")
    return manifest


def _read_weights(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    if not path.is_file():
        raise MpqError(f"{folder} has no {WEIGHTS}: the config is incomplete; re-run mpq compile")
    if file_sha256(path) != manifest.get("sha256", {}).get(WEIGHTS):
        raise MpqError(f"{path} is corrupt or truncated (sha256 differs from {MANIFEST}): re-run mpq compile")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise MpqError(f"{path} cannot be read as safetensors ({exc}): re-run mpq compile") from exc


def _skeleton(folder: Path, task: str) -> nn.Module:
    """The model's modules on the meta device: structure only, no memory, no random init."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    loader = auto_class(task, config)
    with torch.device("meta"):
        return loader.from_config(config)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
        module._parameters[attr] = param
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise MpqError(f"checkpoint tensor {name} has no place in the model: the config does not match its weights")


def load(folder: str | Path, backend: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a config folder written by `mpq compile` into a ready, eval-mode model on `device`.

    Quantised layers pick their kernel from the device: Triton on CUDA, torch's CPU kernels on the
    CPU; `backend` (or MPQ_KERNELS) = "reference" forces the dequantise path.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    plan = Plan.from_json(manifest["plan"])
    tensors = _read_weights(folder, manifest)
    model = _skeleton(folder, manifest["task"])
    routed = manifest.get("routed_experts", [])
    if not isinstance(routed, list) or not all(isinstance(path, str) for path in routed):
        raise MpqError(f"{folder}: {MANIFEST} has malformed routed_experts; re-run mpq compile")
    try:
        route_experts(model, only=routed, check=False)  # as compile routed them (the meta skeleton cannot run the probe)
    except ValueError as exc:
        raise MpqError(f"{folder}: {MANIFEST} routes experts the model does not have ({exc}); re-run mpq compile") from exc
    specs = plan.specs()
    tables = _table_dtypes(manifest, folder)
    tied = _tied_from(manifest, folder, model, specs)
    layer_tensors: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor | None] = {}
    in_features: dict[str, int] = {}
    dtypes: dict[str, torch.dtype] = {}
    for layer, fmt in specs.items():
        prefix = f"{layer}."
        own = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        biases[layer] = own.pop("bias", None)
        try:
            module = model.get_submodule(layer)
        except AttributeError as exc:
            raise MpqError(f"plan layer {layer} is not in the model: the config does not match its plan") from exc
        expected = {"weight"} if not fmt.quantized else ({"qweight", "scales"} | ({"zeros"} if fmt.bits == 4 and not fmt.symmetric else set()))
        if fmt.quantized and "input_scale" in own:  # AWQ's input divisor
            expected = expected | {"input_scale"}
        if fmt.hot_rows:
            expected = expected | set(HOT_TENSORS)
        if set(own) != expected:
            raise MpqError(f"{folder}: layer {layer} holds {sorted(own)}, but {fmt.name} needs {sorted(expected)}; re-run mpq compile")
        if fmt.embedding_only and not is_embedding(module):
            raise MpqError(f"{folder}: layer {layer} is not an embedding table but its format is {fmt.name}; re-run mpq compile")
        if is_embedding(module) != (layer in tables):
            raise MpqError(f"{folder}: plan layer {layer} is {'not ' if layer in tables else ''}an embedding table "
                           f"in the model, but {MANIFEST} says otherwise; re-run mpq compile")
        layer_tensors[layer] = own
        in_features[layer] = linear_weight(module).shape[1]
        dtypes[layer] = linear_weight(module).dtype
    every_table = {*tables, *(table for table, _ in tied.values())}
    scales = _scales_from(manifest, folder, model, every_table)
    aliases = _aliases_from(manifest, folder, model, every_table)
    fused = manifest.get("fused", [])
    for layer, module in build_layers(specs, layer_tensors, biases, in_features, fused, backend, device,
                                      embeddings=tables, tied=tied, table_scales=scales, dtypes=dtypes).items():
        for path in [layer, *aliases.get(layer, ())]:
            set_module(model, path, module)
        log.info("%s: %s", layer, module.kernel)
    for name, tensor in tensors.items():
        _assign(model, name, tensor.to(device))
    for group in manifest.get("tied", []):
        source = model.get_parameter(group[0])
        for other in group[1:]:
            _assign(model, other, source)
    if next(model.parameters(), None) is None:
        # transformers reads a model's device and dtype from its first parameter (generate does);
        # a model whose every weight mpq holds as buffers (OLMo's norms have none) gets an empty one
        dtype = next((m.out_dtype for m in model.modules() if isinstance(m, (QuantizedEmbedding, TiedEmbedding))), torch.float32)
        model.register_parameter(ANCHOR, nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False))
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise MpqError(f"{folder}: {len(missing)} tensors are missing from {WEIGHTS} (first: {missing[0]}); re-run mpq compile")
    model.eval()
    return model


def kernels_of(model: nn.Module) -> dict[str, str]:
    """Which kernel runs each quantised layer of a loaded model."""
    kernels = {name: module.kernel for name, module in model.named_modules()
               if type(module).__name__ in ("QuantizedLinear", "FusedSlice", "QuantizedEmbedding", "TiedEmbedding")
               and not name.endswith(".fused.layer")}
    for path, module in model.named_modules():
        if isinstance(module, RoutedExperts) and module.runs_grouped():
            for e in range(module.num_experts):
                for projection in (module.expert(e).up_name, "down_proj"):
                    name = f"{path}.{e}.{projection}"
                    kernels[name] = describe_grouped(module.get_submodule(f"{e}.{projection}"), module.num_experts)
    return kernels
