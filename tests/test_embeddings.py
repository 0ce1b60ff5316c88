"""Input embedding tables as plan layers: lookups that match the dequantised table, checkpoints that
load back bit-identical with the predicted bytes, round to nearest under every method, and their
own sensitivity and latency entries."""

import json

import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import MANIFEST, kernels_of, save_config
from mpq.clipping import clipped_grid
from mpq.cli import main
from mpq.formats import get_format
from mpq.memory import memory_model, resident_bytes
from mpq.methods import method_quantizer
from mpq.models import load_model
from mpq.packing import pack_int4_u8
from mpq.plan import Plan
from mpq.qembedding import QuantizedEmbedding
from mpq.quantize import dequantize_weight, quantize_weight

from conftest import trace_tiny as _graph

TABLE = "model.embed_tokens"


@pytest.mark.parametrize("name", ["fp16", "int8", "int4-g32", "int4-g64-sym", "int4-pc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lookup_is_the_dequantised_table_row_by_row(name, dtype):
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(3)
    table = (torch.randn(37, 64, generator=generator) * 0.05).to(dtype)  # an odd vocabulary
    tensors = quantize_weight(table, fmt)
    ids = torch.randint(0, 37, (3, 5), generator=generator)
    ids[0, :2] = torch.tensor([36, 36])  # the last row, looked up twice
    layer = QuantizedEmbedding(fmt, tensors, dtype)
    out = layer(ids)
    assert out.shape == (3, 5, 64) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids, dequantize_weight(tensors, fmt)).to(dtype))
    if fmt.quantized:  # a quantised lookup differs from the table (the test could fail)
        assert not torch.equal(out, F.embedding(ids, table))


def test_untied_table_checkpoint_loads_bit_identical_with_the_predicted_bytes(untied_llama_dir, tmp_path):
    loaded = load_model(str(untied_llama_dir))
    graph = _graph(loaded)
    assert graph.layers[0].name == TABLE
    plan = Plan(formats={layer.name: ("int4-g64" if layer.is_embedding else "int8") for layer in graph.layers},
                model=str(untied_llama_dir))
    memory = memory_model(loaded.model, graph.layers, [get_format("int8"), get_format("int4-g64")])
    ids = torch.randint(0, 4000, (2, 24))
    with applied(loaded.model, plan.specs(), QuantizedWeightCache(loaded.model)) as tensors:
        before = loaded.model(input_ids=ids, use_cache=False).logits
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    original = loaded.model(input_ids=ids, use_cache=False).logits
    assert not torch.equal(before, original)  # the table's rounding shows in the logits
    assert type(loaded.model.get_submodule(TABLE)) is torch.nn.Embedding  # restored after emitting

    model = mpq.load(tmp_path / "cfg")
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    assert resident_bytes(model) == memory.total(plan.formats)
    assert kernels_of(model)[TABLE] == "gather + dequantise rows (torch)"
    assert json.loads((tmp_path / "cfg" / MANIFEST).read_text())["embeddings"] == {TABLE: "bfloat16"}
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_manifest_that_hides_a_table_is_refused(untied_llama_dir, tmp_path):
    loaded = load_model(str(untied_llama_dir))
    plan = Plan(formats={layer.name: "int8" for layer in _graph(loaded).layers}, model=str(untied_llama_dir))
    with applied(loaded.model, plan.specs(), QuantizedWeightCache(loaded.model)) as tensors:
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    path = tmp_path / "cfg" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["embeddings"] = {}
    path.write_text(json.dumps(manifest))
    with pytest.raises(mpq.MpqError, match="embedding table"):
        mpq.load(tmp_path / "cfg")


def test_gptq_rounds_the_table_to_nearest_on_a_clipped_range(untied_llama_dir):
    from mpq.tasks import calibration_text, make_task

    loaded = load_model(str(untied_llama_dir))
    graph = _graph(loaded)
    formats = [get_format("int4-g32")]
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    quantizer = method_quantizer("gptq", loaded.model, graph.layers, graph.shared_input_groups(), formats, task)
    table = loaded.model.get_submodule(TABLE).weight
    rtn = quantize_weight(table, formats[0])
    served = quantizer(TABLE, formats[0])
    grid = clipped_grid(table, formats[0])
    assert torch.equal(served["qweight"], pack_int4_u8(grid.integers(table.detach().float())))
    assert torch.equal(served["scales"], grid.scales)
    served_error = (dequantize_weight(served, formats[0]) - table.float()).square().sum()
    assert served_error <= (dequantize_weight(rtn, formats[0]) - table.float()).square().sum()
    q_proj = "model.layers.0.self_attn.q_proj"
    linear_rtn = quantize_weight(loaded.model.get_submodule(q_proj).weight, formats[0])
    assert not torch.equal(quantizer(q_proj, formats[0])["qweight"], linear_rtn["qweight"])  # gptq did run
    # AWQ stores an input scale per linear, none for the table
    awq = memory_model(loaded.model, graph.layers, formats, method="awq").layer_bytes
    rows, dim = table.shape
    assert awq[TABLE]["int4-g32"] == formats[0].weight_bytes(rows, dim)
    assert awq[q_proj]["int4-g32"] == formats[0].weight_bytes(64, 64) + 2 * 64


def test_local_sensitivity_of_the_table_is_its_looked_up_rows_error(untied_llama_dir):
    from mpq.sensitivity import measure_local
    from mpq.tasks import calibration_text, make_task

    loaded = load_model(str(untied_llama_dir))
    graph = _graph(loaded)
    formats = [get_format("int8"), get_format("int4-g32")]
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    cache = QuantizedWeightCache(loaded.model)
    work = loaded.model.float()  # bf16 -> float32 in place: the table's rows as measured
    table = measure_local(loaded.model, work, graph.layers, formats, task, "k", {}, cache, progress=False)
    weight = work.get_submodule(TABLE).weight
    rows = weight[task.calib_ids.reshape(-1)]
    for fmt in formats:
        delta = weight - dequantize_weight(cache.get(TABLE, fmt), fmt)
        expected = delta[task.calib_ids.reshape(-1)].pow(2).sum() / rows.pow(2).sum()
        assert table.values[TABLE][fmt.name] == pytest.approx(expected.item(), rel=1e-4)
    assert table.values[TABLE]["int4-g32"] > table.values[TABLE]["int8"] > 0


def test_profile_times_the_table_as_a_lookup(untied_llama_dir):
    from mpq.formats import parse_formats
    from mpq.latency import Regime, profile
    from mpq.profile import profile_table

    loaded = load_model(str(untied_llama_dir))
    graph = _graph(loaded)
    latency = profile(loaded.model, loaded.task, graph.layers, parse_formats("fp16,int8,int4", 32),
                      Regime("decode", 1, 8), graph.shared_input_groups(), budget_s=0.01, key="k")
    assert latency.tables == [TABLE]
    assert set(latency.layer_seconds[TABLE]) == {"fp16", "int8", "int4-g32"}
    assert all(v > 0 for v in latency.layer_seconds[TABLE].values())
    assert f"| {loaded.model.config.vocab_size}x64 | lookup |" in profile_table(latency)


def test_compile_puts_the_table_in_the_plan_unless_asked_not_to(untied_llama_dir, tmp_path):
    args = [str(untied_llama_dir), "-q", "--samples", "4", "--seq-len", "32", "--trials", "20", "--refine", "0",
            "--no-latency", "--max-configs", "2", "--method", "gptq"]
    assert main(["compile", *args, "-o", str(tmp_path / "with")]) == 0
    summary = json.loads((tmp_path / "with" / "summary.json").read_text())
    config = tmp_path / "with" / "configs" / summary["configs"][0]["name"]
    manifest = json.loads((config / MANIFEST).read_text())
    assert TABLE in manifest["plan"]["formats"]
    if get_format(manifest["plan"]["formats"][TABLE]).quantized:
        assert f"{TABLE}: rtn with a searched clipping range" in manifest["card"]["method"]
    mpq.load(config)  # loads back
    assert main(["compile", *args, "--no-embeddings", "-o", str(tmp_path / "without")]) == 0
    summary = json.loads((tmp_path / "without" / "summary.json").read_text())
    manifest = json.loads((tmp_path / "without" / "configs" / summary["configs"][0]["name"] / MANIFEST).read_text())
    assert TABLE not in manifest["plan"]["formats"] and TABLE in manifest["card"]["excluded_layers"]


def _tiny_gemma4(path, tokenizer):
    """A 2-block Gemma 4 with per-layer inputs: beside its input table, a table of vocabulary x
    (2 blocks x 16) that the input ids are looked up in, scaled by sqrt(16)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(0)
    config = Gemma4TextConfig(vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, sliding_window=16, hidden_size_per_layer_input=16,
                              layer_types=["sliding_attention", "full_attention"])
    Gemma4ForCausalLM(config).eval().to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PER_LAYER = "model.embed_tokens_per_layer"


def test_a_table_the_input_ids_are_looked_up_in_is_a_layer_and_loads_back(tmp_path, demo_tokenizer):
    """Gemma 4's per-layer table (vocabulary x blocks x 256 at real sizes: as large as the model's
    blocks) is traced as a table layer beside the input one, quantised with its embed_scale, and
    loads back bit-identical with the bytes predicted."""
    loaded = load_model(str(_tiny_gemma4(tmp_path / "gemma4", demo_tokenizer)))
    graph = _graph(loaded)
    tables = {layer.name: layer for layer in graph.layers if layer.is_embedding}
    assert list(tables) == [PER_LAYER]  # the input table is the tied head's
    assert (tables[PER_LAYER].out_features, tables[PER_LAYER].in_features) == (len(demo_tokenizer), 32)
    plan = Plan(formats={layer.name: "int4-g32" if layer.is_embedding else "int8" for layer in graph.layers},
                model=str(tmp_path / "gemma4"))
    memory = memory_model(loaded.model, graph.layers, [get_format("int8"), get_format("int4-g32")])
    ids = torch.randint(0, len(demo_tokenizer), (2, 12))
    per_layer = loaded.model.get_submodule(PER_LAYER)
    rows = per_layer(ids)
    with applied(loaded.model, plan.specs(), QuantizedWeightCache(loaded.model)) as tensors:
        quantised_rows = loaded.model.get_submodule(PER_LAYER)(ids)
        before = loaded.model(input_ids=ids, use_cache=False).logits
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    # the rows are the dequantised table's times sqrt(16), as the model's own lookup scales them
    dequantised = dequantize_weight(tensors[PER_LAYER], get_format("int4-g32"))
    assert torch.equal(quantised_rows, (F.embedding(ids, dequantised) * 4.0).to(torch.bfloat16))
    assert not torch.equal(quantised_rows, rows)
    model = mpq.load(tmp_path / "cfg")
    assert isinstance(model.get_submodule(PER_LAYER), QuantizedEmbedding)
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    assert resident_bytes(model) == memory.total(plan.formats)
    assert resident_bytes(model.get_submodule(PER_LAYER)) < resident_bytes(per_layer) / 3  # 4 bits and scales, of 16
    without = _graph(loaded, embeddings=False)
    assert not any(layer.is_embedding for layer in without.layers)
    assert without.excluded[PER_LAYER] == "embedding tables left as stored (asked for)"


def test_position_and_token_type_tables_are_not_token_tables():
    """The tables looked up by positions or token types read other indices than the input ids:
    they stay as stored (a few hundred rows: little to gain), and are not called excluded."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from mpq.trace import trace_model

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=2, n_positions=64)).eval()
    bert = BertModel(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64)).eval()
    ids = torch.randint(1, 512, (1, 8))
    for model, table, others in [(gpt2, "transformer.wte", ["transformer.wpe"]),
                                 (bert, "embeddings.word_embeddings",
                                  ["embeddings.position_embeddings", "embeddings.token_type_embeddings"])]:
        graph = trace_model(model, {"input_ids": ids})
        names = {layer.name for layer in graph.layers} | set(graph.excluded)
        assert table in names
        assert not set(others) & names
