"""torch's CPU kernels (through QuantizedLinear) against the dequantise reference, on odd shapes."""

import pytest
import torch

from mpq.formats import get_format
from mpq.kernels import cpu as cpu_kernels
from mpq.kernels import cpu_supports, linear_cpu, linear_reference, prepare_cpu
from mpq.kernels.cpu import DENSE_FLOAT32_FROM_TOKENS, FLOAT32_FROM_TOKENS, float32_from_tokens, linear_dense_cpu
from mpq.qlinear import QuantizedLinear
from mpq.quantize import quantize_weight

SHAPES = [(48, 96), (64, 256), (112, 384), (16, 32)]  # (N, K): N multiple of 16, K odd multiples of groups
FORMATS = ["int8", "int4-g32", "int4-g32-sym", "int4-g64", "int4-g128", "int4-pc", "int4-pc-sym"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


VALID = [(name, n, k) for name in FORMATS for n, k in SHAPES if get_format(name).supports(n, k)]


@pytest.mark.parametrize("name,n,k", VALID)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_kernel_matches_reference(name, n, k, m, dtype):
    fmt = get_format(name)
    torch.manual_seed(n * k + m)
    tensors = quantize_weight(torch.randn(n, k), fmt)
    bias = torch.randn(n, dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    expected = linear_reference(x, tensors, fmt, bias)
    got = linear_cpu(x, prepare_cpu(tensors, fmt), fmt, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-2  # bf16 activations in the kernel


def test_int4_kernel_needs_n_multiple_of_16_and_falls_back():
    fmt = get_format("int4-g32")
    assert not cpu_supports(fmt, 40, 64)
    linear = torch.nn.Linear(64, 40)
    layer, _ = QuantizedLinear.from_module(linear, fmt)
    assert layer.backend == "reference"
    assert layer(torch.randn(2, 64)).shape == (2, 40)


def test_backend_choice_and_override(monkeypatch):
    linear = torch.nn.Linear(64, 32)
    layer, _ = QuantizedLinear.from_module(linear, "int8")
    assert layer.backend == "cpu"
    monkeypatch.setenv("MPQ_KERNELS", "reference")
    layer, _ = QuantizedLinear.from_module(linear, "int8")
    assert layer.backend == "reference"
    monkeypatch.setenv("MPQ_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MPQ_KERNELS"):
        QuantizedLinear.from_module(linear, "int8")


@pytest.mark.parametrize("name", ["fp16", "int8", "int4-g64"])
def test_quantized_linear_handles_batched_input_and_conv1d(name):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 128)  # GPT-2 style: weight stored [in, out]
    torch.nn.init.normal_(conv.weight, std=0.05)
    layer, _ = QuantizedLinear.from_module(conv, name)
    x = torch.randn(2, 5, 128)
    assert rel_err(layer(x), conv(x)) < (0.01 if name != "int4-g64" else 0.15)


def test_int8_kernel_on_misaligned_memory():
    """Tensors loaded from one safetensors file may sit at odd offsets; the layer must cope."""
    fmt = get_format("int8")
    tensors = quantize_weight(torch.randn(64, 64), fmt)
    backing = torch.empty(64 * 64 + 24, dtype=torch.int8)
    shifted = backing[24:].view(64, 64)
    shifted.copy_(tensors["qweight"])
    assert shifted.data_ptr() % 64 != 0
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    got = linear_cpu(x, prepare_cpu({"qweight": shifted, "scales": tensors["scales"]}, fmt), fmt, None)
    assert rel_err(got, linear_reference(x, tensors, fmt, None)) < 1e-2


# (N, K) for the float32 tiles: tiles of 64 rows when forced small, so N = 112 is a full tile and a
# ragged one whose int4 rows end in a short block (16 rows after blocks of 32 under AVX2)
TILED_SHAPES = [(112, 384), (48, 96), (208, 64), (16, 32)]
TILED = [(name, n, k) for name in FORMATS for n, k in TILED_SHAPES if get_format(name).supports(n, k)]


def _kernel_calls(monkeypatch) -> list[str]:
    calls = []
    for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):
        kernel = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, _kernel=kernel, _name=name: calls.append(_name) or _kernel(*args))
    return calls


@pytest.mark.parametrize("name,n,k", TILED)
@pytest.mark.parametrize("tile", ["one row block", "whole layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float32_tiles_match_torchs_kernel_and_the_reference(name, n, k, tile, dtype, monkeypatch):
    """From FLOAT32_FROM_TOKENS tokens linear_cpu dequantises tiles of the kernel's own tensors and
    multiplies in float32: the kernel's arithmetic (bf16 inputs, float32 sums) in another order, so
    without a bias it agrees with the kernel to within a few outputs one bf16 step apart. A bias it
    adds before its one rounding, where the kernel rounds twice: closer to the reference."""
    fmt = get_format(name)
    m = float32_from_tokens(fmt.bits) + 3
    torch.manual_seed(n * k)
    tensors = quantize_weight(torch.randn(n, k), fmt)
    prepared = prepare_cpu(tensors, fmt)
    bias = torch.randn(n, dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    if tile == "one row block":
        monkeypatch.setattr(cpu_kernels, "TILE_ELEMENTS", 1)  # every tile 64 rows: several, the last ragged
    calls = _kernel_calls(monkeypatch)
    tiled = {b is not None: linear_cpu(x, prepared, fmt, b) for b in (None, bias)}
    assert calls == [] and all(y.dtype == dtype and y.shape == (m, n) for y in tiled.values())
    monkeypatch.setitem(FLOAT32_FROM_TOKENS, fmt.bits, 10**9)
    kernel = {b is not None: linear_cpu(x, prepared, fmt, b) for b in (None, bias)}
    assert len(calls) == 2
    assert rel_err(tiled[False], kernel[False]) < 2e-4
    reference = linear_reference(x.to(torch.bfloat16).to(dtype), tensors, fmt, bias)
    assert rel_err(tiled[True], reference) <= rel_err(kernel[True], reference) < 1e-2


@pytest.mark.parametrize("name", ["int8", "int4-g64"])
def test_torchs_kernel_serves_fewer_tokens_than_the_crossover(name, monkeypatch):
    fmt = get_format(name)
    prepared = prepare_cpu(quantize_weight(torch.randn(64, 128), fmt), fmt)
    calls = _kernel_calls(monkeypatch)
    threshold = float32_from_tokens(fmt.bits)
    for m in (1, threshold - 1, threshold, 2 * threshold):
        linear_cpu(torch.randn(m, 128), prepared, fmt, None)
    assert len(calls) == 2


def test_int4_under_an_unreadable_layout_runs_torchs_kernel_at_every_size(monkeypatch):
    """A torch whose int4 layout mpq cannot read keeps the kernel, and the layer says so."""
    monkeypatch.setattr(cpu_kernels, "int4_row_layout", lambda: None)
    fmt = get_format("int4-g64")
    layer = QuantizedLinear(fmt, quantize_weight(torch.randn(64, 128), fmt), None, 128, 64)
    calls = _kernel_calls(monkeypatch)
    x = torch.randn(4 * float32_from_tokens(4), 128)
    assert rel_err(layer(x), linear_reference(x, quantize_weight(torch.randn(64, 128), fmt), fmt, None)) > 0
    assert calls == ["_weight_int4pack_mm_for_cpu"] and layer.kernel == "torch _weight_int4pack_mm_for_cpu"
    int8 = QuantizedLinear.from_module(torch.nn.Linear(128, 64), "int8")[0]
    assert int8.kernel == f"torch _weight_int8pack_mm, float32 tiles from {float32_from_tokens(8)} tokens"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, DENSE_FLOAT32_FROM_TOKENS - 1, DENSE_FLOAT32_FROM_TOKENS, 131])
def test_dense_16_bit_layer_in_float32_tiles_is_the_same_arithmetic(dtype, m, monkeypatch):
    """Where a CPU has no 16-bit GEMM, a dense layer from DENSE_FLOAT32_FROM_TOKENS tokens multiplies
    tiles of its weight in float32 and rounds once, as torch's 16-bit loop does (sums in another
    order); below that it is F.linear itself."""
    monkeypatch.setattr(cpu_kernels, "TILE_ELEMENTS", 1)  # tiles of 64 rows: 112 is a full one and a ragged one
    generator = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=generator).to(dtype)
    weight = torch.randn(112, 96, generator=generator).to(dtype)
    bias = torch.randn(112, generator=generator).to(dtype)
    got = linear_dense_cpu(x, weight, bias)
    assert got.dtype == dtype and got.shape == (m, 112)
    if m < DENSE_FLOAT32_FROM_TOKENS:
        assert torch.equal(got, torch.nn.functional.linear(x, weight, bias))
    else:
        once = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).to(dtype)
        assert rel_err(got, once) < 1e-4 and (got != once).float().mean() < 0.01


@pytest.mark.parametrize("setting, dtype, tiles", [("fp32", torch.bfloat16, True), ("native", torch.bfloat16, False),
                                                   ("fp32", torch.float32, False)])
def test_a_dense_layer_takes_float32_tiles_where_the_cpu_matmul_setting_routes_its_dtype(setting, dtype, tiles, monkeypatch):
    """A float32 model's fp16 layer casts its 16-bit weight to float32 and multiplies there (no tiles)."""
    monkeypatch.setenv("MPQ_CPU_MATMUL", setting)
    linear = torch.nn.Linear(64, 48).to(dtype)
    layer, _ = QuantizedLinear.from_module(linear, "fp16")
    assert layer.dense_in_float32 == (setting == "fp32")
    assert layer.kernel == ("F.linear, float32 tiles from 16 tokens" if setting == "fp32" else "F.linear")
    calls = []
    monkeypatch.setattr(cpu_kernels, "linear_in_float32_tiles",
                        lambda *args, _real=cpu_kernels.linear_in_float32_tiles: calls.append(1) or _real(*args))
    x = torch.randn(2, 20, 64).to(dtype)
    assert layer(x).dtype == dtype and rel_err(layer(x), linear(x)) < 1e-2
    assert len(calls) == 2 * int(tiles)
    monkeypatch.setenv("MPQ_CPU_MATMUL", "native" if setting == "fp32" else "fp32")  # read when built, not per call
    layer(x)
    assert len(calls) == 3 * int(tiles)


@pytest.mark.parametrize("name", ["int8", "int4-g32", "fp16"])
def test_a_cast_of_the_model_keeps_a_quantised_layer_as_stored(name):
    """SwitchTransformers' router casts its classifier to float32 on every forward; a user may call
    model.half(). The stored tensors stay as they are (so the bytes stay those predicted) and the
    layer serves the new activation dtype."""
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 64, generator=generator).to(torch.bfloat16)
    layer = QuantizedLinear(fmt, quantize_weight(weight, fmt), torch.randn(48, generator=generator).to(torch.bfloat16), 64, 48)
    stored = {key: tensor.clone() for key, tensor in layer.state_dict().items()}
    x = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
    before = layer(x)
    for dtype in (torch.float32, torch.float16):
        layer.to(dtype)
        assert all(torch.equal(tensor, stored[key]) and tensor.dtype == stored[key].dtype
                   for key, tensor in layer.state_dict().items())
        after = layer(x.to(dtype))
        assert after.dtype == dtype
        assert torch.allclose(after.float(), before.float(), rtol=2e-2, atol=2e-2)
