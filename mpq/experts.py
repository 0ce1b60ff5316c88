"""A mixture of experts' stacked weights as linears that mpq can quantise.

transformers 5 holds a mixture's experts as stacked 3-D parameters (Mixtral's gate_up_proj
[E, 2I, H] and down_proj [E, H, I]; GPT-OSS's transposed, with biases), run by one experts
module (a class decorated with `use_experts_implementation`). No 2-D format takes them, and in
a real mixture they are most of the model (Mixtral-8x7B: 96% of its bytes). `route_experts`
replaces each such module by a RoutedExperts: the same routing, over E experts that are each a
pair of nn.Linear (the gate-and-up or up projection, then the down projection). So each
expert's matmul is a layer like any other: traced, measured, searched (an expert the router
rarely picks can take fewer bits), quantised by any method on the tokens routed to it, saved,
and run by mpq's kernels. A probe first checks that the replacement computes what the module it
replaces computes; a module that fails it stays as stored, and the report says why.

Llama 4's experts (Llama4TextExperts) are stacked too ([E, in, out], transposed), but its mixture
hands them every token once per expert, each copy already scaled by the router's score for that
expert (0 where the router did not pick it), and sums their outputs itself. ScoredExperts takes
that form: it runs each expert on its nonzero rows only (a zero row comes out 0: the experts have
no bias, and act(0) * 0 is 0), so the replacement also does top-k's work instead of every expert's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mpq.trace import outputs_match

log = logging.getLogger(__name__)
_FLAGS = ("has_gate", "has_bias", "is_transposed", "num_experts")


def _up_name(module: nn.Module) -> str:
    """The name of an expert's first projection: gate and up stacked, or up alone where it has no gate."""
    return "gate_up_proj" if module.has_gate else "up_proj"


def _stacked(module: nn.Module, names: tuple[str, str]) -> bool:
    experts = getattr(module, "num_experts", None)
    weights = [getattr(module, name, None) for name in names]
    return isinstance(experts, int) and all(isinstance(w, nn.Parameter) and w.dim() == 3 and w.shape[0] == experts
                                            for w in weights)


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module: stacked 3-D expert weights behind the experts interface."""
    if not all(hasattr(module, flag) for flag in _FLAGS) or not hasattr(type(module), "_apply_gate"):
        return False
    return _stacked(module, (_up_name(module), "down_proj"))


def is_scored_experts(module: nn.Module) -> bool:
    """Llama 4's form of a mixture's experts (Llama4TextExperts): stacked [E, H, 2I] gate_up_proj
    and [E, I, H] down_proj, run as forward(hidden_states) on E blocks of rows, expert e's block
    being every token scaled by its router score for e (ScoredExperts)."""
    if is_experts(module) or not hasattr(module, "act_fn") or not _stacked(module, ("gate_up_proj", "down_proj")):
        return False
    up, down = module.gate_up_proj, module.down_proj
    return up.shape[1] == down.shape[2] and up.shape[2] == 2 * down.shape[1]


def _chunked_gate(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, the gate the first half of the gate-and-up projection (Llama 4's)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of one expert's [out, in] weight and bias (on their device, meta too)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return linear


class Expert(nn.Module):
    """One expert: `gate_up_proj` (or `up_proj` where it has no gate), then `down_proj`."""

    def __init__(self, up_name: str, up: nn.Linear, down: nn.Linear, stacks: dict) -> None:
        super().__init__()
        self.up_name = up_name
        self.add_module(up_name, up)
        self.down_proj = down
        self.__dict__["_mixture_stacks"] = stacks

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, nn.Module):  # a layer swapped (mpq.apply): the mixture's stacks no longer hold it
            self.__dict__.get("_mixture_stacks", {}).clear()
        super().__setattr__(name, value)


class RoutedExperts(nn.Module):
    """The experts of one mixture, as the experts module it replaces runs them: each token goes
    through the experts its router picked (top_k_index), their outputs weighted by top_k_weights
    and summed. Expert e is child "e" (a path such as model.layers.0.mlp.experts.3.down_proj)."""

    def __init__(self, original: nn.Module, top_k: int | None = None) -> None:
        super().__init__()
        self.source_type = type(original).__name__
        self.num_experts = original.num_experts
        self.has_gate = getattr(original, "has_gate", True)
        self.has_bias = getattr(original, "has_bias", False)
        self.has_post_expert_norm = getattr(original, "has_post_expert_norm", False)
        if top_k is None:
            top_k = getattr(getattr(original, "config", None), "num_experts_per_tok", None)
        # the share of tokens an expert gets, on average (mpq.latency weighs its time by it)
        self.routed_share = min(1.0, top_k / self.num_experts) if isinstance(top_k, int) and top_k > 0 else 1.0
        # The gate (act(gate) * up, or a model's own such as GPT-OSS's clamped swiglu) is the
        # original class's method: it reads the module's activation and plain attributes, copied here.
        self._gate = getattr(type(original), "_apply_gate", _chunked_gate)
        for key, value in vars(original).items():
            if not key.startswith("_") and not isinstance(value, torch.Tensor) and not hasattr(self, key):
                setattr(self, key, value)
        for name, child in original.named_children():
            self.add_module(name, child)  # act_fn, post_expert_norm
        self.group_decode = True  # decode through grouped launches where the experts allow (benchmarks turn it off)
        self._stacks: dict = {}  # the experts stacked (mpq.expert_stacks), built on first use; cleared by a layer swap
        up_name = _up_name(self)
        stacked = {name: getattr(original, name) for name in (up_name, "down_proj")}
        for e in range(self.num_experts):
            up, down = (stacked[name][e].t() if self._transposed(original) else stacked[name][e] for name in (up_name, "down_proj"))
            biases = [getattr(original, f"{name}_bias")[e] if self.has_bias else None for name in (up_name, "down_proj")]
            linears = _linear(up, biases[0]), _linear(down, biases[1])
            for linear in linears:
                linear.routed_share = self.routed_share  # read by mpq.trace (LayerInfo) and mpq.calib_stats
            self.add_module(str(e), Expert(up_name, *linears, self._stacks))

    @staticmethod
    def _transposed(original: nn.Module) -> bool:
        """Whether the stacked weights are [E, in, out] (GPT-OSS's, Llama 4's), not [E, out, in]."""
        return original.is_transposed

    def expert(self, e: int) -> Expert:
        return self._modules[str(e)]

    def picks(self) -> int:
        """How many experts the router picks a token (top-k), from the share each expert gets."""
        return max(1, round(self.routed_share * self.num_experts))

    def routed_call(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> tuple:
        """The arguments the mixture's own code hands this module for tokens `x` routed to experts
        `index` [tokens, top_k] with `weights` (probes and timings build calls with it)."""
        return x, index, weights

    def routed_counts(self, args: tuple) -> torch.Tensor:
        """How many tokens of a call (its arguments) each expert gets."""
        return torch.bincount(args[1].reshape(-1), minlength=self.num_experts)[: self.num_experts]

    def _run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        expert = self.expert(e)
        y = getattr(expert, expert.up_name)(x)
        y = self._gate(self, y) if self.has_gate else self.act_fn(y)
        y = expert.down_proj(y)
        return self.post_expert_norm(y) if self.has_post_expert_norm else y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return self._every_expert(hidden_states, top_k_index, top_k_weights)
        stacks = self._decode_stacks(hidden_states)
        if stacks is not None:
            return self._grouped(stacks, hidden_states, top_k_index, top_k_weights)
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts].tolist()  # ids >= E: no expert (EP)
        tokens, weights = order // top_k, top_k_weights.reshape(-1)[order]
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = tokens[start:start + count]
                y = self._run(e, hidden_states[rows]).float() * weights[start:start + count, None].float()
                out.index_add_(0, rows, y)
            start += count
        return out.to(hidden_states.dtype)

    def projections(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """Every expert's first projection, and every expert's down projection."""
        experts = [self.expert(e) for e in range(self.num_experts)]
        return [getattr(expert, expert.up_name) for expert in experts], [expert.down_proj for expert in experts]

    def runs_grouped(self) -> bool:
        """Whether decode-sized calls run grouped: every expert layer on Triton or 16-bit (mpq.expert_stacks)."""
        from mpq.expert_stacks import groups_decode

        return self.group_decode and groups_decode(list(self.projections()))

    def _decode_stacks(self, x: torch.Tensor) -> tuple | None:
        """The mixture's experts stacked for grouped launches (mpq.expert_stacks), for a decode-sized
        call that nothing records, where every expert layer runs on Triton or 16-bit; else None (the loop)."""
        from mpq.expert_stacks import GROUPED_TOKENS, groups_decode, stack_projection
        from mpq.qlinear import launches_directly

        if not self.group_decode or x.shape[0] > GROUPED_TOKENS or not launches_directly(x):
            return None
        stacks = self._stacks.get(x.device)
        if stacks is None or (stacks and not all(projection.intact() for projection in stacks)):  # .to() copies views apart
            projections = self.projections()
            stacks = tuple(stack_projection(layers) for layers in projections) if groups_decode(list(projections)) else ()
            self._stacks.clear()
            self._stacks[x.device] = stacks
        return stacks or None

    def _run_stacked(self, stacks: tuple, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row through expert ids[p], as _run does one expert, in the grouped launches."""
        up, down = stacks
        y = up(rows, ids)
        y = self._gate(self, y) if self.has_gate else self.act_fn(y)
        y = down(y, ids)
        return self.post_expert_norm(y) if self.has_post_expert_norm else y

    def _grouped(self, stacks: tuple, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        """The routed sum in two grouped launches per format, none waiting on the host. Each row is
        one (token, expert) pair, the pairs sorted by expert: a launch then reads an expert's
        weights for all its tokens back to back (from L2 after the first; mpq.kernels.triton_common.grouped_row)."""
        tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)  # pair t * top_k + j: token t's j-th expert
        order = torch.argsort(flat, stable=True)
        ids = flat[order]
        routed = ids < self.num_experts  # ids >= E: no expert here (expert parallelism)
        ids = torch.where(routed, ids, self.num_experts)
        y = self._run_stacked(stacks, hidden_states[order // top_k], ids)
        weighted = y.float() * (top_k_weights.reshape(-1)[order].float() * routed)[:, None]
        pairs = torch.empty_like(weighted)
        pairs[order] = weighted  # back in (token, slot) order, so each token's sum is one fixed reduction
        return pairs.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _every_expert(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The same sum without data-dependent shapes, for torch.export (mpq.trace): every expert
        runs on every token, the tokens not routed to it zeroed (so no two experts read one input:
        they never fuse) and weighted by 0."""
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        # [tokens, experts]: each token's weight for each expert (0 where not routed), built once
        # (a trace of 60 experts x 24 blocks takes a minute or two: every op per expert counts)
        dense = torch.zeros(hidden_states.shape[0], self.num_experts + 1, device=hidden_states.device)
        dense = dense.scatter_add(1, top_k_index.clamp(max=self.num_experts), top_k_weights.float())
        for e in range(self.num_experts):
            weight = dense[:, e:e + 1]
            out = out + self._run(e, hidden_states * (weight != 0).to(hidden_states.dtype)).float() * weight
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, from={self.source_type}, routed_share={self.routed_share:g}"


class ScoredExperts(RoutedExperts):
    """Llama 4's experts as per-expert linears. Its mixture (Llama4TextMoe) hands them
    [E x tokens, H]: block e holds every token times the router's score for expert e, 0 for the
    experts the router did not pick; each row's output is its expert's, and the mixture sums
    them. A zero row's output is 0 (no bias; act(0) * 0 = 0), so only the nonzero rows run: each
    expert sees the tokens routed to it, as in any other mixture, and the call does top-k's work."""

    @staticmethod
    def _transposed(original: nn.Module) -> bool:
        return True  # torch.bmm(rows, gate_up_proj[e]): [E, in, out]

    def routed_call(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> tuple:
        scores = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device).scatter(1, index, weights)
        return ((x[None] * scores.t()[:, :, None]).reshape(-1, x.shape[-1]),)

    def routed_counts(self, args: tuple) -> torch.Tensor:
        hidden = args[0]
        return hidden.view(self.num_experts, -1, hidden.shape[-1]).ne(0).any(-1).sum(-1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        blocks = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])  # [E, tokens, H]
        if torch.compiler.is_exporting():  # no data-dependent shapes: each expert on its whole block
            return torch.stack([self._run(e, blocks[e]) for e in range(self.num_experts)]).reshape(hidden_states.shape)
        stacks = self._decode_stacks(blocks[0])
        if stacks is not None:
            return self._grouped_blocks(stacks, blocks).reshape(hidden_states.shape)
        picked = blocks.ne(0).any(-1)  # [E, tokens]: the rows the router sent
        counts = picked.sum(-1).tolist()
        out = torch.zeros_like(blocks)
        for e, count in enumerate(counts):
            if count:
                rows = picked[e].nonzero().squeeze(1)
                out[e, rows] = self._run(e, blocks[e, rows]).to(out.dtype)
        return out.reshape(hidden_states.shape)

    def _grouped_blocks(self, stacks: tuple, blocks: torch.Tensor) -> torch.Tensor:
        """The picked rows in two grouped launches per format, nothing waiting on the host: each
        token's top_k nonzero rows (its experts), sorted by expert, through their experts' stacks."""
        picked = blocks.ne(0).any(-1)  # [E, tokens]
        # each token's top_k experts, the picked ones first (the router picks exactly top_k; were a
        # picked row all zeros, an unpicked expert's zero row would stand in for it: both give 0)
        top_k = self.picks()  # the router picks exactly top_k experts a token
        ids = picked.t().float().topk(top_k, dim=1).indices
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        ids = flat[order]
        token = order // top_k
        y = self._run_stacked(stacks, blocks[ids, token], ids)
        out = torch.zeros_like(blocks)
        out[ids, token] = y.to(out.dtype)
        return out


def describe_routed(model: nn.Module) -> str | None:
    """The model's routed experts in a line (the quantisation card's), None where it has none."""
    routed = [module for module in model.modules() if isinstance(module, RoutedExperts)]
    if not routed:
        return None
    first = routed[0]
    return (f"{len(routed)} x {first.source_type} of {first.num_experts} experts, each seeing {first.routed_share:g} of "
            f"the tokens on average (top-k / experts): each expert's {_up_name(first)} and down_proj are layers of the plan, "
            "each with its own format")


def expert_projections(model: nn.Module) -> list[list[str]]:
    """Each mixture's projection over all its experts (model.layers.0.mlp.experts.{0..E-1}.down_proj):
    the layers that the search's sampler moves as one (mpq.search.pareto)."""
    groups = []
    for path, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            for projection in (_up_name(module), "down_proj"):
                groups.append([f"{path}.{e}.{projection}" for e in range(module.num_experts)])
    return groups


@torch.no_grad()
def routed_tokens(model: nn.Module, inputs: list[dict]) -> dict[str, list[int]]:
    """How many of the tokens of `inputs` (model keyword inputs, e.g. the calibration batches) the
    routers send to each expert: RoutedExperts path -> one count per expert. An expert that gets
    few or none is calibrated on little or nothing, and its sensitivity reads near 0."""
    counts: dict[str, torch.Tensor] = {}

    def counter(name: str):
        def hook(module: RoutedExperts, args: tuple) -> None:
            counts[name] = counts.get(name, 0) + module.routed_counts(args).cpu()
        return hook

    handles = [module.register_forward_pre_hook(counter(name)) for name, module in model.named_modules()
               if isinstance(module, RoutedExperts)]
    if not handles:
        return {}
    try:
        for batch in inputs:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: found.tolist() for name, found in counts.items()}


def coverage(tokens: dict[str, list[int]]) -> dict | None:
    """The spread of calibration tokens over the experts (for the report), None without experts."""
    every = sorted(count for counts in tokens.values() for count in counts)
    if not every:
        return None
    unreached = [f"{name}.{e}" for name, counts in tokens.items() for e, count in enumerate(counts) if count == 0]
    return {"mixtures": len(tokens), "experts": len(every), "min": every[0], "median": every[len(every) // 2], "max": every[-1],
            "unreached": unreached}


@torch.no_grad()
def routes_like(original: nn.Module, routed: RoutedExperts, tokens: int = 24) -> bool:
    """Whether `routed` computes what `original` does, on random tokens and routes (each token
    to top-k distinct experts, as a router picks them)."""
    weight = next(original.parameters())
    generator = torch.Generator().manual_seed(0)
    hidden = routed.expert(0).down_proj.out_features
    top_k = routed.picks()
    x = torch.randn(tokens, hidden, generator=generator).to(weight)
    index = torch.stack([torch.randperm(routed.num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    scores = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(weight)
    call = routed.routed_call(x.to(weight.device), index.to(weight.device), scores.to(weight.device))
    try:
        want = original(*call)
    except Exception:  # a forward that takes other inputs is not the experts interface
        return False
    got = routed(*call)
    return outputs_match(got, want, weight.dtype, 3e-2)  # accumulation order, in the model's dtype


def _top_k(model: nn.Module, path: str) -> int | None:
    """How many experts the router of the experts at `path` picks a token: its mixture's top_k
    (Llama4TextMoe's, which its router's config gave), else the model's num_experts_per_tok."""
    top_k = getattr(model.get_submodule(path.rpartition(".")[0]), "top_k", None)
    if isinstance(top_k, int):
        return top_k
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "num_experts_per_tok", None)


def route_experts(model: nn.Module, only: list[str] | None = None, check: bool = True) -> tuple[list[str], dict[str, str]]:
    """Replace the model's experts modules (or the ones at `only`'s paths) by RoutedExperts, in
    place; returns the paths replaced and, for modules kept as they are, why. `check`: run the
    probe first (a meta skeleton, which mpq.load routes as its manifest says, cannot run one)."""
    from mpq.apply import set_module

    found = [name for name, module in model.named_modules() if is_experts(module) or is_scored_experts(module)]
    if only is not None:
        missing = [path for path in only if path not in found]
        if missing:
            raise ValueError(f"{missing[0]} is not an experts module of this model")
        found = [name for name in found if name in set(only)]
    replaced, kept = [], {}
    for name in found:
        # one module at a time, holding no other reference to it: its stacked weights are freed
        # once replaced, so the model never holds more than one mixture's experts twice
        module = model.get_submodule(name)
        routed = ScoredExperts(module, _top_k(model, name)) if is_scored_experts(module) else RoutedExperts(module)
        if check and not routes_like(module, routed):
            kept[name] = (f"{type(module).__name__}'s forward is not the routed sum of its experts' "
                          "linears (checked on probe tokens)")
            continue
        set_module(model, name, routed)
        del module, routed
        replaced.append(name)
    if replaced:
        log.info("%d experts modules routed through per-expert linears", len(replaced))
    return replaced, kept
