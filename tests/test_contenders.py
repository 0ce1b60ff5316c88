"""Contenders built by mpq: the first/last rule, random assignments of given bytes, plain dtypes,
bitsandbytes (when installed); and perplexity against a hand computation."""

import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mpq.contenders import first_last_plan, load_original, random_plans
from mpq.evaluate import PeakMemory, evaluate_model
from mpq.memory import resident_bytes
from mpq.models import CAUSAL_LM
from mpq.tasks import make_task

FORMAT_BYTES = {"fp16": 200, "int8": 100, "int4-g128": 60, "int4-g32": 70}


def costs(blocks: int = 4) -> dict[str, dict[str, int]]:
    names = [f"model.layers.{i}.{part}" for i in range(blocks) for part in ("q", "k", "o", "mlp")] + ["lm_head"]
    return {name: dict(FORMAT_BYTES) for name in names}


def test_first_last_rule_keeps_the_edge_blocks_and_the_head_high():
    plan = first_last_plan(costs(4), "fp16", "int4-g128", ["model.layers"])
    assert plan["lm_head"] == "fp16"
    for i, expected in enumerate(["fp16", "int4-g128", "int4-g128", "fp16"]):
        assert {plan[f"model.layers.{i}.{p}"] for p in ("q", "k", "o", "mlp")} == {expected}


def test_first_last_rule_keeps_the_edge_blocks_of_each_stack_high():
    """An encoder-decoder: the first and last blocks of the encoder and of the decoder."""
    names = [f"{stack}.block.{i}.{part}" for stack in ("encoder", "decoder") for i in range(3) for part in ("q", "wo")]
    plan = first_last_plan({name: dict(FORMAT_BYTES) for name in names}, "fp16", "int4-g128",
                           ["encoder.block", "decoder.block"])
    for stack in ("encoder", "decoder"):
        assert [plan[f"{stack}.block.{i}.q"] for i in range(3)] == ["fp16", "int4-g128", "fp16"]


def test_first_last_rule_gives_a_layer_that_cannot_take_a_format_its_largest():
    c = costs(3)
    c["model.layers.1.mlp"] = {"fp16": 200, "int8": 100}  # no int4 for this shape
    assert first_last_plan(c, "fp16", "int4-g128", ["model.layers"])["model.layers.1.mlp"] == "fp16"


def test_random_plans_have_the_bytes_asked_and_keep_tied_layers_together():
    c = costs(4)
    tied = [[f"model.layers.{i}.q", f"model.layers.{i}.k"] for i in range(4)]
    target = 17 * 60 + int(0.5 * 17 * 40)  # halfway from all-int4-g128 to all-int8
    plans = random_plans(c, target, 20, seed=3, tied=tied, fixed_bytes=0)
    totals = [sum(c[layer][fmt] for layer, fmt in plan.items()) for plan in plans]
    assert all(target * 0.98 <= t <= target for t in totals), totals
    assert all(plan[a] == plan[b] for plan in plans for a, b in tied)
    assert len({tuple(sorted(p.items())) for p in plans}) >= 15  # random, not one plan repeated
    assert plans == random_plans(c, target, 20, seed=3, tied=tied, fixed_bytes=0)  # seeded
    with pytest.raises(ValueError, match="smallest takes"):
        random_plans(c, 17 * 60 - 1, 1)


class FixedLogits(nn.Module):
    """A causal LM whose logits are a fixed function of the current token: logits = E[id] @ U."""

    def __init__(self, vocab: int, zero: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.e = nn.Parameter(torch.randn(vocab, 8, generator=g) * (0 if zero else 1))
        self.u = nn.Parameter(torch.randn(8, vocab, generator=g))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.e[input_ids] @ self.u)


def hand_nll(model: FixedLogits, ids: torch.Tensor) -> tuple[float, int]:
    """Sum over positions of log(sum_v exp(l_v)) - l_target, in float64, by its definition."""
    with torch.no_grad():
        logits = (model.e[ids[:, :-1]] @ model.u).double()
        logits = logits.detach()
    top = logits.max(-1, keepdim=True).values
    log_z = top.squeeze(-1) + torch.log(torch.exp(logits - top).sum(-1))
    target = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float((log_z - target).sum()), ids[:, 1:].numel()


@pytest.mark.parametrize("target", ["both", "text", "code"])
def test_perplexity_matches_a_hand_computation(demo_tokenizer, target):
    task = make_task(CAUSAL_LM, demo_tokenizer, None, target=target)
    vocab = len(demo_tokenizer)
    uniform = task.evaluate(FixedLogits(vocab, zero=True).eval())
    assert uniform["ppl_text"] == pytest.approx(vocab, rel=1e-5)  # all logits equal: perplexity = vocabulary size
    model = FixedLogits(vocab).eval()
    got = task.evaluate(model)
    (nt, ct), (nc, cc) = hand_nll(model, task.heldout["text"]), hand_nll(model, task.heldout["code"])
    assert got["ppl_text"] == pytest.approx(math.exp(nt / ct), rel=1e-4)
    assert got["ppl_code"] == pytest.approx(math.exp(nc / cc), rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp((nt + nc) / (ct + cc)), rel=1e-4)
    assert got["loss"] == got["ppl" if target == "both" else f"ppl_{target}"]


def test_every_contender_goes_through_one_evaluation(tiny_llama_dir):
    task = make_task(CAUSAL_LM, load_original(str(tiny_llama_dir)).tokenizer, None)
    rows = {dtype: evaluate_model(load_original(str(tiny_llama_dir), dtype=dtype).model, CAUSAL_LM, task, with_speed=False)
            for dtype in ("fp32", "bf16", "fp16")}
    assert rows["bf16"]["bytes"] == rows["fp16"]["bytes"]
    assert abs(rows["fp32"]["bytes"] - 2 * rows["bf16"]["bytes"]) < 1024  # float32 buffers (rotary) stay as they are
    assert all(r["peak_rss_bytes"] is None or r["peak_rss_bytes"] > r["bytes"] for r in rows.values())
    assert rows["bf16"]["quality"]["ppl"] == pytest.approx(rows["fp32"]["quality"]["ppl"], rel=0.02)


def test_peak_memory_sees_a_transient_allocation():
    if PeakMemory.rss() is None:
        pytest.skip("no /proc/self/statm here")
    with PeakMemory() as during:
        block = torch.ones(128 * 2 ** 20 // 4)  # 128 MB, touched, held a moment, freed inside the block
        held = PeakMemory.rss()
        time.sleep(0.2)
        del block
        after = PeakMemory.rss()
    if held - after < 64 * 2 ** 20:  # the allocator kept the pages (reused from earlier tests): nothing transient
        pytest.skip("the allocation did not show in this process's RSS")
    assert during.peak >= held > after  # the sampler saw the peak that was gone by the block's end


@pytest.mark.slow
def test_bitsandbytes_contenders_count_their_side_state(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    plain = load_original(str(tiny_llama_dir)).model
    for mode in ("int8", "nf4"):
        model = load_original(str(tiny_llama_dir), bnb=mode).model
        weight = model.model.layers[0].self_attn.q_proj.weight
        side = weight.SCB if mode == "int8" else weight.quant_state.absmax
        params = sum(t.untyped_storage().nbytes() for t in {id(p): p for p in [*model.parameters(), *model.buffers()]}.values())
        assert resident_bytes(model) >= params + side.numel() * side.element_size()
        assert resident_bytes(model) < resident_bytes(plain)


def test_held_out_halves_are_disjoint_and_test_is_the_default_of_mpq_eval(demo_tokenizer):
    import inspect

    from mpq.evaluate import evaluate_config, evaluate_original
    from mpq.tasks import EncoderTask

    val, test = (make_task(CAUSAL_LM, demo_tokenizer, None, split=s) for s in ("validation", "test"))
    for kind in ("text", "code"):
        assert val.heldout[kind].shape == test.heldout[kind].shape
        assert not torch.equal(val.heldout[kind], test.heldout[kind])
    enc_val, enc_test = (EncoderTask(demo_tokenizer, None, 0, 64, split=s) for s in ("validation", "test"))
    assert not torch.equal(enc_val.heldout_batches[0]["input_ids"], enc_test.heldout_batches[0]["input_ids"])
    for fn in (evaluate_config, evaluate_original):
        assert inspect.signature(fn).parameters["split"].default == "test"
    with pytest.raises(Exception, match="split"):
        make_task(CAUSAL_LM, demo_tokenizer, None, split="train")
