"""Capture a model as an FX graph (torch.export) and derive its quantisable layers.

The graph gives each linear's module path (from `nn_module_stack`), its order of execution and
its input node; networkx then answers graph questions: which layers read the same input
(q/k/v, gate/up: candidates for fused kernels) and which weights are tied (embedding, lm_head).
If export fails (LongT5, Switch Transformers and LED do: data-dependent shapes), one eager forward
with hooks on the linear modules takes over, with a warning that names the reason: it gives the
order they run in and which read the same input (handed the same memory: one tensor or a view of
it). If the model cannot even run eagerly, module discovery (no shared inputs) is the last resort.
The input embedding table (a vocabulary's rows: half of a small encoder's weights) is a layer
too, first in order. A table tied to the output head (most small LMs) is one tensor with it: the
head is the layer, and the table looks its rows up in the head's quantised weight (`tied_table`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import networkx as nx
import torch
from torch import nn

if TYPE_CHECKING:
    from mpq.formats import FormatSpec

log = logging.getLogger(__name__)

_LINEAR_OPS = {torch.ops.aten.linear.default, torch.ops.aten.addmm.default}
# `x @ self.weight.T` (Falcon's FalconLinear): a matmul whose right operand is a linear's own
# weight, transposed, is that linear.
_MATMUL_OPS = {torch.ops.aten.matmul.default, torch.ops.aten.mm.default}
_TRANSPOSE_OPS = {torch.ops.aten.t.default, torch.ops.aten.numpy_T.default, torch.ops.aten.transpose.int,
                  torch.ops.aten.permute.default}
# Ops that only re-view their input: two linears reading views of one tensor read the same input.
_VIEW_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
             torch.ops.aten.alias.default}
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path, e.g. model.layers.3.self_attn.q_proj
    module_type: str  # Linear, Conv1D or Embedding
    kind: str  # the path inside its block, e.g. self_attn.q_proj (the heatmap's column)
    block: int | None  # transformer block index (the heatmap's row), None outside the blocks
    in_features: int
    out_features: int
    params: int
    order: int  # position in execution order
    has_bias: bool
    tied_table: str | None = None  # the input embedding table that shares this layer's weight (quantised with it)
    routed_share: float = 1.0  # the share of tokens it sees: an expert of a mixture (mpq.experts) top_k / experts

    @property
    def is_embedding(self) -> bool:
        """A lookup table (rows = out_features tokens of in_features values), not a matmul."""
        return self.module_type == EMBEDDING

    def takes(self, fmt: "FormatSpec") -> bool:
        """Whether this layer can be stored in `fmt` (FormatSpec.fits)."""
        return fmt.fits(self.out_features, self.in_features, self.is_embedding)


EMBEDDING = "Embedding"


@dataclass
class ModelGraph:
    layers: list[LayerInfo]
    graph: nx.Graph  # layer nodes; edges "shares_input" and "tied"
    method: str  # "export", "hooks" (an eager forward's, where export failed) or "modules" (neither ran)
    warning: str | None = None
    excluded: dict[str, str] = field(default_factory=dict)  # layer name -> why it is not quantisable

    def shared_input_groups(self) -> list[list[str]]:
        """Groups of 2+ layers that read the same input tensor, in execution order."""
        edges = [(a, b) for a, b, d in self.graph.edges(data=True) if d.get("relation") == "shares_input"]
        sub = nx.Graph(edges)
        order = {layer.name: layer.order for layer in self.layers}
        return sorted((sorted(c, key=order.get) for c in nx.connected_components(sub)), key=lambda g: order[g[0]])

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "warning": self.warning,
            "layers": [asdict(layer) for layer in self.layers],
            "shared_input_groups": self.shared_input_groups(),
            "excluded": self.excluded,
        }


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@torch.no_grad()
def computes_linear(module: nn.Module) -> bool:
    """Whether the module's forward is x @ weight.T + bias, all a QuantizedLinear in its place
    computes. torch's nn.Linear and transformers' Conv1D are; a subclass of nn.Linear may do more
    (scale, clamp, add an adapter), which a quantised layer would silently drop, so its forward
    is checked on a random probe input against F.linear."""
    if type(module) is nn.Linear or type(module).__name__ == "Conv1D":
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or weight is None or weight.device.type == "meta" or weight.dim() != 2:
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.shape[1], generator=generator).to(weight)
    try:
        got = module(probe)
    except Exception:  # a forward that takes more than one input is not a plain linear
        return False
    want = torch.nn.functional.linear(probe, weight, module.bias)
    return outputs_match(got, want, weight.dtype, 2e-2)  # matmul against linear: summation order


def outputs_match(got: object, want: object, dtype: torch.dtype, tolerance_16bit: float) -> bool:
    """Whether a probe's two outputs are one tensor up to summation order: within 1e-4 of the
    largest value in float32, `tolerance_16bit` in a 16-bit `dtype` (how a probe of a replacement
    module, computes_linear's or mpq.experts', decides it computes what the original does)."""
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor) or got.shape != want.shape:
        return False
    tolerance = 1e-4 if dtype == torch.float32 else tolerance_16bit
    return bool((got.float() - want.float()).abs().max() <= tolerance * (want.float().abs().max() + 1e-6))


def is_embedding(module: nn.Module) -> bool:
    """A token table: torch's nn.Embedding or a subclass (whether mpq can take one is
    embedding_scale's question)."""
    return isinstance(module, nn.Embedding)


@torch.no_grad()
def embedding_scale(module: nn.Module) -> float | None:
    """The factor a token table's forward multiplies its looked-up rows by, where that is all it
    does: 1.0 for torch's nn.Embedding; for a subclass with an `embed_scale` (Gemma's
    sqrt(hidden), BART's, M2M100's, XGLM's), that factor as its forward applies it (a tensor is
    first cast to the table's dtype, as those forwards do), once a probe lookup confirms the
    forward is rows x factor. None for anything else: a quantised table in its place would
    silently drop what more it does (and max_norm renormalises rows in place)."""
    if not is_embedding(module) or module.max_norm is not None:
        return None
    if type(module) is nn.Embedding:
        return 1.0
    factor = getattr(module, "embed_scale", None)
    if isinstance(factor, torch.Tensor) and factor.numel() == 1 and factor.device.type != "meta":
        factor = float(factor.to(module.weight.dtype))
    elif isinstance(factor, (int, float)) and not isinstance(factor, bool):
        factor = float(factor)
    else:
        return None
    weight = module.weight
    if weight.device.type == "meta":
        return None
    ids = torch.linspace(0, weight.shape[0] - 1, min(weight.shape[0], 64)).long().to(weight.device)[None]
    try:
        got = module(ids)
    except Exception:  # a forward that wants more than token ids is not a lookup
        return None
    want = torch.nn.functional.embedding(ids, weight).float() * factor
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return None
    tolerance = 2 * torch.finfo(weight.dtype).eps  # one rounding of the product to the table's dtype
    return factor if bool(((got.float() - want).abs() <= tolerance * want.abs()).all()) else None


def _input_table(model: nn.Module) -> tuple[str, nn.Module] | None:
    getter = getattr(model, "get_input_embeddings", None)
    table = getter() if getter is not None else None
    if table is None:
        return None
    return next(name for name, module in model.named_modules() if module is table), table


def table_aliases(model: nn.Module, table: str) -> list[str]:
    """The other paths that look rows up in `table`'s very weight (a seq2seq model's encoder and
    decoder embed_tokens beside its shared table, as modules of their own or the same module):
    wherever the table is quantised, they hold its quantised module too."""
    weight = model.get_submodule(table).weight
    return [name for name, module in model.named_modules(remove_duplicate=False)
            if name != table and is_embedding(module) and module.weight is weight]


def _aliases_differ(model: nn.Module, table: str) -> str | None:
    """Why the table's aliases cannot share its quantised module (one scales its rows by another
    factor), else None."""
    scale = embedding_scale(model.get_submodule(table))
    for alias in table_aliases(model, table):
        if embedding_scale(model.get_submodule(alias)) != scale:
            return f"{alias} looks its rows up in the same weight but does more than the table's lookup (another embed_scale)"
    return None


def tied_table_of(model: nn.Module, name: str) -> str | None:
    """The path of the token table (one mpq can take: embedding_scale) whose weight is the weight
    of linear `name` (an output head tied to the input embeddings), else None."""
    found = _input_table(model)
    head = model.get_submodule(name)
    if found is None or type(head) is not nn.Linear or head.weight is not found[1].weight:
        return None
    # the probes, for the tied head only
    return found[0] if embedding_scale(found[1]) is not None and _aliases_differ(model, found[0]) is None else None


def _other_token_tables(model: nn.Module, example_inputs: dict, input_table: str | None) -> list[str]:
    """Paths of the token tables besides the input one that the forward looks the input ids up in
    (Gemma 3n's and Gemma 4's per-layer tables: vocabulary x blocks x a small width, often larger
    than the input table), found by one eager forward on `example_inputs` that records each
    table's indices; position and token-type tables read other indices and are left alone. No
    forward runs where the model has no other table."""
    weight = model.get_submodule(input_table).weight if input_table is not None else None
    candidates = {module: name for name, module in model.named_modules()
                  if is_embedding(module) and module.weight is not weight and name != input_table}
    ids = [value for key, value in example_inputs.items()
           if key in ("input_ids", "decoder_input_ids") and isinstance(value, torch.Tensor)]
    if not candidates or not ids:
        return []
    found: list[str] = []

    def record(module: nn.Module, args: tuple) -> None:
        indices = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if indices is not None and any(indices.shape == i.shape and torch.equal(indices.cpu(), i.cpu()) for i in ids):
            if candidates[module] not in found:
                found.append(candidates[module])

    handles = [module.register_forward_pre_hook(record) for module in candidates]
    try:
        with torch.no_grad():
            model(**example_inputs)
    except Exception:  # a model that cannot run eagerly here keeps its other tables as stored
        return []
    finally:
        for handle in handles:
            handle.remove()
    return found


def _table_layer(model: nn.Module, path: str, is_input: bool, tied_weights: set[str], excluded: dict[str, str],
                 wanted: bool, keep: str | None, order: int) -> LayerInfo | None:
    """Token table `path` as a layer, or None (with the reason in `excluded`; a table tied to the
    head is that layer's, see trace_model)."""
    table = model.get_submodule(path)
    if not wanted:
        excluded[path] = "embedding tables left as stored (asked for)"
        return None
    if keep is not None and re.search(keep, path) and f"{path}.weight" not in tied_weights:
        excluded[path] = f"kept as stored (--keep {keep})"
        return None
    if embedding_scale(table) is None:
        excluded[path] = (f"{type(table).__name__}'s forward is not a row lookup (times a constant embed_scale); "
                          "checked on probe rows")
        return None
    if (why := _aliases_differ(model, path)) is not None:
        excluded[path] = why
        return None
    if f"{path}.weight" in tied_weights:
        if not is_input:  # the input table's tie is to the head, which quantises it (tied_table_of)
            excluded[path] = "weight tied to another parameter (kept in the model's dtype with it)"
        return None
    rows, dim = table.weight.shape
    return LayerInfo(name=path, module_type=EMBEDDING, kind=path.rpartition(".")[2], block=None, in_features=dim,
                     out_features=rows, params=rows * dim, order=order, has_bias=False)


def _shape(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    if type(module).__name__ == "Conv1D":
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that share one tensor (e.g. embed_tokens.weight and lm_head.weight)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def _source(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and node.target in _VIEW_OPS:
        node = node.args[0]
    return node


def _transposed_parameter(node: torch.fx.Node, parameters: dict[str, str]) -> str | None:
    """The parameter that `node` is the transpose of (a 2-D weight), else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSE_OPS:
        return None
    if node.target == torch.ops.aten.transpose.int and node.args[1] % 2 == node.args[2] % 2:
        return None
    if node.target == torch.ops.aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        return None
    source = node.args[0]
    return parameters.get(source.name) if isinstance(source, torch.fx.Node) and source.op == "placeholder" else None


def _memory_key(x: torch.Tensor) -> tuple:
    """What identifies the values a linear reads from `x`, while `x` is alive: where they start,
    how many, how they are laid out, and not changed in place since. Two contiguous tensors from
    the same address with the same size and last dimension present the same rows (a tensor and
    its reshape); any other view matches only the same view."""
    try:
        version = x._version  # changed in place between two calls: not the same input
    except RuntimeError:  # an inference-mode tensor keeps none (the trace's own forward runs under no_grad only)
        version = None
    start = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.dtype, x.numel(), version)
    return (*start, x.shape[-1] if x.dim() else 0) if x.is_contiguous() else (*start, tuple(x.shape), x.stride())


def _reach(path: str) -> str:
    """The part of the model a linear belongs to, for whether a forward reached it: its block
    (model.layers.3.), else its parent module."""
    block = _BLOCK_INDEX.search(f".{path}.")
    return f".{path}."[:block.end()] if block else path.rpartition(".")[0]


def _called_linears(model: nn.Module, example_inputs: dict) -> list[tuple[str, tuple | None]]:
    """(module path, input key) of every linear module, in the order one eager forward on
    `example_inputs` calls them (a module called twice counts at its first call); linears the
    forward never calls in a block it ran (LED's global-attention projections, an expert the router
    skipped) follow the called one registered before them, with no input key. Linears of a part the
    inputs never reach (an image-text model's vision tower, on text) are left out, as export leaves
    them out: nothing would measure them."""
    paths = {module: name for name, module in model.named_modules() if _is_linear(module)}
    held: list[torch.Tensor] = []  # alive until the pass ends, so no two inputs can share an address
    called: dict[str, tuple | None] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is not None:
            held.append(x)
        called.setdefault(paths[module], None if x is None else _memory_key(x))

    handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in paths]
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        held.clear()
    if not called:
        raise RuntimeError("the eager forward called no linear module")
    reached = {_reach(path) for path in called}
    after: dict[str | None, list[str]] = {}  # a called path (None: the start) -> the uncalled registered after it
    previous = None
    for path in paths.values():
        if path in called:
            previous = path
        elif _reach(path) in reached:  # a branch of a block that ran; a part the inputs never reach stays out
            after.setdefault(previous, []).append(path)
    ordered = [(path, None) for path in after.get(None, [])]
    for path, key in called.items():
        ordered += [(path, key), *((later, None) for later in after.get(path, []))]
    return ordered


def _exported_linears(model: nn.Module, example_inputs: dict) -> list[tuple[str, torch.fx.Node]]:
    """(module path, input node) of every linear op in execution order, via torch.export: the
    linear and addmm ops, and matmuls by a module's own transposed weight."""
    printed = io.StringIO()
    try:  # a failed export prints its partial graph to stderr (hundreds of lines): logged for `-v` only
        with contextlib.redirect_stderr(printed):
            program = torch.export.export(model, args=(), kwargs=example_inputs, strict=False)
    finally:
        if printed.getvalue():
            log.info("torch.export printed:\n%s", printed.getvalue())
    parameters = program.graph_signature.inputs_to_parameters  # placeholder name -> parameter path
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_OPS | _MATMUL_OPS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        path = list(stack.values())[-1][0]
        if node.target in _MATMUL_OPS and _transposed_parameter(node.args[1], parameters) != f"{path}.weight":
            continue
        x = node.args[1] if node.target == torch.ops.aten.addmm.default else node.args[0]
        found.append((path, _source(x)))
    return found


def _stack_kinds(layers: list[LayerInfo]) -> list[LayerInfo]:
    """Where blocks sit in more than one list (a seq2seq model's encoder and decoder), each kind
    is prefixed by its list's holder (encoder.self_attn.q_proj), so that the heatmap keeps the
    encoder's and the decoder's layers of one block apart."""
    stacks = {layer.name: _BLOCK_INDEX.search(f".{layer.name}.") for layer in layers}
    prefixes = {f".{name}"[:found.start()] for name, found in stacks.items() if found}
    if len(prefixes) < 2:
        return layers
    kinds = []
    for layer in layers:
        found = stacks[layer.name]
        if found:
            holder = f".{layer.name}"[:found.start()].split(".")[-2] or "model"  # .encoder.block -> encoder
            layer = replace(layer, kind=f"{holder}.{layer.kind}")
        kinds.append(layer)
    return kinds


def _capture(model: nn.Module, example_inputs: dict, capture: str) -> tuple[list[tuple[str, object]], str, str | None]:
    """(module path, input key) of the linears, how they were found, and why not by export."""
    if capture == "hooks":
        return _called_linears(model, example_inputs), "hooks", None
    try:
        with torch.no_grad():
            linears = _exported_linears(model, example_inputs)
        if linears:
            return linears, "export", None
        raise RuntimeError("the exported graph holds no linear ops")
    except Exception as exc:  # any capture failure falls back; the reason is kept for the report
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    try:
        return _called_linears(model, example_inputs), "hooks", (
            f"torch.export failed ({reason}); found layers by hooks on an eager forward instead "
            "(shared inputs: layers handed the same memory)")
    except Exception as eager:  # a model that cannot run on the example inputs: its modules are all there is
        return [(name, None) for name, module in model.named_modules() if _is_linear(module)], "modules", (
            f"torch.export failed ({reason}) and so did an eager forward ({type(eager).__name__}); found layers "
            "by module discovery instead, so shared inputs are unknown")


def trace_model(model: nn.Module, example_inputs: dict, embeddings: bool = True, capture: str = "export",
                keep: str | None = None) -> ModelGraph:
    """Layers of `model` that mpq can quantise, and the graph facts about them (`embeddings`: the
    token tables, the input one and any other the input ids are looked up in, are among them
    where they can be). `keep`: a regular expression; the
    layers whose names it matches (re.search) stay as stored, and a head tied to a table it matches
    too. `capture="hooks"` skips torch.export for the fallback export's failure takes (to check the
    two against each other)."""
    modules = dict(model.named_modules())
    linears, method, warning = _capture(model, example_inputs, capture)
    if warning:
        log.warning(warning)

    tied = tied_parameter_groups(model)
    tied_weights = {name for group in tied for name in group}
    graph = nx.Graph()
    layers: list[LayerInfo] = []
    excluded: dict[str, str] = {}
    found = _input_table(model)
    input_table = found[0] if found is not None else None
    for path in ([input_table] if input_table else []) + _other_token_tables(model, example_inputs, input_table):
        table = _table_layer(model, path, path == input_table, tied_weights, excluded, embeddings, keep, order=len(layers))
        if table is not None:
            layers.append(table)
            graph.add_node(table.name, kind="embedding")
    readers: dict[torch.fx.Node, list[str]] = {}
    for path, source in linears:
        module = modules.get(path)
        if module is None or not _is_linear(module) or any(layer.name == path for layer in layers):
            continue  # a module called twice is one layer
        if not computes_linear(module):
            excluded[path] = f"{type(module).__name__}'s forward is not x @ weight.T + bias (checked on a probe input)"
            continue
        tied_table = tied_table_of(model, path) if embeddings else None
        if keep is not None and any(re.search(keep, name) for name in (path, tied_table) if name):
            excluded[path] = f"kept as stored (--keep {keep})"
            if tied_table is not None:
                excluded[tied_table] = f"shares its weight with {path}: kept as stored with it (--keep {keep})"
            continue
        if f"{path}.weight" in tied_weights and tied_table is None:
            excluded[path] = "weight tied to another parameter (kept in the model's dtype with it)"
            continue
        if tied_table is not None:
            excluded[tied_table] = f"shares its weight with {path}: quantised with it, in its format"
        out_features, in_features = _shape(module)
        block = _BLOCK_INDEX.search(f".{path}.")
        # The kind is the path inside its block (self_attn.q_proj, intermediate.dense), so that
        # BERT's several "dense" layers stay apart in the heatmap.
        kind = f".{path}"[block.end():] if block else path
        layers.append(LayerInfo(
            name=path, module_type=type(module).__name__, kind=kind,
            block=int(block.group(1)) if block else None, in_features=in_features, out_features=out_features,
            params=in_features * out_features, order=len(layers), has_bias=module.bias is not None,
            tied_table=tied_table, routed_share=getattr(module, "routed_share", 1.0),
        ))
        graph.add_node(path, kind="layer")
        if source is not None:  # one block's readers of a tensor: a seq2seq decoder's blocks all read the encoder's
            readers.setdefault((source, f".{path}."[:block.end()] if block else None), []).append(path)
    layers = _stack_kinds(layers)
    for names in readers.values():
        for other in names[1:]:
            graph.add_edge(names[0], other, relation="shares_input")
    for group in tied:
        for other in group[1:]:
            graph.add_edge(group[0], other, relation="tied")
    excluded.update(_never_run(modules, {layer.name for layer in layers} | set(excluded)))
    return ModelGraph(layers=layers, graph=graph, method=method, warning=warning, excluded=excluded)


def _never_run(modules: dict[str, nn.Module], placed: set[str]) -> dict[str, str]:
    """The parts of the model with linears but no op in the traced forward on the example inputs
    (an image-text model's vision tower, on text), each named once at its outermost module that
    holds no layer: why they are kept as stored."""
    holding = {".".join(name.split(".")[:i]) for name in placed for i in range(1, name.count(".") + 2)}
    parts: dict[str, int] = {}
    for path, module in modules.items():
        if not path or path in placed or not _is_linear(module):
            continue
        names = path.split(".")
        part = next(prefix for prefix in (".".join(names[:i]) for i in range(1, len(names) + 1)) if prefix not in holding)
        parts[part] = parts.get(part, 0) + 1
    return {part: f"not in the traced forward on the example inputs (text): its {count} linear layer{'s' * (count > 1)} "
                  "kept as stored" for part, count in parts.items()}
