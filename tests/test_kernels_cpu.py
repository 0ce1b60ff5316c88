"""torch's CPU kernels (through QuantizedLinear) against the dequantise reference, on odd shapes."""

import pytest
import torch

from mpq.formats import get_format
from mpq.kernels import cpu_supports, linear_cpu, linear_reference, prepare_cpu
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
