"""A table tied to the output head (most small LMs) is one plan layer with it: the head is
quantised once and the table's lookups read their rows from the head's tensors, whatever backend
holds them, so checkpoints store the weight once and load back bit-identical."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import MANIFEST, WEIGHTS, kernels_of, save_config
from mpq.formats import get_format
from mpq.kernels.cpu_int4_layout import int4_rows
from mpq.memory import memory_model, resident_bytes
from mpq.models import load_model
from mpq.plan import Plan
from mpq.qembedding import TiedEmbedding
from mpq.qlinear import QuantizedLinear, triton_available
from mpq.quantize import dequantize_weight, quantize_weight

from conftest import trace_tiny as _graph

TABLE, HEAD = "model.embed_tokens", "lm_head"


def _backends():
    return ["cpu", "reference"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("name", ["fp16", "int8", "int4-g32", "int4-g64-sym", "int4-g128", "int4-pc"])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rows", [80, 128])
def test_tied_lookup_is_the_heads_dequantised_weight_row_by_row(name, backend, rows):
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(rows)
    weight = (torch.randn(rows, 128, generator=generator) * 0.05).to(torch.bfloat16)
    tensors = quantize_weight(weight, fmt)
    head = QuantizedLinear(fmt, tensors, None, 128, rows, backend)
    table = TiedEmbedding(head, HEAD, torch.bfloat16, tensors)
    ids = torch.randint(0, rows, (3, 7), generator=generator)
    ids[0, :2] = torch.tensor([rows - 1, rows - 1])
    out = table(ids)
    assert out.shape == (3, 7, 128) and out.dtype == torch.bfloat16
    expected = F.embedding(ids, dequantize_weight(tensors, fmt))
    if backend == "cpu" and fmt.bits == 4:
        # the CPU kernel's zero offset (8 - z) s is held in bf16: an error of s/64 at most
        assert table._own is None  # read from the kernel's layout, no second copy
        tolerance = tensors["scales"].float().max().item() / 32
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=tolerance)
    else:
        assert torch.equal(out, expected.to(torch.bfloat16))
    if fmt.quantized:
        assert not torch.equal(out, F.embedding(ids, weight))
    assert table(ids).shape == out.shape and list(table.named_buffers()) == []  # holds nothing of its own


def test_tied_lookup_undoes_awqs_input_scale():
    fmt = get_format("int4-g32")
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 64, generator=generator) * 0.05
    scale = torch.rand(64, generator=generator) + 0.5
    tensors = {**quantize_weight(weight / scale, fmt), "input_scale": scale.to(torch.bfloat16)}
    head = QuantizedLinear(fmt, tensors, None, 64, 64, "reference")
    ids = torch.tensor([[0, 5, 63]])
    expected = F.embedding(ids, dequantize_weight(tensors, fmt))
    torch.testing.assert_close(TiedEmbedding(head, HEAD, torch.float32, tensors)(ids), expected)
    x = torch.randn(2, 64, generator=generator)
    torch.testing.assert_close(head(x), x @ dequantize_weight(tensors, fmt).t(), rtol=1e-4, atol=1e-4)


def test_a_changed_cpu_layout_keeps_a_copy_rather_than_wrong_rows(monkeypatch, caplog):
    import mpq.qembedding as qembedding

    fmt = get_format("int4-g64")
    weight = torch.randn(80, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    tensors = quantize_weight(weight, fmt)
    head = QuantizedLinear(fmt, tensors, None, 64, 80, "cpu")
    monkeypatch.setattr(qembedding, "int4_rows", lambda packed, ids, n, k: 15 - int4_rows(packed, ids, n, k))
    with caplog.at_level(logging.WARNING):
        table = TiedEmbedding(head, HEAD, torch.float32, tensors)
    assert table._own is not None and "keeps its own copy" in caplog.text
    ids = torch.tensor([0, 40, 79])
    assert torch.equal(table(ids), dequantize_weight(tensors, fmt)[ids])


def test_trace_makes_the_tied_head_a_layer_unless_tables_are_left_alone(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    graph = _graph(loaded)
    head = next(layer for layer in graph.layers if layer.name == HEAD)
    assert head.tied_table == TABLE and head.block is None and head.out_features == loaded.model.config.vocab_size
    assert TABLE not in {layer.name for layer in graph.layers}
    assert "shares its weight with lm_head" in graph.excluded[TABLE]
    left = _graph(loaded, embeddings=False)
    assert HEAD not in {layer.name for layer in left.layers} and "tied" in left.excluded[HEAD]
    assert "left as stored" in left.excluded[TABLE]


@pytest.mark.parametrize("head_format", ["int4-g64", "int8", "fp16"])
def test_tied_checkpoint_stores_the_weight_once_and_loads_bit_identical(tiny_llama_dir, tmp_path, head_format):
    loaded = load_model(str(tiny_llama_dir))
    graph = _graph(loaded)
    plan = Plan(formats={layer.name: (head_format if layer.name == HEAD else "int4-g32") for layer in graph.layers},
                model=str(tiny_llama_dir))
    formats = [get_format(name) for name in {"int4-g32", head_format}]
    memory = memory_model(loaded.model, graph.layers, formats)
    # the table is no fixed byte any more: every layer as stored is the whole model
    stored = {layer.name: {"x": layer.params * 2} for layer in graph.layers}
    assert memory.fixed_bytes + sum(v["x"] for v in stored.values()) == resident_bytes(loaded.model)
    ids = torch.randint(0, 4000, (2, 24))
    original = loaded.model(input_ids=ids, use_cache=False).logits
    with applied(loaded.model, plan.specs(), QuantizedWeightCache(loaded.model)) as tensors:
        assert isinstance(loaded.model.get_submodule(TABLE), TiedEmbedding)
        before = loaded.model(input_ids=ids, use_cache=False).logits
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    assert not torch.equal(before, original)
    restored = loaded.model.get_submodule(TABLE)
    assert type(restored) is torch.nn.Embedding and restored.weight is loaded.model.get_submodule(HEAD).weight

    from safetensors import safe_open

    with safe_open(str(tmp_path / "cfg" / WEIGHTS), "pt") as handle:
        assert not [key for key in handle.keys() if key.startswith(TABLE)]  # the head's tensors serve both
    manifest = json.loads((tmp_path / "cfg" / MANIFEST).read_text())
    assert manifest["tied_tables"] == {HEAD: {"table": TABLE, "dtype": "bfloat16"}}
    model = mpq.load(tmp_path / "cfg")
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    assert resident_bytes(model) == memory.total(plan.formats)
    assert kernels_of(model)[TABLE].startswith("rows of lm_head's weight")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_a_manifest_that_drops_or_misplaces_the_tie_is_refused(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    plan = Plan(formats={layer.name: "int8" for layer in _graph(loaded).layers}, model=str(tiny_llama_dir))
    with applied(loaded.model, plan.specs(), QuantizedWeightCache(loaded.model)) as tensors:
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    path = tmp_path / "cfg" / MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "tied_tables": {}}))
    with pytest.raises(mpq.MpqError, match="scales table 'model.embed_tokens'"):  # a factor for no planned table
        mpq.load(tmp_path / "cfg")
    path.write_text(json.dumps({**manifest, "tied_tables": {}, "embedding_scales": {}}))
    with pytest.raises(mpq.MpqError, match="missing"):
        mpq.load(tmp_path / "cfg")
    path.write_text(json.dumps({**manifest, "tied_tables": {HEAD: {"table": "model.norm", "dtype": "bfloat16"}}}))
    with pytest.raises(mpq.MpqError, match="ties lm_head"):
        mpq.load(tmp_path / "cfg")


def test_kl_sensitivity_of_the_head_counts_the_tables_rounding_too(tiny_llama_dir):
    """Measured with the head alone quantised, the lookups are quantised as well: the logits differ
    from those of a head quantised with the original table."""
    from mpq.tasks import calibration_text, make_task

    loaded = load_model(str(tiny_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    work = loaded.model.float()
    reference = task.reference(work)
    fmt = get_format("int4-pc")
    cache = QuantizedWeightCache(work)
    with applied(work, {HEAD: fmt}, cache):
        both = task.divergence(work, reference)
    head_only = QuantizedLinear(fmt, cache.get(HEAD, fmt), None, 64, work.config.vocab_size, "reference")
    original_head = work.lm_head
    try:
        work.lm_head = head_only
        alone = task.divergence(work, reference)
    finally:
        work.lm_head = original_head
    assert both > 0 and alone > 0 and both != alone
