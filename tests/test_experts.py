"""A mixture of experts' stacked 3-D weights become per-expert linears (mpq.experts): the routed
model computes what the original did, its experts are layers of their own (never fused, weighed
by how often the router picks them), calibration copes with an expert no token reached, and a
config saved from it loads back routed the same way."""

import json

import pytest
import torch
from torch import nn

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.calib_stats import StatsRecorder
from mpq.checkpoint import MANIFEST, save_config
from mpq.errors import MpqError
from mpq.experts import (RoutedExperts, ScoredExperts, coverage, describe_routed, is_experts, is_scored_experts,
                         route_experts, routed_tokens)
from mpq.latency import LatencyModel, routed_calls
from mpq.models import CAUSAL_LM
from mpq.plan import Plan
from mpq.report import _experts_line
from mpq.trace import trace_model

from conftest import tiny_gpt_oss as _gpt_oss
from conftest import tiny_llama4 as _llama4
from conftest import tiny_mixtral as _mixtral

EXPORT = {"use_cache": False}


@pytest.mark.parametrize("build", [_mixtral, _gpt_oss], ids=["mixtral", "gpt_oss"])
def test_routed_experts_compute_what_the_stacked_experts_did_and_are_layers(build):
    model = build()
    ids = torch.randint(0, 128, (2, 12))
    original = model(input_ids=ids, **EXPORT).logits
    stacked = [name for name, module in model.named_modules() if is_experts(module)]
    routed, kept = route_experts(model)
    assert routed == stacked == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"] and kept == {}
    assert all(isinstance(model.get_submodule(name), RoutedExperts) for name in routed)
    assert not any(p.dim() == 3 for p in model.parameters())
    again = model(input_ids=ids, **EXPORT).logits
    assert (again - original).abs().max() <= 1e-5 * original.abs().max()

    graph = trace_model(model, {"input_ids": ids[:1], **EXPORT})
    assert graph.method == "export"
    experts = [layer for layer in graph.layers if ".experts." in layer.name]
    assert [layer.kind for layer in experts[:4]] == ["mlp.experts.0.gate_up_proj", "mlp.experts.0.down_proj",
                                                     "mlp.experts.1.gate_up_proj", "mlp.experts.1.down_proj"]
    assert len(experts) == 2 * 4 * 2 and all(layer.routed_share == 0.5 for layer in experts)
    assert (experts[0].out_features, experts[0].in_features) == (128, 32)  # [2I, H], whichever way it was stored
    grouped = {name for group in graph.shared_input_groups() for name in group}
    assert not grouped & {layer.name for layer in experts}  # experts read different tokens: they never fuse
    assert all(layer.routed_share == 1.0 for layer in graph.layers if ".experts." not in layer.name)


def test_the_export_path_sums_the_same_experts_as_the_routed_one():
    model = _mixtral()
    route_experts(model)
    experts = model.model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=generator)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(9)])
    weights = torch.softmax(torch.randn(9, 2, generator=generator), dim=-1)
    routed = experts(x, index, weights)
    dense = experts._every_expert(x, index, weights)
    assert (routed - dense).abs().max() <= 1e-5 * routed.abs().max()
    index[:, :] = 3  # every token to one expert: the others get no rows
    assert torch.allclose(experts(x, index, weights), experts._run(3, x) * weights.sum(-1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4s_scored_experts_become_per_expert_linears_that_run_only_the_picked_rows(top_k):
    """Llama 4 hands its experts every token once per expert, scaled by the router's score (0 where
    not picked): ScoredExperts runs each expert on its nonzero rows only, and the model computes
    what it did; each expert's projections are layers that see top_k / E of the tokens."""
    model = _llama4(top_k)
    ids = torch.randint(0, 128, (2, 12))
    original = model(input_ids=ids, **EXPORT).logits
    stacked = [name for name, module in model.named_modules() if is_scored_experts(module)]
    assert not any(is_experts(module) for module in model.modules())
    routed, kept = route_experts(model)
    assert routed == stacked == ["model.layers.0.feed_forward.experts", "model.layers.1.feed_forward.experts"]
    assert kept == {} and all(type(model.get_submodule(name)) is ScoredExperts for name in routed)
    assert not any(p.dim() == 3 for p in model.parameters())
    again = model(input_ids=ids, **EXPORT).logits
    assert (again - original).abs().max() <= 1e-5 * original.abs().max()

    experts = model.model.layers[0].feed_forward.experts
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=generator)
    index = torch.stack([torch.randperm(4, generator=generator)[:top_k] for _ in range(9)])
    (hidden,) = experts.routed_call(x, index, torch.rand(9, top_k, generator=generator) + 0.1)
    out = experts(hidden).view(4, 9, 32)
    for e in range(4):
        picked = (index == e).any(-1)
        assert torch.equal(out[e, ~picked], torch.zeros_like(out[e, ~picked]))  # rows not routed: never run, 0
        assert torch.allclose(out[e, picked], experts._run(e, hidden.view(4, 9, 32)[e, picked]), atol=1e-6)
    assert experts.routed_counts((hidden,)).tolist() == [int((index == e).sum()) for e in range(4)]

    graph = trace_model(model, {"input_ids": ids[:1], **EXPORT})
    assert graph.method == "export"
    layers = [layer for layer in graph.layers if ".experts." in layer.name]
    assert [layer.kind for layer in layers[:2]] == ["feed_forward.experts.0.gate_up_proj", "feed_forward.experts.0.down_proj"]
    assert len(layers) == 2 * 4 * 2 and all(layer.routed_share == top_k / 4 for layer in layers)
    assert (layers[0].out_features, layers[0].in_features) == (128, 32)  # [2I, H]: stored [H, 2I]
    grouped = {name for group in graph.shared_input_groups() for name in group}
    assert not grouped & {layer.name for layer in layers}
    hooks = trace_model(model, {"input_ids": ids[:1], **EXPORT}, capture="hooks")
    assert sorted(layer.name for layer in hooks.layers) == sorted(layer.name for layer in graph.layers)
    counts = routed_tokens(model, [{"input_ids": ids, **EXPORT}])
    assert [sum(found) for found in counts.values()] == [24 * top_k] * 2


def test_an_experts_module_whose_forward_does_more_is_kept_with_its_reason():
    model = _mixtral()
    cls = type(model.model.layers[0].mlp.experts)

    class Doubled(cls):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    doubled = model.model.layers[1].mlp.experts
    doubled.__class__ = Doubled
    routed, kept = route_experts(model)
    assert routed == ["model.layers.0.mlp.experts"]
    assert "Doubled's forward is not the routed sum" in kept["model.layers.1.mlp.experts"]
    assert model.model.layers[1].mlp.experts is doubled


def test_an_expert_or_layer_no_calibration_token_reached_gets_isotropic_statistics():
    """An expert the router sent nothing is expected; a layer the model ran on no token (LED's
    global-attention projections) is reported (`unreached`), for the caller to warn of."""
    routed = nn.Linear(6, 4)
    routed.routed_share = 0.25
    plain, fed = nn.Linear(7, 4), nn.Linear(6, 4)
    recorder = StatsRecorder({"expert": routed, "fed": fed, "plain": plain}, {})
    fed(torch.randn(5, 6))
    stats = recorder.finish()
    assert torch.equal(stats.hessian["expert"], torch.eye(6)) and torch.equal(stats.absmean["expert"], torch.ones(6))
    assert torch.equal(stats.hessian["plain"], torch.eye(7)) and torch.equal(stats.absmean["plain"], torch.ones(7))
    assert not torch.equal(stats.hessian["fed"], torch.eye(6)) and stats.rows == 5
    assert stats.unreached == ["plain"]


def test_an_expert_counts_in_a_step_as_often_as_the_router_picks_it():
    assert routed_calls(0.25, 1) == (0.25, 1)  # decode at batch 1: a quarter of the steps, one token
    calls, tokens = routed_calls(0.25, 512)
    assert calls == pytest.approx(1.0) and tokens == 128  # prefill: every step, its share of the tokens
    calls, tokens = routed_calls(0.5, 4)
    assert calls == pytest.approx(1 - 0.5 ** 4) and tokens == round(2 / calls)
    latency = LatencyModel(regime={}, device="cpu", layers={"dense": [8, 8, False], "expert": [8, 8, False]}, groups=[],
                           layer_seconds={"dense": {"int8": 2.0}, "expert": {"int8": 4.0}}, group_seconds={},
                           baseline_seconds=10.0, rest_seconds=1.0, calls={"expert": 0.25})
    assert latency.predict({"dense": "int8", "expert": "int8"}) == 1.0 + 2.0 + 0.25 * 4.0


def test_a_routed_config_loads_back_routed_and_a_tampered_manifest_is_refused(tmp_path, demo_tokenizer):
    model = _mixtral()
    route_experts(model)
    graph = trace_model(model, {"input_ids": torch.randint(0, 128, (1, 8)), **EXPORT})
    experts = [layer.name for layer in graph.layers if ".experts." in layer.name]
    formats = {name: ("int4-g32" if i % 2 else "int8") for i, name in enumerate(experts)}  # per expert
    plan = Plan(formats=formats, model="mixtral")
    ids = torch.randint(0, 128, (1, 10))
    with applied(model, plan.specs(), QuantizedWeightCache(model)) as tensors:
        quantised = model(input_ids=ids, **EXPORT).logits
        folder = save_config(tmp_path / "cfg", model, demo_tokenizer, CAUSAL_LM, plan, tensors, {"note": "test"})
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["routed_experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    loaded = mpq.load(folder)
    assert torch.equal(loaded(input_ids=ids, **EXPORT).logits, quantised)
    assert "2 x MixtralExperts of 4 experts, each seeing 0.5 of the tokens" in describe_routed(loaded)
    assert loaded.model.layers[0].mlp.experts.expert(1).down_proj.fmt.name == "int4-g32"

    for routed, message in ((["model.layers.0.mlp"], "routes experts the model does not have"),
                            ("model.layers.0.mlp.experts", "malformed routed_experts"),
                            ([], "is not in the model")):
        (folder / MANIFEST).write_text(json.dumps({**manifest, "routed_experts": routed}))
        with pytest.raises(MpqError, match=message):
            mpq.load(folder)


def test_the_report_says_how_the_calibration_tokens_spread_over_the_experts():
    model = _mixtral()
    route_experts(model)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16)), **EXPORT} for _ in range(3)]
    tokens = routed_tokens(model, batches)
    assert list(tokens) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(len(counts) == 4 and sum(counts) == 3 * 2 * 16 * 2 for counts in tokens.values())  # top-2 of each token
    tokens["model.layers.1.mlp.experts"][2] = 0
    spread = coverage(tokens)
    assert spread["mixtures"] == 2 and spread["experts"] == 8 and spread["min"] == 0
    assert spread["unreached"] == ["model.layers.1.mlp.experts.2"]
    line = _experts_line({"experts": spread})[0]
    assert "8 in 2 mixtures" in line and "1 got none (e.g. `model.layers.1.mlp.experts.2`)" in line
    assert coverage(routed_tokens(nn.Sequential(nn.Linear(2, 2)), [])) is None and _experts_line({"experts": None}) == []


@pytest.mark.slow
def test_a_mixture_compiles_end_to_end_with_gptq_and_a_latency_model(tmp_path, demo_tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    from mpq.cli import main
    from mpq.models import load_model

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             num_local_experts=4, num_experts_per_tok=2,
                                             max_position_embeddings=256)).eval().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "moe")
    demo_tokenizer.save_pretrained(tmp_path / "moe")
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "moe"), "-o", str(out), "-q", "--samples", "4", "--seq-len", "32",
                 "--trials", "12", "--max-configs", "2", "--method", "gptq", "--refine", "2",
                 "--formats", "int8,int4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experts"]["experts"] == 8 and summary["experts"]["max"] <= 4 * 32 * 2
    assert summary["fixed_bytes"] < 0.01 * summary["baseline"]["bytes"]  # only the routers stay as stored
    # the sampler's variables: q/k/v as one in each block, and each block's 4 experts as one per projection
    layers = sum(summary["configs"][0]["counts"].values())
    assert summary["search"]["variables"] == layers - 2 * 2 - 2 * 2 * 3
    assert "a mixture's projection is one variable over all its experts" in (out / "report.md").read_text()
    latency = json.loads((out / "latency.json").read_text())
    experts = [name for name in latency["layers"] if ".experts." in name]
    assert len(experts) == 16 and all(latency["calls"][name] == 0.5 for name in experts)
    ids = torch.randint(0, 4000, (1, 10))
    original = load_model(str(tmp_path / "moe")).model(input_ids=ids, use_cache=False).logits
    for folder in sorted((out / "configs").iterdir()):
        manifest = json.loads((folder / MANIFEST).read_text())
        assert set(experts) <= set(manifest["plan"]["formats"]) and len(manifest["routed_experts"]) == 2
        logits = mpq.load(folder)(input_ids=ids, use_cache=False).logits
        assert torch.nn.functional.cosine_similarity(logits.flatten().float(), original.flatten().float(), dim=0) > 0.99


def test_a_heatmap_of_many_experts_stays_a_drawable_size(tmp_path):
    """Qwen3-MoE's 128 experts give 256 columns per block: the panel narrows its columns and
    labels every few, each label with its expert's number."""
    import matplotlib.image

    from mpq.report import HEATMAP_MAX_INCHES, _column_label, draw_heatmap
    from mpq.sensitivity import SensitivityTable
    from mpq.trace import LayerInfo

    layers = [LayerInfo(name=f"model.layers.{b}.mlp.experts.{e}.{proj}", module_type="Linear",
                        kind=f"mlp.experts.{e}.{proj}", block=b, in_features=8, out_features=8, params=64,
                        order=i, has_bias=False, routed_share=8 / 128)
              for i, (b, e, proj) in enumerate((b, e, p) for b in range(2) for e in range(128) for p in ("up", "down"))]
    values = {layer.name: {"int8": 1e-4 * (1 + layer.order % 7), "int4-g128": 1e-2 * (1 + layer.order % 5)} for layer in layers}
    table = SensitivityTable(key="k", metric="kl", formats=["int8", "int4-g128"], layers=[l.name for l in layers],
                             values=values, calib={}, seconds=0.0)
    height, width, _ = matplotlib.image.imread(draw_heatmap(table, layers, tmp_path / "heatmap.png")).shape
    assert width <= 110 * (HEATMAP_MAX_INCHES + 4) and height < 1000
    assert _column_label("mlp.experts.17.down_proj") == "17.down_proj" and _column_label("self_attn.q_proj") == "q_proj"


def test_gptq_rounds_an_expert_no_calibration_token_reached_to_nearest(demo_tokenizer):
    """Nothing is known of such an expert's inputs: GPTQ on isotropic statistics compensates
    nothing, so its tensors are exactly round-to-nearest's, while a routed expert's are not."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from mpq.formats import get_format
    from mpq.methods import calibrated_tensors
    from mpq.quantize import quantize_weight
    from mpq.tasks import calibration_text, make_task

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             num_local_experts=4, num_experts_per_tok=2)).eval()
    route_experts(model)

    def never_expert_3(module, inputs, output):
        logits = output[0].clone()
        logits[:, 3] = -float("inf")
        top, index = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    model.model.layers[0].mlp.gate.register_forward_hook(never_expert_3)
    task = make_task(CAUSAL_LM, demo_tokenizer, calibration_text(None), samples=4, seq_len=32)
    assert routed_tokens(model, task.calibration_inputs())["model.layers.0.mlp.experts"][3] == 0
    graph = trace_model(model, {"input_ids": task.calib_ids[:1, :8], **EXPORT})
    fmt = get_format("int4-g32")
    tensors = calibrated_tensors("gptq", model, graph.layers, graph.shared_input_groups(), [fmt], task).tensors
    for e, reached in ((3, False), (0, True)):
        name = f"model.layers.0.mlp.experts.{e}.down_proj"
        rtn = quantize_weight(model.get_submodule(name).weight, fmt)
        assert torch.equal(tensors[(name, fmt.name)]["qweight"], rtn["qweight"]) != reached, e
