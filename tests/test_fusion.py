"""Fused groups: q/k/v and gate/up with one format run as one matmul, in compile and after load."""

import json

import pytest
import torch

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import kernels_of, save_config
from mpq.cpu_matmul import routes
from mpq.device_check import check_on_device
from mpq.formats import get_format
from mpq.fusion import fusion_groups
from mpq.models import load_model
from mpq.plan import Plan
from mpq.trace import trace_model

ATTN = ("q_proj", "k_proj", "v_proj")


def _setup(model_dir):
    loaded = load_model(str(model_dir))
    graph = trace_model(loaded.model, {"input_ids": torch.randint(0, 4000, (1, 8)), "use_cache": False})
    # block 0: q/k/v int8, gate/up int4 (both fused); block 1: q int8, k/v int4 (k/v fused only)
    plan = {}
    for layer in graph.layers:
        kind = layer.kind.split(".")[-1]
        if layer.block == 0:
            plan[layer.name] = "int8" if kind in ATTN else "int4-g64" if kind in ("gate_proj", "up_proj") else "fp16"
        else:
            plan[layer.name] = "int8" if kind == "q_proj" else "int4-g64"
    has_bias = {l.name: l.has_bias for l in graph.layers}
    return loaded, graph, plan, fusion_groups(plan, graph.shared_input_groups(), has_bias)


def test_fusion_groups_follow_shared_inputs_and_formats(tiny_llama_dir):
    _, _, _, groups = _setup(tiny_llama_dir)
    assert groups == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"],
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
    ]


def test_fused_model_matches_unfused_and_reloads_bit_identical(tiny_llama_dir, tmp_path):
    loaded, graph, plan, groups = _setup(tiny_llama_dir)
    specs = {k: get_format(v) for k, v in plan.items()}
    cache = QuantizedWeightCache(loaded.model)
    ids = torch.randint(0, 4000, (2, 12))
    with applied(loaded.model, specs, cache):
        unfused = loaded.model(input_ids=ids, use_cache=False).logits
    with applied(loaded.model, specs, cache, groups) as tensors:
        fused = loaded.model(input_ids=ids, use_cache=False).logits
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, Plan(plan), tensors, {}, groups)
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item() < 1e-2
    reloaded = mpq.load(tmp_path / "cfg")
    assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits, fused)
    assert json.loads((tmp_path / "cfg" / "mpq.json").read_text())["fused"] == groups
    kernels = kernels_of(reloaded)
    assert kernels["model.layers.0.self_attn.k_proj"] == "torch _weight_int8pack_mm, float32 tiles from 64 tokens (fused x3)"
    assert kernels["model.layers.1.mlp.up_proj"] == "torch _weight_int4pack_mm_for_cpu, float32 tiles from 128 tokens (fused x2)"
    assert kernels["model.layers.1.self_attn.q_proj"] == "torch _weight_int8pack_mm, float32 tiles from 64 tokens"
    # generation (several inputs in a row, a KV cache) still works through the fused slices
    out = reloaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_triton_path_on_a_loaded_model_matches_the_reference(tiny_llama_dir, tmp_path, monkeypatch):
    """The CUDA dispatch path, exercised on the CPU through the Triton interpreter (on CUDA when present)."""
    pytest.importorskip("triton")
    folder = _saved_config(tiny_llama_dir, tmp_path)
    if torch.cuda.is_available():
        result = check_on_device(folder, "cuda")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        result = check_on_device(folder, "cpu", backend="triton", tokens=9)
    # block 0: q/k/v int8 fused, gate/up int4 fused, o and down fp16; block 1: q int8, k/v and gate/up
    # int4 fused, o and down int4; the int4 head, whose rows the tied embedding reads
    # a 16-bit layer on a CPU without a GEMM in bf16 says so (mpq.kernels.cpu.linear_dense_cpu)
    dense = "F.linear" if torch.cuda.is_available() or not routes(torch.bfloat16) else "F.linear, float32 tiles from 16 tokens"
    assert result["kernels"] == {"triton w8a16 (fused x3)": 3, "triton w4a16 (fused x2)": 6, "triton w8a16": 1,
                                 "triton w4a16": 3, dense: 2, "rows of lm_head's weight (gather + dequantise)": 1}
    assert result["fallback_layers"] == [] and result["layers"] == 16
    assert set(result["rel_err"]) == {"prefill", "decode"} and all(e < 2e-2 for e in result["rel_err"].values())


def test_inspect_check_compares_a_config_with_the_reference(tiny_llama_dir, tmp_path, capsys):
    """`mpq inspect --check` on the CPU: torch's CPU kernels against the dequantise reference; a
    broken kernel would show as a large error, so the printed numbers are asserted small."""
    from mpq.cli import main

    folder = _saved_config(tiny_llama_dir, tmp_path)
    assert main(["inspect", str(folder), "--check", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if "relative error to the CPU reference" in l)
    errors = [float(part.split()[-1]) for part in line.split(": ", 1)[1].split(", ")]
    assert len(errors) == 2 and all(0 < e < 2e-2 for e in errors)
    assert "torch _weight_int4pack_mm_for_cpu, float32 tiles from 128 tokens (fused x2)" in text and "on the reference path" not in text


def _saved_config(model_dir, tmp_path):
    loaded, graph, plan, groups = _setup(model_dir)
    with applied(loaded.model, {k: get_format(v) for k, v in plan.items()}, QuantizedWeightCache(loaded.model), groups) as tensors:
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, Plan(plan), tensors, {}, groups)
    return tmp_path / "cfg"
