"""Sensitivity signals on a tiny model: what each measures, and that they agree where they must."""

import pytest
import torch

from mpq.apply import QuantizedWeightCache
from mpq.formats import get_format
from mpq.sensitivity import (hutchinson_traces, measure_fisher, measure_hessian, measure_local, measure_sensitivity,
                             measurement_model)
from mpq.tasks import EncoderTask

FORMATS = [get_format(n) for n in ("fp16", "int8", "int4-g32")]


@pytest.mark.parametrize("measure", [measure_sensitivity, measure_local, measure_fisher, measure_hessian])
def test_signal_properties(tiny_llama_calibrated, measure):
    loaded, task, graph = tiny_llama_calibrated
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


def test_local_signal_is_the_relative_output_error(tiny_llama_calibrated):
    """Checked by hand for one layer: ||x dW^T||^2 / ||x W^T||^2 over the layer's calibration inputs."""
    from mpq.quantize import dequantize_weight, quantize_weight

    loaded, task, graph = tiny_llama_calibrated
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


def test_fisher_leaves_no_gradients_behind(tiny_llama_calibrated):
    loaded, task, graph = tiny_llama_calibrated
    work = measurement_model(loaded.model)
    measure_fisher(loaded.model, work, graph.layers, FORMATS, task, "k", {}, QuantizedWeightCache(loaded.model), False)
    assert all(not p.requires_grad and p.grad is None for p in work.parameters())


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config).eval().requires_grad_(False)


class ProbeTask:
    """An encoder task's calibration side: batches of token ids and the pooled unit embeddings."""
    pooled = EncoderTask.pooled
    embeddings = EncoderTask.embeddings
    reference = EncoderTask.reference

    def __init__(self, batches):
        self.calib_batches = batches


def test_encoder_fisher_estimates_the_curvature_of_one_minus_cosine():
    """E[F] = diag(J^T J) / n for the unit embeddings u(W): checked against the exact Jacobian of a
    tiny BERT's layer, averaged over many probe draws."""
    from mpq.sensitivity import _fisher_losses

    model = tiny_bert()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 100, (3, 7), generator=g), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
               for _ in range(2)]
    batches[1]["attention_mask"][0, 5:] = 0  # padding is pooled out
    task = ProbeTask(batches)
    name = "encoder.layer.0.intermediate.dense"
    layer = model.get_submodule(name)
    original = layer.weight.detach().clone()

    class WithWeight(torch.nn.Module):  # the model with this layer's weight swapped for `weight`, differentiably
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, **inputs):
            return torch.func.functional_call(model, {f"{name}.weight": self.weight}, args=(), kwargs=inputs)

    def units(weight):
        return torch.cat([task.pooled(WithWeight(weight), b) for b in batches]).flatten()

    jacobian = torch.autograd.functional.jacobian(units, original)  # [n * d, out, in]
    exact = jacobian.pow(2).sum(0) / 6  # 6 sentences
    draws = 300
    estimate = torch.zeros_like(original)
    generator = torch.Generator().manual_seed(0)
    layer.weight.requires_grad_(True)
    for _ in range(draws):
        for loss in _fisher_losses(task, model, generator):
            (grad,) = torch.autograd.grad(loss, [layer.weight])
            estimate += grad.pow(2) / draws
    assert estimate.sum().item() == pytest.approx(exact.sum().item(), rel=0.05)
    assert torch.corrcoef(torch.stack([estimate.flatten(), exact.flatten()]))[0, 1] > 0.95
    # and it predicts 1 - cos: a small change along one weight costs about 1/2 eps^2 G_jj
    j = exact.flatten().argmax()
    bumped = original.clone().flatten()
    bumped[j] += 1e-2
    with torch.no_grad():
        after = units(bumped.view_as(original)).view(6, -1)
        before = units(original).view(6, -1)
    measured = (0.5 * (after - before).pow(2).sum(-1)).mean().item()  # = 1 - cos for unit vectors, without cancellation
    assert measured == pytest.approx(0.5 * 1e-4 * exact.flatten()[j].item(), rel=0.05)


def test_fisher_and_hessian_run_on_an_encoder():
    """Both second-order signals take an encoder: finite, non-negative, INT4 above INT8 in all."""
    from mpq.trace import trace_model

    model = tiny_bert()
    g = torch.Generator().manual_seed(4)
    task = ProbeTask([{"input_ids": torch.randint(0, 100, (4, 9), generator=g),
                       "attention_mask": torch.ones(4, 9, dtype=torch.long)} for _ in range(3)])
    graph = trace_model(model, {"input_ids": task.calib_batches[0]["input_ids"][:1]})
    formats = [get_format(n) for n in ("int8", "int4-g32")]
    for measure in (measure_fisher, measure_hessian):
        table = measure(model, model, graph.layers, formats, task, "k", {}, QuantizedWeightCache(model), False)
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())
        values = table.values
        assert all(v >= 0 and v == v for per in values.values() for v in per.values())
        assert sum(p["int8"] for p in values.values()) < sum(p["int4-g32"] for p in values.values())


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


def test_hessian_leaves_no_gradients_behind(tiny_llama_calibrated):
    loaded, task, graph = tiny_llama_calibrated
    work = measurement_model(loaded.model)
    table = measure_hessian(loaded.model, work, graph.layers, FORMATS, task, "k", {}, QuantizedWeightCache(loaded.model), False)
    assert all(not p.requires_grad and p.grad is None for p in work.parameters())
    assert table.metric == "hessian"
