"""GPTQ and AWQ: same packed formats as round-to-nearest, and less output error on the data they saw."""

import json

import pytest
import torch

import mpq
from mpq.awq import awq_quantize_group, output_error
from mpq.cli import main
from mpq.formats import get_format
from mpq.gptq import gptq_quantize
from mpq.memory import resident_bytes
from mpq.quantize import dequantize_weight, quantize_weight

FORMATS = ["int8", "int4-g32", "int4-g64-sym", "int4-g128", "int4-pc"]


def correlated_inputs(k: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, as in transformer activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, :4] *= 8
    return x


def effective(tensors: dict, fmt) -> torch.Tensor:
    """The weight a layer computes with: AWQ's stored W s times the input's 1/s."""
    w = dequantize_weight({k: v for k, v in tensors.items() if k != "input_scale"}, fmt)
    return w * tensors["input_scale"].float()[None, :] if "input_scale" in tensors else w


@pytest.mark.parametrize("name", FORMATS)
def test_gptq_has_less_output_error_than_rtn_and_the_same_layout(name):
    fmt = get_format(name)
    torch.manual_seed(1)
    w = (torch.randn(96, 256) * 0.02).to(torch.bfloat16)
    x = correlated_inputs(256)
    h = x.T @ x / x.shape[0]
    rtn, gptq = quantize_weight(w, fmt), gptq_quantize(w, fmt, h)
    assert {k: (v.shape, v.dtype) for k, v in rtn.items()} == {k: (v.shape, v.dtype) for k, v in gptq.items()}
    assert torch.equal(rtn["scales"], gptq["scales"])  # static groups: the grid is RTN's
    err_rtn = output_error(w.float() - dequantize_weight(rtn, fmt), h)
    err_gptq = output_error(w.float() - dequantize_weight(gptq, fmt), h)
    assert err_gptq < 0.95 * err_rtn


def test_gptq_with_uncorrelated_inputs_is_rounding_to_nearest():
    """With a diagonal Hessian no column's error can be compensated by another: GPTQ = RTN."""
    fmt = get_format("int4-g32")
    w = torch.randn(40, 128) * 0.02
    h = torch.diag(torch.rand(128) + 0.5)
    assert all(torch.equal(a, b) for a, b in zip(quantize_weight(w, fmt).values(), gptq_quantize(w, fmt, h).values()))


def test_gptq_survives_dead_inputs_and_a_singular_hessian():
    fmt = get_format("int8")
    x = correlated_inputs(64, rows=16)  # fewer rows than channels: H is singular
    x[:, 10] = 0.0  # an input that never fires
    out = gptq_quantize(torch.randn(32, 64), fmt, x.T @ x / 16)
    assert torch.isfinite(dequantize_weight(out, fmt)).all()


@pytest.mark.parametrize("name", FORMATS)
def test_awq_never_does_worse_than_rtn_on_its_objective(name):
    fmt = get_format(name)
    torch.manual_seed(2)
    weights = {"q": torch.randn(64, 256) * 0.02, "k": torch.randn(32, 256) * 0.02}
    x = correlated_inputs(256)
    h = x.T @ x / x.shape[0]
    out, alpha = awq_quantize_group(weights, fmt, x.abs().mean(0), h)
    assert 0.0 <= alpha <= 1.0
    assert torch.equal(out["q"]["input_scale"], out["k"]["input_scale"])  # one input, one divisor
    assert out["q"]["input_scale"].dtype == torch.bfloat16 and out["q"]["input_scale"].shape == (256,)
    for n, w in weights.items():  # the reference dequantisation folds the input scale back in
        assert torch.equal(dequantize_weight(out[n], fmt), effective(out[n], fmt))
        assert (dequantize_weight(out[n], fmt) - w).norm() < 0.2 * w.norm()
    err_awq = sum(output_error(w - effective(out[n], fmt), h) for n, w in weights.items())
    err_rtn = sum(output_error(w - dequantize_weight(quantize_weight(w, fmt), fmt), h) for n, w in weights.items())
    assert err_awq <= err_rtn * (1 + 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq", "auto"])
def test_compile_with_a_method_emits_configs_that_load_back(tiny_llama_dir, tmp_path, method):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_llama_dir), "-o", str(out), "-q", "--samples", "4", "--seq-len", "32",
                 "--trials", "40", "--max-configs", "3", "--group-size", "32", "--method", method, "--no-latency"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    if method == "auto":  # resolved per format from the held-out losses it records
        choice = summary["method_choice"]
        assert summary["method"] == choice["chosen"] and set(choice["heldout_loss"]) == {"int8", "int4-g32"}
        from mpq.method_choice import DEFAULT_BY_BITS, pick
        from mpq.methods import method_of

        assert all(method_of(choice["chosen"], get_format(fmt)) == pick(DEFAULT_BY_BITS[get_format(fmt).bits], losses)
                   for fmt, losses in choice["heldout_loss"].items())
        assert "--method auto" in (out / "report.md").read_text()
        method = method_of(choice["chosen"], get_format("int4-g32"))  # what the INT4 layers' card line starts with
    else:
        assert summary["method"] == method and summary["method_choice"] is None
    ids = torch.randint(0, 4000, (1, 12))
    for row in summary["configs"]:
        folder = out / "configs" / row["name"]
        card = json.loads((folder / "mpq.json").read_text())["card"]
        assert method in card["method"]
        model = mpq.load(folder)
        assert resident_bytes(model) == row["bytes"]  # AWQ's input scales counted too
        reference = mpq.load(folder, backend="reference")
        a = model(input_ids=ids, use_cache=False).logits.float()
        b = reference(input_ids=ids, use_cache=False).logits.float()
        assert torch.isfinite(a).all() and (a - b).abs().max() < 0.1 * b.abs().max()
    if method == "awq":
        quantised = [r for r in summary["configs"] if any(f != "fp16" for f in r["counts"])]
        folder = out / "configs" / quantised[0]["name"]
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as handle:
            assert any(key.endswith(".input_scale") for key in handle.keys())


def test_block_by_block_statistics_are_the_calibration_second_moments(untied_llama_dir):
    """Checked by hand: H = X^T X / n of the inputs each layer sees in the float32 twin of the whole
    model, shared by q/k/v, though the blocks were run one at a time (and lm_head with every block replayed)."""
    from mpq.blockwise import calibrate_blockwise
    from mpq.models import load_model
    from mpq.sensitivity import measurement_model
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    loaded = load_model(str(untied_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    groups = graph.shared_input_groups()
    blocks = list(calibrate_blockwise(loaded.model, graph.layers, groups, task))
    assert [b.name for b in blocks][-1] == "outside blocks" and blocks[-1].judge is None
    # every linear, and not the input table (token ids are no activations)
    assert sorted(n for b in blocks for n in b.layers) == sorted(l.name for l in graph.layers if not l.is_embedding)
    assert graph.layers[0].is_embedding
    work = measurement_model(loaded.model)
    last_block = blocks[-2]
    q, k = [g for g in groups if g[0].startswith(last_block.name + ".")][0][:2]
    for name in (q, "lm_head"):
        captured = []
        handle = work.get_submodule(name).register_forward_hook(lambda m, i, o: captured.append(i[0].reshape(-1, i[0].shape[-1])))
        task.reference(work)
        handle.remove()
        x = torch.cat(captured).float()
        stats = next(b.stats for b in blocks if name in b.layers)
        assert torch.allclose(stats.hessian[name], x.T @ x / x.shape[0], rtol=1e-3, atol=1e-5)
        assert torch.allclose(stats.absmean[name], x.abs().mean(0), rtol=1e-3, atol=1e-5)
        assert stats.rows == x.shape[0] == 4 * 32
    assert last_block.stats.hessian[q] is last_block.stats.hessian[k]  # one input, one matrix


def test_block_judge_sees_a_weight_change_and_restores_the_block(tiny_llama_dir):
    from mpq.blockwise import calibrate_blockwise
    from mpq.models import load_model
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    loaded = load_model(str(tiny_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 2, 16)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    block = next(iter(calibrate_blockwise(loaded.model, graph.layers, graph.shared_input_groups(), task)))
    name = block.layers[0]
    w = loaded.model.get_submodule(name).weight
    fp16, int4 = get_format("fp16"), get_format("int4-g32")
    exact = block.judge({name: quantize_weight(w, fp16)}, fp16)
    rough = block.judge({name: quantize_weight(w, int4)}, int4)
    assert exact < 1e-6 * rough and rough > 0
    assert block.judge({name: quantize_weight(w, fp16)}, fp16) == exact  # the block got its weight back


def test_awq_judged_on_the_block_never_does_worse_than_rtn_there(untied_llama_dir):
    from mpq.blockwise import calibrate_blockwise
    from mpq.models import load_model
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    loaded = load_model(str(untied_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    groups = graph.shared_input_groups()
    block = next(iter(calibrate_blockwise(loaded.model, graph.layers, groups, task)))
    fmt = get_format("int4-g32")
    for group in [g for g in groups if g[0] in block.layers] + [[block.layers[-1]]]:
        weights = {n: loaded.model.get_submodule(n).weight for n in group}
        out, _ = awq_quantize_group(weights, fmt, block.stats.absmean[group[0]], block.stats.hessian[group[0]], block.judge)
        rtn = {n: quantize_weight(w, fmt) for n, w in weights.items()}
        assert block.judge(out, fmt) <= block.judge(rtn, fmt)
        assert all("input_scale" in t for t in out.values())  # bytes never depend on what the search chose


def test_a_method_per_format_rounds_each_format_by_its_own(untied_llama_dir):
    """int8=rtn,int4=gptq: INT8 tensors are round-to-nearest's, INT4 ones GPTQ's (which differ)."""
    from mpq.methods import check_method, describe, method_of, method_quantizer
    from mpq.memory import memory_model
    from mpq.models import load_model
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    formats = [get_format(n) for n in ("fp16", "int8", "int4-g32", "int4-pc")]
    assert [method_of("int8=rtn,int4=gptq", f) for f in formats] == ["rtn", "rtn", "gptq", "gptq"]
    assert [method_of("int4-pc=awq,int4=gptq", f) for f in formats] == ["rtn", "rtn", "gptq", "awq"]  # the exact name wins
    assert method_of("awq", formats[1]) == "awq" and method_of("int4=gptq", formats[1]) == "rtn"  # not named: rtn
    for bad in ("int8=fast", "int3=gptq", "int8=", "gptq,int4"):
        with pytest.raises(ValueError, match="--method"):
            check_method(bad, formats)
    assert describe("int8=rtn,int4=gptq", formats).startswith("int8: rtn") and "int4-pc: gptq" in describe("int8=rtn,int4=gptq", formats)

    loaded = load_model(str(untied_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    groups = graph.shared_input_groups()
    mixed = method_quantizer("int8=rtn,int4=gptq", loaded.model, graph.layers, groups, formats, task)
    rtn = method_quantizer("rtn", loaded.model, graph.layers, groups, formats, task)
    gptq = method_quantizer("gptq", loaded.model, graph.layers, groups, formats, task)
    first = next(layer for layer in graph.layers if not layer.is_embedding)
    name = first.name
    assert all(torch.equal(a, b) for a, b in zip(mixed(name, formats[1]).values(), rtn(name, formats[1]).values()))
    int4_mixed, int4_gptq = mixed(name, formats[2]), gptq(name, formats[2])
    assert all(torch.equal(a, b) for a, b in zip(int4_mixed.values(), int4_gptq.values()))
    assert not torch.equal(int4_mixed["qweight"], rtn(name, formats[2])["qweight"])
    awq_int4 = memory_model(loaded.model, graph.layers, formats, "int4=awq").layer_bytes[name]
    plain = memory_model(loaded.model, graph.layers, formats, "rtn").layer_bytes[name]
    assert awq_int4["int8"] == plain["int8"] and awq_int4["int4-g32"] == plain["int4-g32"] + 2 * first.in_features


def test_auto_method_takes_per_format_the_method_its_judge_scores_best(untied_llama_dir):
    """--method auto: each quantised format gets the method whose uniform config the judge scores
    lower (with the paired z of the difference), and the quantizer then serves that method's tensors. The judge
    here is crafted so the two formats choose differently: its "windows" are the layers, scored
    for INT8 by weight error (RTN's is smaller: GPTQ trades weight error for output error), for
    INT4 by minus weight error (so GPTQ)."""
    from mpq.memory import memory_model
    from mpq.method_choice import choose_method
    from mpq.methods import check_method, method_quantizer
    from mpq.models import load_model
    from mpq.qlinear import linear_weight
    from mpq.apply import get_module
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    formats = [get_format(n) for n in ("fp16", "int8", "int4-g32")]
    check_method("auto", formats)  # accepted alone
    with pytest.raises(ValueError, match="auto alone"):
        check_method("int8=auto", formats)
    loaded = load_model(str(untied_llama_dir))
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32)
    graph = trace_model(loaded.model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
    groups = graph.shared_input_groups()
    costs = memory_model(loaded.model, graph.layers, formats, "rtn").layer_bytes
    calls = []

    def weight_error(plan, cache):
        calls.append(plan)
        fmt = get_format(next(iter(plan.values())))
        error = torch.tensor([float((linear_weight(get_module(loaded.model, layer)).float()
                                     - dequantize_weight(cache.get(layer, get_format(name)), get_format(name))).pow(2).sum())
                              for layer, name in plan.items()]).log()  # layers differ in size: compare ratios
        return error if fmt.name == "int8" else -error

    choice = choose_method("auto", loaded.model, graph.layers, groups, formats, task, costs, weight_error)
    assert choice.method == "int8=rtn,int4=gptq"
    assert len(calls) == 4 and all(len(set(plan.values())) == 1 for plan in calls)  # uniform plans, 2 methods each
    assert choice.heldout_loss["int8"]["rtn"] < choice.heldout_loss["int8"]["gptq"] and choice.heldout_loss["int8"]["z"] > 2
    assert choice.heldout_loss["int4-g32"]["z"] < -2
    rtn = method_quantizer("rtn", loaded.model, graph.layers, groups, formats, task)
    gptq = method_quantizer("gptq", loaded.model, graph.layers, groups, formats, task)
    for layer in (graph.layers[1].name, graph.layers[-1].name):  # [0] is the input table: rtn under any method
        assert all(torch.equal(a, b) for a, b in zip(choice.quantizer(layer, formats[1]).values(), rtn(layer, formats[1]).values()))
        assert all(torch.equal(a, b) for a, b in zip(choice.quantizer(layer, formats[2]).values(), gptq(layer, formats[2]).values()))
    assert choose_method("rtn", loaded.model, graph.layers, groups, formats, task, costs, weight_error).heldout_loss is None


def test_auto_reports_whether_a_choice_is_within_the_noise():
    """paired_z: a small but consistent gain is significant; a larger mean gain that is noise is not."""
    from mpq.noise import NOISE_Z, paired_z

    g = torch.Generator().manual_seed(0)
    base = 3.0 + torch.rand(48, generator=g)
    assert paired_z(base - 0.001, base) == -float("inf")  # the same gain on every window
    consistent = base - 0.01 + 0.002 * torch.randn(48, generator=g)
    noisy = base - 0.01 + 0.2 * torch.randn(48, generator=g)
    assert paired_z(consistent, base) < -NOISE_Z
    assert abs(paired_z(noisy, base)) < NOISE_Z
    assert paired_z(base, base) == 0.0 and paired_z(base + 0.01, base) == float("inf")


@pytest.mark.parametrize("z, int8, int4", [(-1.2, "rtn", "gptq"), (-2.5, "gptq", "gptq"), (1.1, "rtn", "gptq"),
                                           (2.5, "rtn", "rtn")])
def test_auto_keeps_the_bit_widths_default_unless_the_other_method_wins_beyond_noise(z, int8, int4):
    """GPTQ at 4 bits, rtn at 8 (z is gptq's paired difference from rtn: negative where it is better)."""
    from mpq.method_choice import DEFAULT_BY_BITS, pick

    measured = {"rtn": 3.0, "gptq": 3.0 + 0.001 * z, "z": z}
    assert pick(DEFAULT_BY_BITS[8], measured) == int8 and pick(DEFAULT_BY_BITS[4], measured) == int4


def test_compact_method_is_the_shortest_text_that_gives_each_format_its_method():
    from mpq.methods import compact_method, method_of

    formats = [get_format(n) for n in ("int8", "int4-g32", "int4-g128-sym", "int4-pc", "int4-pc+hot512")]
    cases = {
        ("gptq",) * 5: "gptq",
        ("rtn", "gptq", "gptq", "gptq", "gptq"): "int8=rtn,int4=gptq",
        ("rtn", "gptq", "rtn", "gptq", "gptq"): "int8=rtn,int4-g32=gptq,int4-g128-sym=rtn,int4-pc=gptq,int4-pc+hot512=gptq",
    }
    for methods, expected in cases.items():
        chosen = {fmt.name: method for fmt, method in zip(formats, methods)}
        text = compact_method(chosen, formats)
        assert text == expected
        assert all(method_of(text, fmt) == chosen[fmt.name] for fmt in formats)


def test_only_layers_a_calibrated_format_holds_count_as_rounded_to_nearest():
    """A layer the calibration never ran is rounded to nearest instead of by GPTQ only where its
    format's method is GPTQ or AWQ: in fp16, or in a format the method leaves to rtn, nothing changed."""
    from mpq.methods import rounded_to_nearest

    specs = {"a": get_format("int4-g32"), "b": get_format("int8"), "c": get_format("fp16"), "d": get_format("int4-g32")}
    assert rounded_to_nearest(["a", "b", "c", "x"], specs, "int8=rtn,int4=gptq") == ["a"]
    assert rounded_to_nearest(["a", "b", "c"], specs, "awq") == ["a", "b"]
    assert rounded_to_nearest(["a", "b"], specs, "rtn") == []
