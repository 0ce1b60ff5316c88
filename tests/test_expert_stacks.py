"""Grouped expert launches (mpq.expert_stacks, the kernels' GROUPED path) against the reference and
against the per-expert loop, under TRITON_INTERPRET=1 on the CPU (conftest sets it without a GPU)."""

import pytest
import torch

from mpq.apply import QuantizedWeightCache, applied, set_module
from mpq.checkpoint import kernels_of
from mpq.experts import route_experts
from mpq.formats import get_format
from mpq.kernels.reference import linear_reference
from mpq.memory import resident_bytes
from mpq.quantize import quantize_weight

from conftest import tiny_gpt_oss, tiny_llama4, tiny_mixtral

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PINNED = {"split": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 4},
          "nosplit": {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1},
          "default": None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _grouped(fmt, x, slots, stacked, config):
    from mpq.kernels.triton_w4a16 import w4a16_grouped
    from mpq.kernels.triton_w8a16 import w8a16_grouped

    if fmt.bits == 8:
        return w8a16_grouped(x, slots, stacked["qweight"], stacked["scales"], config=config)
    return w4a16_grouped(x, slots, stacked["qweight"], stacked["scales"], stacked.get("zeros"),
                         fmt.group_along(x.shape[1]), config=config)


@pytest.mark.parametrize("path", list(PINNED))
@pytest.mark.parametrize("fmt_name,n,k", [("int4-g32", 33, 256), ("int4-g64-sym", 48, 192), ("int4-pc", 17, 128),
                                          ("int8", 33, 250), ("int8", 40, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_grouped_launch_runs_each_row_through_its_own_expert(path, fmt_name, n, k, dtype):
    """Row p of the output is row p of x through the expert in slot slots[p], as the reference computes
    it; a row whose slot is -1 (an expert another stack holds) comes out exactly 0."""
    fmt = get_format(fmt_name)
    torch.manual_seed(n + k)
    experts = [quantize_weight(torch.randn(n, k), fmt) for _ in range(5)]
    stacked = {key: torch.stack([t[key] for t in experts]).to(DEVICE) for key in experts[0]}
    x = torch.randn(7, k, dtype=dtype, device=DEVICE)
    slots = torch.tensor([4, 0, -1, 2, 2, 1, 4], dtype=torch.int32, device=DEVICE)  # repeats, a gap, one foreign
    config = PINNED[path]
    if config is not None and fmt.bits == 4 and fmt.group_along(k) % config["BLOCK_K"]:
        config = {**config, "BLOCK_K": 16}
    got = _grouped(fmt, x, slots, stacked, config)
    assert got.shape == (7, n) and got.dtype == dtype
    for p, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(got[p], torch.zeros_like(got[p]))
        else:
            expected = linear_reference(x[p:p + 1], {key: t.to(DEVICE) for key, t in experts[slot].items()}, fmt, None)
            assert rel_err(got[p:p + 1], expected) < 1e-2, (p, slot)


@pytest.mark.parametrize("path", list(PINNED))
@pytest.mark.parametrize("n,k", [(33, 250), (17, 96), (64, 31)])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.float32)])
def test_a_grouped_16_bit_launch_runs_each_row_through_its_own_expert(path, n, k, dtype, weight_dtype):
    """The 16-bit experts' grouped launch: row p is x[p] @ W[slots[p]]^T (K and N odd, K under one
    step), in x's dtype; a row whose slot is -1 comes out exactly 0."""
    from mpq.kernels.triton_dense_grouped import dense_grouped

    torch.manual_seed(n * k)
    weight = torch.randn(5, n, k).to(weight_dtype).to(DEVICE)
    x = torch.randn(7, k, dtype=dtype, device=DEVICE)
    slots = torch.tensor([4, 0, -1, 2, 2, 1, 4], dtype=torch.int32, device=DEVICE)
    got = dense_grouped(x, slots, weight, config=PINNED[path])
    assert got.shape == (7, n) and got.dtype == dtype
    for p, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(got[p], torch.zeros_like(got[p]))
        else:
            expected = x[p:p + 1].float() @ weight[slot].float().T
            assert rel_err(got[p:p + 1], expected) < 1e-2, (p, slot)
    with pytest.raises(ValueError, match="stacked"):
        dense_grouped(x, slots, weight[0])


def test_a_grouped_launch_refuses_arguments_that_do_not_fit():
    fmt = get_format("int4-g32")
    stacked = {key: torch.stack([t[key] for t in [quantize_weight(torch.randn(16, 64), fmt)] * 2]) for key in ("qweight", "scales", "zeros")}
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one slot per row of x"):
        _grouped(fmt, x, torch.zeros(2, dtype=torch.int32), stacked, None)
    with pytest.raises(ValueError, match="one slot per row of x"):
        _grouped(fmt, x, torch.zeros(3, dtype=torch.int64), stacked, None)
    with pytest.raises(ValueError, match="stacked"):
        _grouped(fmt, x, torch.zeros(3, dtype=torch.int32), {key: t[0] for key, t in stacked.items()}, None)
    with pytest.raises(ValueError, match="BLOCK_M must be 1"):
        _grouped(fmt, x, torch.zeros(3, dtype=torch.int32), stacked, {**PINNED["split"], "BLOCK_M": 16})


def _mixture(build, formats, path: str = "model.layers.0.mlp.experts"):
    """A tiny mixture with its experts routed, the mixture at `path`, and a plan of its experts'
    layers (expert e in formats[e % len(formats)])."""
    model = build()
    route_experts(model)
    mixture = model.get_submodule(path)
    plan = {f"{path}.{e}.{projection}": get_format(formats[e % len(formats)])
            for e in range(mixture.num_experts) for projection in (mixture.expert(e).up_name, "down_proj")}
    return model.to(torch.bfloat16), mixture, plan


def _routes(tokens: int, experts: int, top_k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=generator).to(torch.bfloat16)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(torch.bfloat16)
    return x, index, weights


def _loop(mixture, x, index, weights):
    mixture.group_decode = False
    try:
        return mixture(x, index, weights)
    finally:
        mixture.group_decode = True


@pytest.mark.parametrize("build,formats", [("mixtral", ["int8", "int4-g32"]), ("gpt_oss", ["int4-g32-sym"])],
                         ids=["mixtral-two-formats", "gpt_oss-biases"])
def test_decode_runs_grouped_and_agrees_with_the_per_expert_loop(build, formats, monkeypatch):
    monkeypatch.setenv("MPQ_KERNELS", "triton")
    model, mixture, plan = _mixture({"mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}[build], formats)
    with applied(model, plan, QuantizedWeightCache(model)):
        before = resident_bytes(model)
        assert mixture.runs_grouped() and not mixture._stacks
        x, index, weights = _routes(3, mixture.num_experts, 2, seed=1)
        index[2, 1] = mixture.num_experts  # an id past the experts: no expert here (expert parallelism)
        grouped = mixture(x, index, weights)
        stacks = mixture._stacks[x.device]
        assert [len(projection.stacks) for projection in stacks] == [len(formats)] * 2  # a stack per format
        looped = _loop(mixture, x, index, weights)
        assert grouped.shape == looped.shape == x.shape and rel_err(grouped, looped) < 2e-2
        # every expert layer now reads a slice of its format's stack: no byte held twice
        for layers, projection in zip(mixture.projections(), stacks):
            for layer in layers:
                stack = next(stack for stack in projection.stacks if stack.fmt == layer.fmt)
                assert layer.qweight.untyped_storage().data_ptr() == stack.tensors["qweight"].untyped_storage().data_ptr()
        assert resident_bytes(model) == before
        kernels = kernels_of(model)
        assert "grouped: one launch per format over the mixture's 4 experts" in kernels["model.layers.0.mlp.experts.3.down_proj"]

        # more tokens than decode: the loop, whose answer the grouped path gave
        x, index, weights = _routes(17, mixture.num_experts, 2, seed=2)
        assert torch.equal(mixture(x, index, weights), _loop(mixture, x, index, weights))
    assert not mixture._stacks and not mixture.runs_grouped()  # the originals are back: the stacks went


@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4s_scored_experts_decode_grouped_and_agree_with_the_loop(top_k, monkeypatch):
    """Llama 4's experts (mpq.experts.ScoredExperts) at decode: each token's top_k nonzero rows go
    through two grouped launches per format, and the rows the router did not pick come out 0, as
    the loop over the picked rows gives them."""
    monkeypatch.setenv("MPQ_KERNELS", "triton")
    model, mixture, plan = _mixture(lambda: tiny_llama4(top_k), ["int8", "int4-g32"], "model.layers.0.feed_forward.experts")
    with applied(model, plan, QuantizedWeightCache(model)):
        assert mixture.runs_grouped()
        x, index, weights = _routes(3, mixture.num_experts, top_k, seed=5)
        (hidden,) = mixture.routed_call(x, index, weights.abs())
        grouped = mixture(hidden)
        assert [len(projection.stacks) for projection in mixture._stacks[x.device]] == [2, 2]
        mixture.group_decode = False
        looped = mixture(hidden)
        mixture.group_decode = True
        assert grouped.shape == looped.shape == hidden.shape and rel_err(grouped, looped) < 2e-2
        unpicked = torch.ones(mixture.num_experts, 3, dtype=torch.bool)
        unpicked[index.t(), torch.arange(3)] = False
        blocks = grouped.view(mixture.num_experts, 3, -1)
        assert torch.equal(blocks[unpicked], torch.zeros_like(blocks[unpicked]))
        step = model(input_ids=torch.tensor([[5]]), use_cache=False).logits  # a whole decode step, grouped
        mixture.group_decode = False
        assert rel_err(step, model(input_ids=torch.tensor([[5]]), use_cache=False).logits) < 2e-2


def test_16_bit_experts_join_the_grouped_launches_but_alone_on_the_cpu_keep_the_loop(monkeypatch):
    """An expert the plan keeps in 16 bits runs in a grouped launch of its own beside the quantised
    ones (so it no longer sends the mixture to the loop); a mixture whose experts are all 16-bit
    groups only on CUDA: on the CPU no Triton layer shows that Triton runs here, and it keeps the loop."""
    monkeypatch.setenv("MPQ_KERNELS", "triton")
    model, mixture, plan = _mixture(tiny_mixtral, ["fp16", "int4-g32", "fp16", "int8"])
    with applied(model, plan, QuantizedWeightCache(model)):
        assert mixture.runs_grouped()
        x, index, weights = _routes(3, mixture.num_experts, 2, seed=7)
        grouped = mixture(x, index, weights)
        stacks = mixture._stacks[x.device]
        assert [sorted(stack.fmt.name for stack in projection.stacks) for projection in stacks] == \
            [["fp16", "int4-g32", "int8"]] * 2
        dense = next(stack for stack in stacks[1].stacks if stack.fmt.name == "fp16")
        assert dense.tensors["weight"].shape[0] == 2  # experts 0 and 2
        assert mixture.expert(2).down_proj.weight.data_ptr() == dense.tensors["weight"][1].data_ptr()
        assert rel_err(grouped, _loop(mixture, x, index, weights)) < 2e-2
        # F.linear's own part says whether this CPU takes float32 tiles (one with no 16-bit GEMM: mpq.cpu_matmul)
        from mpq.cpu_matmul import routes
        from mpq.kernels.cpu import DENSE_FLOAT32_FROM_TOKENS

        own = f"F.linear, float32 tiles from {DENSE_FLOAT32_FROM_TOKENS} tokens" if routes(dense.tensors["weight"].dtype) \
            else "F.linear"
        assert kernels_of(model)["model.layers.0.mlp.experts.0.down_proj"].startswith(
            own + "; up to 16 tokens grouped (triton dense_grouped): one launch per format")
    model, mixture, plan = _mixture(tiny_mixtral, ["fp16"])
    with applied(model, plan, QuantizedWeightCache(model)):
        x, index, weights = _routes(2, mixture.num_experts, 2, seed=8)
        assert not mixture.runs_grouped()
        assert torch.equal(mixture(x, index, weights), _loop(mixture, x, index, weights))
        assert mixture._stacks == {x.device: ()}


def test_a_swapped_expert_layer_unstacks_the_mixture_and_the_next_call_reads_it(monkeypatch):
    from mpq.qlinear import QuantizedLinear
    monkeypatch.setenv("MPQ_KERNELS", "triton")
    model, mixture, plan = _mixture(tiny_mixtral, ["int8"])
    x, index, weights = _routes(2, mixture.num_experts, 2, seed=3)
    index[:] = torch.tensor([1, 2])
    with applied(model, plan, QuantizedWeightCache(model)):
        first = mixture(x, index, weights)
        assert mixture._stacks[x.device]
        name = "model.layers.0.mlp.experts.2.down_proj"
        old = model.get_submodule(name)
        swapped = QuantizedLinear(get_format("int8"), {"qweight": -old.qweight.clone(), "scales": old.scales.clone()},
                                  None, old.in_features, old.out_features)
        set_module(model, name, swapped)
        assert not mixture._stacks  # cleared by the swap, so no stale stack runs the old weights
        second = mixture(x, index, weights)
        assert mixture._stacks[x.device] and not torch.allclose(first, second, atol=1e-3)
        assert rel_err(second, _loop(mixture, x, index, weights)) < 2e-2
        set_module(model, name, old)
        # a cast of the model keeps the layers' stored tensors (QuantizedLinear._apply), so the
        # stacks still hold them and serve fp16 activations as they are
        mixture(x, index, weights)
        kept = mixture._stacks[x.device]
        mixture.half()
        assert all(projection.intact() for projection in kept)
        third = mixture(x.half(), index, weights.half())
        assert mixture._stacks[x.device] is kept and kept[0].stacks[0].tensors["scales"].dtype == torch.bfloat16
        assert third.dtype == torch.float16
        assert rel_err(third, _loop(mixture, x.half(), index, weights.half())) < 2e-2
        # tensors copied apart from the stack (as a move to another device would) are stacked again
        first = kept[0].stacks[0].first
        first.scales = first.scales.clone()
        assert not all(projection.intact() for projection in kept)
        mixture(x.half(), index, weights.half())
        assert mixture._stacks[x.device] is not kept


def test_awq_input_scales_stack_with_their_experts(monkeypatch):
    monkeypatch.setenv("MPQ_KERNELS", "triton")
    model, mixture, plan = _mixture(tiny_mixtral, ["int4-g32"])
    with applied(model, plan, QuantizedWeightCache(model)):
        generator = torch.Generator().manual_seed(4)
        for layer in mixture.projections()[0]:  # the input divisors AWQ leaves on a layer (x / s)
            layer.register_buffer("input_scale", (torch.rand(layer.in_features, generator=generator) + 0.5).to(torch.bfloat16))
        x, index, weights = _routes(4, mixture.num_experts, 2, seed=5)
        grouped = mixture(x, index, weights)
        assert mixture._stacks[x.device][0].stacks[0].input_scale is not None
        assert rel_err(grouped, _loop(mixture, x, index, weights)) < 2e-2


def test_experts_off_triton_keep_the_loop():
    """On torch's CPU kernels (or a dense expert) a mixture has nothing to stack: it keeps the loop."""
    model, mixture, plan = _mixture(tiny_mixtral, ["int8", "fp16"])
    with applied(model, plan, QuantizedWeightCache(model), backend="cpu"):
        x, index, weights = _routes(2, mixture.num_experts, 2, seed=6)
        assert not mixture.runs_grouped()
        assert torch.equal(mixture(x, index, weights), _loop(mixture, x, index, weights))
        assert mixture._stacks == {x.device: ()}
        assert "grouped" not in " ".join(kernels_of(model).values())


def test_a_saved_mixture_loaded_on_triton_decodes_grouped_and_matches_the_reference(tmp_path, demo_tokenizer):
    """What `mpq inspect --check` asks of a config on CUDA, here on the interpreter: every expert
    layer on Triton, grouped at decode, and the logits of a prompt (20 tokens: the loop) and of one
    token (grouped) within 2e-2 of the reference."""
    from mpq.checkpoint import save_config
    from mpq.device_check import check_on_device
    from mpq.models import CAUSAL_LM
    from mpq.plan import Plan
    from mpq.trace import trace_model

    model = tiny_mixtral()
    route_experts(model)
    graph = trace_model(model, {"input_ids": torch.randint(0, 128, (1, 8)), "use_cache": False})
    formats = {layer.name: ("int4-g32" if ".experts." in layer.name and layer.name.split(".")[-2] in "13" else "int8")
               for layer in graph.layers if layer.kind != "embed_tokens"}
    plan = Plan(formats=formats, model="mixtral")
    with applied(model, plan.specs(), QuantizedWeightCache(model)) as tensors:
        folder = save_config(tmp_path / "cfg", model, demo_tokenizer, CAUSAL_LM, plan, tensors, {"note": "test"})
    result = check_on_device(folder, "cpu", backend="triton", tokens=20)
    assert result["fallback_layers"] == [] and all(err < 2e-2 for err in result["rel_err"].values()), result
    grouped = [kernel for kernel in result["kernels"] if "grouped" in kernel]
    assert sum(result["kernels"][kernel] for kernel in grouped) == 2 * 4 * 2  # both mixtures' experts, both projections
