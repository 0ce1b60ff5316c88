"""+hotK embedding formats: the K most frequent calibration tokens' rows also at int8. Names and
exact bytes, which rows are chosen, lookups that match the dequantised table, checkpoints that load
back bit-identical with the predicted bytes, and a linear layer never offered one."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import MANIFEST, kernels_of, save_config
from mpq.cli import main
from mpq.formats import get_format, parse_formats
from mpq.hot_rows import hot_row_ids
from mpq.memory import memory_model, resident_bytes
from mpq.methods import method_quantizer, rtn_quantizer
from mpq.models import load_model
from mpq.plan import Plan
from mpq.qembedding import QuantizedEmbedding
from mpq.quantize import dequantize_weight, quantize_weight, tensor_bytes
from mpq.tasks import calibration_text, make_task

from conftest import trace_tiny as _graph

TABLE = "model.embed_tokens"


@pytest.mark.parametrize("name", ["int4-pc+hot512", "int4-g64-sym+hot7", "int4-g32+hot1"])
def test_hot_format_names_parse_to_an_int4_base_plus_rows(name):
    fmt = get_format(name)
    assert fmt.embedding_only and fmt.bits == 4 and fmt.hot_rows == int(name.rpartition("hot")[2])
    assert fmt.base == get_format(name.partition("+")[0]) and not fmt.base.embedding_only
    assert fmt.card()["hot_rows"] and get_format(name.partition("+")[0]).card()["hot_rows"] is None


@pytest.mark.parametrize("name", ["int4-pc+hot0", "int4-pc+hot007", "int8+hot5", "fp16+hot5", "int4-g48+hot5",
                                  "int4-pc+hot", "int4-pc+hot-3"])
def test_malformed_hot_format_names_are_refused(name):
    with pytest.raises(ValueError):
        get_format(name)


@pytest.mark.parametrize("rows,dim,name", [(101, 64, "int4-g32+hot7"), (37, 64, "int4-pc+hot512"),
                                           (300, 96, "int4-g32-sym+hot40")])
def test_hot_bytes_are_the_tensors_bytes(rows, dim, name):
    fmt = get_format(name)
    table = torch.randn(rows, dim)
    ids = torch.randperm(rows)[:min(fmt.hot_rows, rows)]
    tensors = quantize_weight(table, fmt, hot_ids=ids)
    assert tensor_bytes(tensors) == fmt.weight_bytes(rows, dim)
    assert fmt.weight_bytes(rows, dim) == fmt.base.weight_bytes(rows, dim) + min(fmt.hot_rows, rows) * (dim + 2 + 4)


def test_hot_rows_are_int8_rows_and_the_rest_the_base_format():
    fmt = get_format("int4-g32+hot7")
    table = torch.randn(101, 64)
    ids = torch.tensor([100, 5, 3, 0, 50, 7, 8])
    full = dequantize_weight(quantize_weight(table, fmt, hot_ids=ids), fmt)
    int8 = dequantize_weight(quantize_weight(table, get_format("int8")), get_format("int8"))
    base = dequantize_weight(quantize_weight(table, fmt.base), fmt.base)
    cold = torch.ones(101, dtype=torch.bool)
    cold[ids] = False
    assert torch.equal(full[ids], int8[ids]) and torch.equal(full[cold], base[cold])
    assert (full[ids] - table[ids]).abs().max() < (base[ids] - table[ids]).abs().max()


@pytest.mark.parametrize("ids", [None, torch.tensor([1, 2]), torch.tensor([1, 1, 2]), torch.tensor([1, 2, 101])])
def test_hot_rows_need_that_many_distinct_ids_in_range(ids):
    with pytest.raises(ValueError, match="hot row ids"):
        quantize_weight(torch.randn(101, 64), get_format("int4-pc+hot3"), hot_ids=ids)


def test_hot_row_ids_are_the_most_frequent_tokens_ties_to_the_lower_id():
    counts = Counter({9: 5, 4: 7, 2: 5, 30: 100, 1: 1})  # 30 is outside a 20-row table
    assert hot_row_ids(counts, 20, 3).tolist() == [2, 4, 9]  # 4 (7), then 2 and 9 (5 each)
    assert hot_row_ids(counts, 20, 2).tolist() == [2, 4]
    # fewer distinct tokens than rows asked for: the lowest unused ids fill in, so bytes stay exact
    assert hot_row_ids(counts, 20, 6).tolist() == [0, 1, 2, 3, 4, 9]
    assert hot_row_ids(counts, 3, 10).tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lookup_reads_hot_rows_and_matches_the_dequantised_table(dtype):
    fmt = get_format("int4-g32+hot9")
    generator = torch.Generator().manual_seed(5)
    table = (torch.randn(53, 64, generator=generator) * 0.05).to(dtype)
    hot = torch.tensor([52, 0, 17, 3, 4, 30, 31, 8, 9])
    tensors = quantize_weight(table, fmt, hot_ids=hot)
    ids = torch.randint(0, 53, (3, 11), generator=generator)
    ids[0, :4] = torch.tensor([52, 0, 17, 52])  # hot rows, the first and the last, one twice
    out = QuantizedEmbedding(fmt, tensors, dtype)(ids)
    assert out.shape == (3, 11, 64) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids, dequantize_weight(tensors, fmt)).to(dtype))
    base = QuantizedEmbedding(fmt.base, quantize_weight(table, fmt.base), dtype)(ids)
    assert not torch.equal(out[0, :4], base[0, :4]) and torch.equal(out[1:][~torch.isin(ids[1:], hot)],
                                                                     base[1:][~torch.isin(ids[1:], hot)])


def test_only_an_embedding_table_is_offered_a_hot_format(untied_llama_dir):
    loaded = load_model(str(untied_llama_dir))
    graph = _graph(loaded)
    formats = parse_formats("int8,int4-g32,int4-pc+hot64")
    costs = memory_model(loaded.model, graph.layers, formats).layer_bytes
    assert "int4-pc+hot64" in costs[TABLE]
    assert all("int4-pc+hot64" not in opts for name, opts in costs.items() if name != TABLE)


def test_tasks_count_every_calibration_token(untied_llama_dir):
    loaded = load_model(str(untied_llama_dir))
    calib = calibration_text(None)
    task = make_task(loaded.task, loaded.tokenizer, calib, 4, 32)
    counts = task.token_counts
    assert sum(counts.values()) > task.calib_tokens  # the whole text, not only the calibration windows
    first = loaded.tokenizer(calib.texts[0])["input_ids"]
    assert all(counts[t] >= first.count(t) for t in set(first))


def test_hot_table_checkpoint_loads_bit_identical_with_the_predicted_bytes(untied_llama_dir, tmp_path):
    loaded = load_model(str(untied_llama_dir))
    graph = _graph(loaded)
    fmt = get_format("int4-g32+hot64")
    plan = Plan(formats={layer.name: (fmt.name if layer.is_embedding else "int8") for layer in graph.layers},
                model=str(untied_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    counts = task.token_counts
    memory = memory_model(loaded.model, graph.layers, [get_format("int8"), fmt])
    ids = torch.tensor([[t for t, _ in counts.most_common(12)] + [3999, 17]])  # hot tokens and others
    with applied(loaded.model, plan.specs(), QuantizedWeightCache(loaded.model, rtn_quantizer(loaded.model, counts))) as tensors:
        before = loaded.model(input_ids=ids, use_cache=False).logits
        table = loaded.model.get_submodule(TABLE)
        assert set(table.hot_ids.tolist()) >= {t for t, _ in counts.most_common(12)}
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    model = mpq.load(tmp_path / "cfg")
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    assert resident_bytes(model) == memory.total(plan.formats)
    assert kernels_of(model)[TABLE] == "gather + dequantise rows (torch), 64 hot rows int8"

    # the same tensors under a linear layer's name are refused, not loaded wrong
    path = tmp_path / "cfg" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["plan"]["formats"]["model.layers.0.self_attn.q_proj"] = fmt.name
    path.write_text(json.dumps(manifest))
    with pytest.raises(mpq.MpqError):
        mpq.load(tmp_path / "cfg")


def test_gptq_quantizer_serves_a_hot_table_from_the_calibration_counts(untied_llama_dir):
    loaded = load_model(str(untied_llama_dir))
    graph = _graph(loaded)
    formats = parse_formats("int4-g32,int4-g32+hot16")
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    quantizer = method_quantizer("gptq", loaded.model, graph.layers, graph.shared_input_groups(), formats, task)
    served = quantizer(TABLE, formats[1])
    expected = hot_row_ids(task.token_counts, loaded.model.config.vocab_size, 16)
    assert torch.equal(served["hot_ids"], expected)
    assert torch.equal(served["qweight"], quantizer(TABLE, formats[0])["qweight"])  # the same clipped base table


def test_compile_can_choose_a_hot_table(untied_llama_dir, tmp_path):
    args = [str(untied_llama_dir), "-q", "--samples", "4", "--seq-len", "32", "--trials", "20", "--refine", "0",
            "--no-latency", "--max-configs", "2", "--method", "rtn", "--formats", "int8,int4-pc+hot64"]
    assert main(["compile", *args, "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "int4-pc+hot64" in summary["formats"]
    assert all(not u["name"].endswith("hot64") for u in summary["uniform"])  # one table's option, no uniform config
    hot = 0
    for config in summary["configs"]:
        folder = tmp_path / "out" / "configs" / config["name"]
        model = mpq.load(folder)
        assert resident_bytes(model) == config["bytes"]
        if json.loads((folder / MANIFEST).read_text())["plan"]["formats"][TABLE] == "int4-pc+hot64":
            hot += 1
            assert "most frequent tokens" in (folder / "card.md").read_text()
    assert hot >= 1  # the smallest config (every linear int8) keeps the table int4 with hot rows
