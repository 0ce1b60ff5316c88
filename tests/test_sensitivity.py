"""Sensitivity signals on a tiny model: what each measures, and that they agree where they must."""

import pytest
import torch

from mpq.apply import QuantizedWeightCache
from mpq.formats import get_format
from mpq.models import load_model
from mpq.errors import MpqError
from mpq.sensitivity import (hutchinson_traces, measure_fisher, measure_hessian, measure_local, measure_sensitivity,
                             measurement_model)
from mpq.tasks import calibration_text, make_task
from mpq.trace import trace_model

FORMATS = [get_format(n) for n in ("fp16", "int8", "int4-g32")]


@pytest.fixture
def setup(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    return loaded, task, graph


@pytest.mark.parametrize("measure", [measure_sensitivity, measure_local, measure_fisher, measure_hessian])
def test_signal_properties(setup, measure):
    loaded, task, graph = setup
    work = measurement_model(loaded.model)
    assert next(work.parameters()).dtype == torch.float32 and next(loaded.model.parameters()).dtype == torch.bfloat16
    table = measure(loaded.model, work, graph.layers, FORMATS, task, "k", {}, QuantizedWeightCache(loaded.model), False)
    assert set(table.values) == {l.name for l in graph.layers}
    for per in table.values.values():
        assert per["fp16"] == 0.0  # a bf16 model keeps bf16: lossless, nothing measured
        assert per["int8"] >= 0.0 and per["int4-g32"] >= 0.0
        if measure is measure_local:  # a layer's own error always grows with coarser formats
            assert 0.0 < per["int8"] < per["int4-g32"]
    assert sum(p["int8"] for p in table.values.values()) < sum(p["int4-g32"] for p in table.values.values())
    assert table.seconds >= 0


def test_local_signal_is_the_relative_output_error(setup):
    """Checked by hand for one layer: ||x dW^T||^2 / ||x W^T||^2 over the layer's calibration inputs."""
    from mpq.quantize import dequantize_weight, quantize_weight

    loaded, task, graph = setup
    work = measurement_model(loaded.model)
    name = graph.layers[3].name
    captured = []
    handle = work.get_submodule(name).register_forward_hook(lambda m, i, o: captured.append(i[0].reshape(-1, i[0].shape[-1])))
    task.reference(work)
    handle.remove()
    x = torch.cat(captured).float()
    weight = work.get_submodule(name).weight.float()
    fmt = get_format("int4-g32")
    delta = weight - dequantize_weight(quantize_weight(loaded.model.get_submodule(name).weight, fmt), fmt)
    expected = (x @ delta.t()).pow(2).sum() / (x @ weight.t()).pow(2).sum()
    table = measure_local(loaded.model, work, graph.layers, FORMATS, task, "k", {}, QuantizedWeightCache(loaded.model), False)
    assert table.values[name]["int4-g32"] == pytest.approx(expected.item(), rel=1e-4)


def test_fisher_leaves_no_gradients_behind_and_refuses_encoders(setup):
    loaded, task, graph = setup
    work = measurement_model(loaded.model)
    measure_fisher(loaded.model, work, graph.layers, FORMATS, task, "k", {}, QuantizedWeightCache(loaded.model), False)
    assert all(not p.requires_grad and p.grad is None for p in work.parameters())

    class EncoderLikeTask:  # no calibration token windows, as for an encoder
        pass

    with pytest.raises(MpqError, match="needs a causal LM"):
        measure_fisher(loaded.model, work, graph.layers, FORMATS, EncoderLikeTask(), "k", {},
                       QuantizedWeightCache(loaded.model), False)


def test_hutchinson_estimates_the_trace_of_a_known_hessian():
    torch.manual_seed(0)
    a = torch.randn(12, 12)
    a = a @ a.T + torch.eye(12)  # symmetric positive definite: the Hessian of 1/2 w^T A w
    b = torch.randn(5, 5)
    b = b + b.T
    w = torch.randn(12, requires_grad=True)
    u = torch.randn(5, requires_grad=True)
    loss = 0.5 * w @ a @ w + 0.5 * u @ b @ u + (w[:5] * u).sum()  # the cross term adds nothing to either trace
    estimated = hutchinson_traces(loss, [w, u], 4000, torch.Generator().manual_seed(1))
    assert estimated[0] == pytest.approx(torch.trace(a).item(), rel=0.05)
    assert estimated[1] == pytest.approx(torch.trace(b).item(), abs=0.05 * torch.trace(a).item())


def test_hessian_leaves_no_gradients_behind_and_refuses_encoders(setup):
    loaded, task, graph = setup
    work = measurement_model(loaded.model)
    table = measure_hessian(loaded.model, work, graph.layers, FORMATS, task, "k", {}, QuantizedWeightCache(loaded.model), False)
    assert all(not p.requires_grad and p.grad is None for p in work.parameters())
    assert table.metric == "hessian"

    class EncoderLikeTask:
        pass

    with pytest.raises(MpqError, match="needs a causal LM"):
        measure_hessian(loaded.model, work, graph.layers, FORMATS, EncoderLikeTask(), "k", {},
                        QuantizedWeightCache(loaded.model), False)
