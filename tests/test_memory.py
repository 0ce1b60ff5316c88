import pytest
import torch

from mpq.apply import QuantizedWeightCache, applied
from mpq.errors import MpqError
from mpq.formats import parse_formats
from mpq.memory import kept_as_stored, kept_summary, memory_model, parse_size, resident_bytes
from mpq.trace import trace_model

from conftest import tiny_llama


@pytest.mark.parametrize("text,expected", [
    ("6GB", 6 * 10**9), ("6GiB", 6 * 2**30), ("750MB", 750 * 10**6), ("750 MiB", 750 * 2**20),
    ("1.5GB", 1_500_000_000), ("123456", 123456), ("12kb", 12000), (4096, 4096), ("10B", 10),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["6 gigs", "GB", "-5MB", "1e9", "six"])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(MpqError, match="cannot read size"):
        parse_size(bad)


def test_resident_bytes_counts_tied_tensors_once():
    model = tiny_llama(256, tie=True)
    untied = tiny_llama(256, tie=False)
    assert resident_bytes(untied) - resident_bytes(model) == 256 * 64 * 4


@pytest.mark.parametrize("plan_fmt", ["fp16", "int8", "int4-g64", "mixed"])
def test_memory_model_is_exact(plan_fmt):
    """Predicted bytes equal the bytes the model really holds once the plan is applied."""
    model = tiny_llama(256)
    graph = trace_model(model, {"input_ids": torch.randint(0, 256, (1, 8)), "use_cache": False})
    formats = parse_formats("fp16,int8,int4", group_size=64)
    memory = memory_model(model, graph.layers, formats)
    names = [f.name for f in formats]
    plan = {l.name: (names[i % 3] if plan_fmt == "mixed" else plan_fmt) for i, l in enumerate(graph.layers)}
    with applied(model, {k: next(f for f in formats if f.name == v) for k, v in plan.items()}, QuantizedWeightCache(model)):
        assert resident_bytes(model) == memory.total(plan)
    assert memory.smallest() <= memory.total(plan) <= memory.largest()


def test_kept_as_stored_says_where_the_bytes_no_format_shrinks_are():
    """A mixture of experts holds its experts as stacked 3-D parameters, which no plan layer
    takes until mpq.experts routes them (here they are not): the kept groups name them (blocks
    folded into *) and add up to the fixed bytes."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                             num_experts_per_tok=2)).eval()
    graph = trace_model(model, {"input_ids": torch.randint(0, 128, (1, 8)), "use_cache": False})
    kept = kept_as_stored(model, graph.layers)
    memory = memory_model(model, graph.layers, parse_formats("int8"))
    assert sum(k.bytes for k in kept) == memory.fixed_bytes
    largest = kept[0]
    assert (largest.pattern, largest.owner, largest.dims, largest.count) == (
        "model.layers.*.mlp.experts.gate_up_proj", "MixtralExperts", 3, 2)
    assert largest.bytes == 2 * 4 * (2 * 64) * 32 * 4
    assert [k.bytes for k in kept] == sorted((k.bytes for k in kept), reverse=True)
    assert kept_summary(kept, 1) == "model.layers.*.mlp.experts.gate_up_proj 131.07 KB (2 x MixtralExperts, 3-D)"
    planned = {layer.name for layer in graph.layers}
    assert not any(k.pattern.removesuffix(".weight") in planned for k in kept)  # plan layers are not kept
