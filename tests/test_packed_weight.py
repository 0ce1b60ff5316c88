"""Model code that peeks at a quantised layer's weight (Llama 4: `embed_tokens.weight.device`;
HunYuan, HY-V4: `hidden.to(proj.weight.dtype)`; Ergo: `o_proj.weight.dtype`) reads the dtype,
device and shape of the weight the layer stands in for; the dtype follows the model's casts while
the stored tensors keep theirs; and nothing poses as a tensor that could be multiplied."""

import pytest
import torch
from torch import nn

from mpq.apply import QuantizedWeightCache, applied
from mpq.float_twin import float32_twin
from mpq.formats import get_format
from mpq.fusion import fuse
from mpq.packed_weight import PackedWeight, cast_target
from mpq.qembedding import QuantizedEmbedding, TiedEmbedding
from mpq.qlinear import QuantizedLinear
from mpq.quantize import quantize_weight

from conftest import tiny_llama


def test_cast_target_tells_a_cast_from_a_move():
    assert cast_target(lambda t: t.half() if t.is_floating_point() else t) == torch.float16
    assert cast_target(lambda t: t.float() if t.is_floating_point() else t) == torch.float32
    assert cast_target(lambda t: t.to(torch.bfloat16)) == torch.bfloat16
    assert cast_target(lambda t: t.to("cpu")) is None


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
def test_a_packed_linear_reads_as_its_weight_and_follows_casts(fmt):
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    layer, _ = QuantizedLinear.from_module(linear, fmt, backend="reference")
    weight = layer.weight
    assert isinstance(weight, PackedWeight) and not isinstance(weight, torch.Tensor)
    assert (weight.dtype, weight.device, weight.shape, weight.ndim) == (torch.bfloat16, torch.device("cpu"), torch.Size((48, 64)), 2)
    assert weight.size(0) == 48 and weight.size() == (48, 64) and weight.is_floating_point()
    stored = {name: t.dtype for name, t in layer.named_buffers()}
    x = torch.randn(3, 64)
    before = layer(x.to(torch.bfloat16))
    layer.float()
    assert layer.weight.dtype == torch.float32 and layer.weight.shape == (48, 64)
    assert {name: t.dtype for name, t in layer.named_buffers()} == stored  # the checkpoint's tensors, as they were
    torch.testing.assert_close(layer(x.to(torch.bfloat16)), before, rtol=0, atol=0)
    layer.to(torch.float16)
    assert layer.weight.dtype == torch.float16
    layer.to("cpu")  # a move keeps the dtype
    assert layer.weight.dtype == torch.float16
    with pytest.raises(TypeError):
        torch.nn.functional.linear(x, layer.weight)  # values are never read from it


def test_a_dense_layer_keeps_its_real_weight():
    linear = nn.Linear(32, 16).to(torch.bfloat16)
    layer, tensors = QuantizedLinear.from_module(linear, "fp16")
    assert isinstance(layer.weight, torch.Tensor) and torch.equal(layer.weight, tensors["weight"])


def test_a_fused_member_reads_its_own_rows():
    torch.manual_seed(0)
    weights = {name: torch.randn(rows, 32) for name, rows in (("q", 16), ("k", 8), ("v", 8))}
    for fmt_name in ("fp16", "int8"):
        fmt = get_format(fmt_name)
        tensors = {name: quantize_weight(w, fmt) for name, w in weights.items()}
        slices = fuse(list(weights), fmt, tensors, {name: None for name in weights}, 32, "reference", dtype=torch.float32)
        assert slices is not None
        for name, member in slices.items():
            if fmt.quantized:
                assert isinstance(member.weight, PackedWeight) and member.weight.shape == weights[name].shape
                assert member.weight.dtype == torch.float32
            else:  # a view of its rows of the concatenated dense weight
                assert torch.equal(member.weight, tensors[name]["weight"])


def test_tables_read_as_their_weight_and_their_rows_follow_casts():
    table = torch.randn(100, 32)
    fmt = get_format("int8")
    embedding = QuantizedEmbedding(fmt, quantize_weight(table, fmt), torch.bfloat16)
    assert isinstance(embedding.weight, PackedWeight)
    assert (embedding.weight.dtype, embedding.weight.shape) == (torch.bfloat16, torch.Size((100, 32)))
    ids = torch.tensor([[1, 5, 99]])
    assert embedding(ids).dtype == torch.bfloat16
    embedding.float()  # rows come out as an nn.Embedding cast to float32 would give them
    assert embedding(ids).dtype == torch.float32 and embedding.weight.dtype == torch.float32
    assert embedding.scales.dtype == torch.bfloat16  # stored as the checkpoint holds it
    head = QuantizedLinear(fmt, quantize_weight(table, fmt), None, 32, 100, "reference", dtype=torch.bfloat16)
    tied = TiedEmbedding(head, "lm_head", torch.bfloat16)
    assert isinstance(tied.weight, PackedWeight) and tied.weight.shape == (100, 32) and tied.weight.dtype == torch.bfloat16
    tied.half()
    assert tied.weight.dtype == torch.float16 and tied(ids).dtype == torch.float16
    dense_head, tensors = QuantizedLinear.from_module(nn.Linear(32, 100, bias=False), "fp16")
    assert torch.equal(TiedEmbedding(dense_head, "lm_head", torch.float16).weight, tensors["weight"])


class _PeeksAtItsWeights(nn.Module):
    """Casts its input to the projection's weight dtype and moves ids to the table's device, as
    HY-V4's indexer and Llama 4's model do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.proj = nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids.to(self.embed.weight.device))
        return self.proj(hidden.to(self.proj.weight.dtype)).float()


def test_model_code_that_peeks_runs_quantised_in_the_model_and_in_its_lazy_float32_twin():
    torch.manual_seed(0)
    model = _PeeksAtItsWeights().to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 5))
    plan = {"embed": get_format("int8"), "proj": get_format("int4-g32")}
    cache = QuantizedWeightCache(model)
    with applied(model, plan, cache):
        assert model.proj.weight.dtype == torch.bfloat16 and model.embed.weight.device == torch.device("cpu")
        out = model(ids)
    assert not torch.equal(out, model(ids))
    llama = tiny_llama(128, tie=False).to(torch.bfloat16)
    twin = float32_twin(llama)  # its blocks hold the bf16 weights and run them upcast: its layers are float32 ones
    name = "model.layers.0.self_attn.q_proj"
    with applied(twin, {name: get_format("int8")}, QuantizedWeightCache(llama)):
        assert twin.get_submodule(name).weight.dtype == torch.float32
    with applied(llama, {name: get_format("int8")}, QuantizedWeightCache(llama)):
        assert llama.get_submodule(name).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
def test_a_quantised_tables_weight_gives_its_rows_by_token_id(fmt):
    """Gemma 4's image-and-text forward reads `embed_tokens.weight[pad_token_id, :]`: a quantised
    table answers with the row its own lookup dequantises (before its embed_scale), in its dtype;
    a linear's packed weight still refuses to be read."""
    spec = get_format(fmt)
    table = torch.randn(40, 64).to(torch.bfloat16)
    layer = QuantizedEmbedding(spec, quantize_weight(table, spec), torch.bfloat16, scale=8.0)
    ids = torch.tensor([[3, 39], [0, 3]])
    rows = layer.weight[ids]
    assert rows.shape == (2, 2, 64) and rows.dtype == torch.bfloat16
    assert torch.equal((rows.float() * 8.0).bfloat16(), layer(ids))  # times a power of two: exact either way round
    assert torch.equal(layer.weight[3, :], rows[0, 0]) and torch.equal(layer.weight[3], rows[0, 0])
    assert not torch.equal(rows[0, 0], table[3])  # the quantised row, not the original (the test could fail)
    layer.float()
    assert layer.weight[3].dtype == torch.float32
    with pytest.raises(TypeError, match="only rows by token id"):
        layer.weight[:4]
    head, _ = QuantizedLinear.from_module(nn.Linear(64, 40, bias=False).to(torch.bfloat16), fmt, backend="reference")
    tied = TiedEmbedding(head, "lm_head", torch.bfloat16, scale=2.0)
    assert torch.equal((tied.weight[ids].float() * 2.0).bfloat16(), tied(ids))
    with pytest.raises(TypeError, match="holds this weight packed"):
        head.weight[0]
