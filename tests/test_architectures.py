"""Layers and tables beyond Llama's: Falcon's linears multiply by their transposed weight
(`x @ self.weight.T`, no aten.linear in the graph), Gemma's table scales its rows, OLMo's norms
hold no parameters; and subclasses of nn.Linear or nn.Embedding whose forward does more than mpq's
modules would compute are left as the model had them."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import MANIFEST, kernels_of, save_config
from mpq.errors import MpqError
from mpq.latency import Regime, measure_step
from mpq.models import CAUSAL_LM, load_model, model_device
from mpq.plan import Plan
from mpq.qembedding import TiedEmbedding
from mpq.trace import computes_linear, embedding_scale, trace_model

from conftest import tiny_llama, trace_tiny

CAUSAL = {"use_cache": False}


def _ids(vocab: int = 128) -> dict:
    return {"input_ids": torch.randint(0, vocab, (1, 8)), **CAUSAL}


def _falcon(bias: bool):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          new_decoder_architecture=True, num_kv_heads=2, bias=bias)).eval()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.mark.parametrize("bias", [False, True])
def test_falcon_linears_that_matmul_by_their_transposed_weight_are_layers(bias):
    model = _falcon(bias)
    graph = trace_model(model, _ids())
    assert graph.method == "export" and graph.warning is None
    kinds = [layer.kind for layer in graph.layers if layer.block == 0]
    assert kinds == ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
    assert {layer.module_type for layer in graph.layers if layer.block is not None} == {"FalconLinear"}
    assert all(layer.has_bias == bias for layer in graph.layers if layer.block is not None)
    assert graph.layers[-1].name == "lm_head" and graph.layers[-1].tied_table == "transformer.word_embeddings"
    ids = torch.randint(0, 128, (2, 12))
    original = model(input_ids=ids, use_cache=False).logits
    plan = {layer.name: mpq.get_format("int8") for layer in graph.layers}
    with applied(model, plan, QuantizedWeightCache(model)):
        quantised = model(input_ids=ids, use_cache=False).logits
    assert not torch.equal(quantised, original) and _cosine(quantised, original) > 0.999


class _Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _TransposedMatmul(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def test_a_linear_subclass_is_a_layer_only_if_its_forward_is_the_linear_map():
    assert computes_linear(nn.Linear(8, 4)) and computes_linear(_TransposedMatmul(8, 4))
    assert not computes_linear(_Doubled(8, 4)) and not computes_linear(nn.Conv2d(8, 4, 1))
    model = tiny_llama(128, tie=False)
    for name, cls in [("model.layers.0.mlp.down_proj", _Doubled), ("model.layers.1.mlp.down_proj", _TransposedMatmul)]:
        old = model.get_submodule(name)
        new = cls(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict() | {"bias": torch.zeros(old.out_features)})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    graph = trace_model(model, _ids())
    names = {layer.name for layer in graph.layers}
    assert "model.layers.0.mlp.down_proj" not in names and "model.layers.1.mlp.down_proj" in names
    assert "forward is not x @ weight.T + bias" in graph.excluded["model.layers.0.mlp.down_proj"]
    assert len(names) == 1 + 2 * 7 + 1 - 1


@pytest.fixture
def tiny_gemma_dir(tmp_path, demo_tokenizer):
    """A 2-block Gemma (its table scales rows by sqrt(hidden), tied to the head), saved in bf16."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=32, max_position_embeddings=256)).eval().to(torch.bfloat16)
    path = tmp_path / "tiny-gemma"
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


class _Shifted(nn.Embedding):
    embed_scale = 2.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale + 1


class _Scaled(nn.Embedding):
    def __init__(self, *args, scale: float) -> None:
        super().__init__(*args)
        self.embed_scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def test_embedding_scale_is_the_factor_of_a_table_that_only_scales_its_rows():
    assert embedding_scale(nn.Embedding(50, 8)) == 1.0
    assert embedding_scale(_Scaled(50, 8, scale=3.5)) == 3.5
    assert embedding_scale(_Shifted(50, 8)) is None  # more than a factor
    assert embedding_scale(nn.Embedding(50, 8, max_norm=1.0)) is None  # renormalises rows in place
    assert embedding_scale(nn.Linear(8, 50)) is None


def test_gemma_scaled_tied_table_is_quantised_with_the_head_and_loads_bit_identical(tiny_gemma_dir, tmp_path):
    loaded = load_model(str(tiny_gemma_dir))
    table_path, table = "model.embed_tokens", loaded.model.model.embed_tokens
    scale = embedding_scale(table)
    assert scale == float(torch.tensor(64 ** 0.5).to(torch.bfloat16))  # as Gemma's forward rounds it
    graph = trace_tiny(loaded)
    assert graph.layers[-1].name == "lm_head" and graph.layers[-1].tied_table == table_path
    assert "shares its weight with lm_head" in graph.excluded[table_path]
    plan = Plan(formats={layer.name: "int8" for layer in graph.layers}, model=str(tiny_gemma_dir))
    ids = torch.randint(0, 4000, (2, 16))
    original = loaded.model(input_ids=ids, use_cache=False).logits
    with applied(loaded.model, plan.specs(), QuantizedWeightCache(loaded.model)) as tensors:
        tied = loaded.model.get_submodule(table_path)
        assert isinstance(tied, TiedEmbedding) and tied.scale == scale
        rows, want = tied(ids).float(), table(ids).float()  # the quantised rows against Gemma's own lookup
        assert (rows - want).norm() < 0.02 * want.norm()
        tied.scale = 1.0
        assert (tied(ids).float() * scale - rows).norm() < 0.01 * rows.norm()  # the factor is what makes them match
        tied.scale = scale
        before = loaded.model(input_ids=ids, use_cache=False).logits
        save_config(tmp_path / "cfg", loaded.model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "test"})
    assert _cosine(before, original) > 0.999
    manifest = json.loads((tmp_path / "cfg" / MANIFEST).read_text())
    assert manifest["embedding_scales"] == {table_path: scale}
    model = mpq.load(tmp_path / "cfg")
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    assert kernels_of(model)[table_path].endswith(f"times {scale:g})")

    manifest["embedding_scales"] = {}  # a scaled table with no factor on record would load silently wrong
    (tmp_path / "cfg" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MpqError, match="does not say what table model.embed_tokens multiplies its rows by"):
        mpq.load(tmp_path / "cfg")
    manifest["embedding_scales"] = {table_path: "big"}
    (tmp_path / "cfg" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MpqError, match="scales table"):
        mpq.load(tmp_path / "cfg")


def test_a_model_of_buffers_only_runs_on_its_buffers_device_and_generates_once_loaded(tmp_path, demo_tokenizer):
    """OLMo's LayerNorm has no parameters: with every linear and its tied table quantised, the
    model holds buffers only. Its device (latency, evaluation) comes from them; loaded, it gets an
    empty parameter, since transformers' generate reads device and dtype from the first one."""
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(0)
    model = OlmoForCausalLM(OlmoConfig(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=2, tie_word_embeddings=True,
                                       pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval().to(torch.bfloat16)
    graph = trace_model(model, _ids())
    plan = Plan(formats={layer.name: "int8" for layer in graph.layers}, model="olmo")
    assert model_device(nn.Module()) == torch.device("cpu")
    ids = torch.randint(0, 4000, (1, 6))
    with applied(model, plan.specs(), QuantizedWeightCache(model)) as tensors:
        assert not list(model.parameters()) and model_device(model) == torch.device("cpu")
        assert measure_step(model, CAUSAL_LM, Regime("decode", 1, 8), budget_s=0.01) > 0
        before = model(input_ids=ids).logits
        save_config(tmp_path / "cfg", model, demo_tokenizer, CAUSAL_LM, plan, tensors, {"note": "test"})
    loaded = mpq.load(tmp_path / "cfg")
    assert [(p.numel(), p.dtype) for p in loaded.parameters()] == [(0, torch.bfloat16)]
    assert (loaded.device, loaded.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert torch.equal(loaded(input_ids=ids).logits, before)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)
    holder = nn.Module()
    holder.register_buffer("table", torch.empty(2, device="meta"))
    assert model_device(holder) == torch.device("meta")


@pytest.mark.slow
def test_gemma_compiles_end_to_end_with_its_scaled_table_in_every_config(tiny_gemma_dir, tmp_path):
    from mpq.cli import main

    out = tmp_path / "out"
    assert main(["compile", str(tiny_gemma_dir), "-o", str(out), "-q", "--samples", "4", "--seq-len", "32",
                 "--trials", "20", "--max-configs", "2", "--no-latency"]) == 0
    scale = float(torch.tensor(64 ** 0.5).to(torch.bfloat16))
    ids = torch.randint(0, 4000, (1, 10))
    original = load_model(str(tiny_gemma_dir)).model(input_ids=ids, use_cache=False).logits
    configs = sorted((out / "configs").iterdir())
    assert configs
    for folder in configs:
        manifest = json.loads((folder / MANIFEST).read_text())
        assert "lm_head" in manifest["plan"]["formats"] and manifest["embedding_scales"] == {"model.embed_tokens": scale}
        assert f"model.embed_tokens times {scale:g}" in manifest["card"]["method"]
        logits = mpq.load(folder)(input_ids=ids, use_cache=False).logits
        assert _cosine(logits, original) > 0.99
