"""16-bit products through float32 in quality passes (mpq.cpu_matmul): the same arithmetic as
float32 products rounded once, a tile at a time, never in speed measurements."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpq import cpu_matmul
from mpq.errors import MpqError
from mpq.models import load_model
from mpq.tasks import CausalLMTask

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # spacing of values in [1, 2)


@pytest.fixture
def routed_calls(monkeypatch) -> list[tuple[int, ...]]:
    """MPQ_CPU_MATMUL=fp32, and the [M, K, N] of every product computed through float32."""
    monkeypatch.setenv("MPQ_CPU_MATMUL", "fp32")
    calls: list[tuple[int, ...]] = []
    product = cpu_matmul._product

    def spy(a, b, *args, **kwargs):
        calls.append((*a.shape, b.shape[1]))
        return product(a, b, *args, **kwargs)

    monkeypatch.setattr(cpu_matmul, "_product", spy)
    return calls


def _same_arithmetic(got: torch.Tensor, want: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """got and want, both a @ b summed in float32 and rounded once, differ by the order of the sums
    only: one unit in the last place of the 16-bit output (a power of two times ULP; the smallest
    normal's for values near zero) plus float32's error bound for a K-term sum, K 2^-24 |a| @ |b|,
    which decides where the sum cancels."""
    ulp = ULP[want.dtype] * torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(2.0 ** -14))))
    sums = a.shape[-1] * 2.0 ** -24 * (a.float().abs() @ b.float().abs())
    return bool(((got.float() - want.float()).abs() <= ulp + sums).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 17, 33), (2, 45, 129)])
def test_linear_layers_products_match_float32_arithmetic_within_one_ulp(routed_calls, monkeypatch, dtype, shape):
    monkeypatch.setattr(cpu_matmul, "TILE_ELEMENTS", 256)  # many row and column tiles, ragged last ones
    batch, m, k = shape
    n = 2 * k + 3
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(batch, m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    want = F.linear(x.float(), w.float(), bias.float()).to(dtype)
    with cpu_matmul.float32_products():
        got = F.linear(x, w, bias)
        got_no_bias = F.linear(x, w)
    assert got.dtype == dtype and got.shape == want.shape
    assert _same_arithmetic(got, want, x, w.t())
    assert _same_arithmetic(got_no_bias, F.linear(x.float(), w.float()).to(dtype), x, w.t())
    assert len(routed_calls) == 2 and routed_calls[0] == (batch * m, k, n)


def test_addmm_keeps_its_scaling_factors(routed_calls, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "TILE_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(1)
    add, a, b = (torch.randn(*s, generator=gen).bfloat16() for s in [(19, 23), (19, 11), (11, 23)])
    want = torch.addmm(add.float(), a.float(), b.float(), beta=0.5, alpha=-2.0).bfloat16()
    with cpu_matmul.float32_products():
        got = torch.addmm(add, a, b, beta=0.5, alpha=-2.0)
        scaled = torch.mm(a, b) * 1.0
    assert _same_arithmetic(got, want, 2 * a, b)
    assert _same_arithmetic(scaled, (a.float() @ b.float()).bfloat16(), a, b)
    assert len(routed_calls) == 2


def test_float32_and_mixed_products_and_other_settings_are_left_alone(routed_calls, monkeypatch):
    a, b = torch.randn(5, 8), torch.randn(8, 3)
    with cpu_matmul.float32_products():
        assert torch.equal(a @ b, torch.mm(a, b))
        torch.mm(a.bfloat16(), b.bfloat16())
        assert torch.equal(torch.mm(a[:, :0].bfloat16(), b[:0].bfloat16()), torch.zeros(5, 3, dtype=torch.bfloat16))
    assert routed_calls == [(5, 8, 3)]  # only the bf16 product with terms to sum
    assert not isinstance(cpu_matmul.float32_products("cuda"), cpu_matmul.Float32Products)  # nothing to route there
    monkeypatch.setenv("MPQ_CPU_MATMUL", "native")
    assert not cpu_matmul.routes(torch.bfloat16)
    assert not isinstance(cpu_matmul.float32_products(), cpu_matmul.Float32Products)
    assert cpu_matmul.describe() == "torch's CPU GEMM in the model's dtype"
    monkeypatch.setenv("MPQ_CPU_MATMUL", "auto")
    assert cpu_matmul.routes(torch.bfloat16) == (not cpu_matmul.native_gemm(torch.bfloat16))
    assert not cpu_matmul.routes(torch.float32)


def test_a_malformed_setting_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("MPQ_CPU_MATMUL", "fast")
    with pytest.raises(MpqError, match="MPQ_CPU_MATMUL='fast': use one of auto, fp32, native"):
        cpu_matmul.float32_products()


def test_quality_passes_route_the_demo_and_its_perplexity_stays_within_noise(routed_calls, monkeypatch):
    """The demo's held-out perplexity with products in float32 and with torch's bf16 GEMM: the same
    arithmetic up to the order of sums, so the same to 1e-3 relative (bf16 rounding differences
    carried through six blocks; the config-to-config differences compile ranks are 1e-2 and up)."""
    loaded = load_model("demo")
    task = CausalLMTask(loaded.tokenizer, None, 0, 0, eval_samples=4)
    task.heldout = {kind: ids[:, :96] for kind, ids in task.heldout.items()}
    routed = task.evaluate(loaded.model)["ppl"]
    linears = 6 * 7 + 1  # q, k, v, o, gate, up, down per block and the head
    assert len(routed_calls) == 2 * linears  # one batch of 4 windows of text, one of code
    monkeypatch.setenv("MPQ_CPU_MATMUL", "native")
    native = task.evaluate(loaded.model)["ppl"]
    assert len(routed_calls) == 2 * linears
    assert routed == pytest.approx(native, rel=1e-3)


def test_speed_is_timed_without_routing_and_quality_with_it(routed_calls, monkeypatch, demo_tokenizer):
    from transformers import BertConfig, BertModel

    from conftest import tiny_llama
    from mpq import evaluate
    from mpq.models import CAUSAL_LM, ENCODER
    from mpq.tasks import EncoderTask

    monkeypatch.setattr(evaluate, "_median_seconds", lambda fn, repeats=9: (fn(), 1.0)[1])  # one run, not nine
    llama = tiny_llama(len(demo_tokenizer)).bfloat16()
    causal = CausalLMTask(demo_tokenizer, None, 0, 0, eval_samples=1, eval_seq_len=40)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(demo_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval().bfloat16()
    encoder = EncoderTask(demo_tokenizer, None, 0, 64, eval_samples=4)
    assert set(evaluate.speed(llama, CAUSAL_LM, causal)) == {"prefill_tokens_per_s", "decode_tokens_per_s"}
    assert set(evaluate.speed(bert, ENCODER, encoder)) == {"sentences_per_s"}
    assert routed_calls == []
    causal.evaluate(llama)
    assert len(routed_calls) == 2 * (2 * 7 + 1)  # text and code: 7 linears in each of 2 blocks, the head
    encoder.prepare_eval(bert)  # the original's held-out embeddings: a quality pass
    assert len(routed_calls) > 2 * (2 * 7 + 1)
