"""Encoder-decoder LMs (T5, BART): the task's source/target windows, the trace's per-block groups
and stack-named kinds, tables looked up under several paths, a decode step that runs no encoder
layer, and a compiled config that loads back at the bytes predicted."""

import json

import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import MANIFEST
from mpq.compile import CompileOptions, compile_model
from mpq.evaluate import evaluate_config
from mpq.float_twin import named_block_lists
from mpq.inspect import describe
from mpq.latency import Regime, calls_per_step, make_regime
from mpq.memory import resident_bytes
from mpq.models import SEQ2SEQ_LM, decoder_start_of, load_model
from mpq.qembedding import TiedEmbedding
from mpq.tasks import calibration_text, make_task
from mpq.trace import table_aliases, trace_model


def _t5(vocab: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0)).eval()


def _bart(vocab: int, tokenizer):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
        decoder_start_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        bos_token_id=0, scale_embedding=True)).eval()


@pytest.fixture
def t5_dir(tmp_path, demo_tokenizer):
    path = tmp_path / "tiny-t5"
    _t5(len(demo_tokenizer)).save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def bart_dir(tmp_path, demo_tokenizer):
    path = tmp_path / "tiny-bart"
    _bart(len(demo_tokenizer), demo_tokenizer).save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


def _task(loaded, samples: int = 4, seq_len: int = 32):
    return make_task(loaded.task, loaded.tokenizer, calibration_text(None), samples, seq_len,
                     decoder_start=decoder_start_of(loaded.model))


def test_a_window_is_half_source_half_target_and_the_loss_is_over_the_target(t5_dir):
    loaded = load_model(str(t5_dir))
    assert loaded.task == SEQ2SEQ_LM and type(loaded.model).__name__ == "T5ForConditionalGeneration"
    task = _task(loaded)
    ids = task.calib_ids[:2]
    inputs = task.model_inputs(ids)
    assert torch.equal(inputs["input_ids"], ids[:, :16])
    assert torch.equal(inputs["decoder_input_ids"][:, 0], torch.zeros(2, dtype=torch.long))  # T5 starts from pad
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, 16:-1])
    losses = task.token_losses(loaded.model, ids)
    assert losses.shape == (2, 16)  # one per target token
    logits = loaded.model(**inputs).logits
    expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 16:].flatten(), reduction="none").view(2, 16)
    assert torch.allclose(losses, expected, atol=1e-5)
    assert task.divergence(loaded.model, task.reference(loaded.model)) == 0.0
    assert torch.isclose(task.loss(loaded.model, ids), expected.mean(), atol=1e-5)
    with pytest.raises(mpq.MpqError, match="at least 4 tokens"):
        make_task(SEQ2SEQ_LM, loaded.tokenizer, calibration_text(None), 4, 2, decoder_start=0)


def test_the_trace_keeps_groups_within_a_block_and_names_each_stack(t5_dir):
    loaded = load_model(str(t5_dir))
    task = _task(loaded)
    graph = trace_model(loaded.model, task.model_inputs(task.calib_ids[:1, :16]))
    assert graph.method == "export" and graph.warning is None
    groups = graph.shared_input_groups()
    # the decoder's blocks all read the encoder's output, but each block's k and v are a group of their own
    assert ["decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.0.layer.1.EncDecAttention.v"] in groups
    assert ["decoder.block.1.layer.1.EncDecAttention.k", "decoder.block.1.layer.1.EncDecAttention.v"] in groups
    assert all(len({name.split(".layer.")[0] for name in group}) == 1 for group in groups)
    kinds = {layer.name: layer.kind for layer in graph.layers}
    assert kinds["encoder.block.0.layer.0.SelfAttention.q"] == "encoder.layer.0.SelfAttention.q"
    assert kinds["decoder.block.0.layer.0.SelfAttention.q"] == "decoder.layer.0.SelfAttention.q"
    assert kinds["lm_head"] == "lm_head"
    head = next(layer for layer in graph.layers if layer.name == "lm_head")
    assert head.tied_table == "shared"
    assert table_aliases(loaded.model, "shared") == ["encoder.embed_tokens", "decoder.embed_tokens"]
    # two stacks of blocks, walked one after the other by mpq.blockwise
    assert [name for name, _ in named_block_lists(loaded.model)] == ["encoder.block", "decoder.block"]


def test_a_quantised_table_is_looked_up_under_every_path_that_shares_its_weight(bart_dir):
    loaded = load_model(str(bart_dir))
    model = loaded.model
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(1))
    original = model(input_ids=ids, decoder_input_ids=ids).logits
    plan = {"lm_head": mpq.get_format("int4-g64")}
    with applied(model, plan, QuantizedWeightCache(model)):
        tables = {model.model.shared, model.model.encoder.embed_tokens, model.model.decoder.embed_tokens}
        assert len(tables) == 1 and isinstance(next(iter(tables)), TiedEmbedding)
        quantised = model(input_ids=ids, decoder_input_ids=ids).logits
        # the lookups read the int4 rows: the encoder's first activations differ from the original's
        rows = model.model.encoder.embed_tokens(ids)
    assert type(model.model.encoder.embed_tokens).__name__ == "BartScaledWordEmbedding"  # put back
    plain = model.model.encoder.embed_tokens(ids)
    assert not torch.equal(rows, plain) and F.cosine_similarity(rows.flatten(), plain.flatten(), dim=0) > 0.98
    assert not torch.equal(quantised, original)


def test_a_decode_step_runs_no_encoder_layer_nor_the_cached_cross_attention(t5_dir):
    loaded = load_model(str(t5_dir))
    names = [layer.name for layer in trace_model(loaded.model, {"input_ids": torch.ones(1, 8, dtype=torch.long),
                                                                "decoder_input_ids": torch.ones(1, 8, dtype=torch.long),
                                                                "use_cache": False}).layers]
    decode = calls_per_step(loaded.model, SEQ2SEQ_LM, Regime("decode", 1, 16), names)
    never = {name for name, count in decode.items() if count == 0}
    assert never == {n for n in names if n.startswith("encoder.") or "EncDecAttention.k" in n or "EncDecAttention.v" in n}
    assert all(count == 1 for name, count in decode.items() if name not in never)
    prefill = calls_per_step(loaded.model, SEQ2SEQ_LM, Regime("prefill", 1, 16), names)
    assert set(prefill.values()) == {1}
    assert make_regime(None, 1, 16, SEQ2SEQ_LM).kind == "decode"


@pytest.mark.slow
def test_a_compiled_t5_loads_back_at_the_bytes_predicted_and_decodes(t5_dir, tmp_path):
    out = tmp_path / "out"
    result = compile_model(CompileOptions(model=str(t5_dir), max_mem="1MB", out=out, samples=4, seq_len=32,
                                          trials=20, max_configs=2, length=16, progress=False))
    latency = json.loads((out / "latency.json").read_text())
    assert latency["regime"]["kind"] == "decode"
    assert latency["calls"]["encoder.block.0.layer.0.SelfAttention.q"] == 0.0
    assert "decoder.block.0.layer.0.SelfAttention.q" not in latency["calls"]  # once a step
    loaded = load_model(str(t5_dir))
    ids = torch.randint(0, 4000, (1, 10), generator=torch.Generator().manual_seed(2))
    original = loaded.model(input_ids=ids, decoder_input_ids=ids).logits
    for config in result["configs"]:
        folder = out / "configs" / config["name"]
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["task"] == SEQ2SEQ_LM
        assert manifest["table_aliases"] == {"shared": ["encoder.embed_tokens", "decoder.embed_tokens"]}
        model = mpq.load(folder)
        assert resident_bytes(model) == manifest["card"]["bytes"]["predicted"]
        assert model.encoder.embed_tokens is model.shared is model.decoder.embed_tokens
        logits = model(input_ids=ids, decoder_input_ids=ids).logits
        assert F.cosine_similarity(logits.flatten(), original.flatten(), dim=0) > 0.99
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, 5)


def test_a_bart_compiles_with_gptq(bart_dir, tmp_path):
    out = tmp_path / "out"
    result = compile_model(CompileOptions(model=str(bart_dir), max_mem="1MB", out=out, samples=4, seq_len=32,
                                          trials=10, max_configs=1, method="gptq", latency=False, progress=False))
    folder = out / "configs" / result["configs"][0]["name"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["table_aliases"] == {"model.shared": ["model.encoder.embed_tokens", "model.decoder.embed_tokens"]}
    model = mpq.load(folder)
    assert resident_bytes(model) == manifest["card"]["bytes"]["predicted"]
    evaluation = evaluate_config(folder, with_speed=True)
    assert evaluation["quality"]["ppl"] > 1 and evaluation["speed"]["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_layers_fed_the_whole_model_have_their_statistics_gathered_in_passes_under_a_bound(monkeypatch):
    """Fed whole (as a model without block lists is, or the blocks after a walk found a channel
    between them), demo-t5's layers are split into passes whose statistics stay under the bound,
    with each shared-input group in one pass; every statistic, and so every GPTQ and AWQ tensor, is
    what one pass over all the layers gives."""
    from mpq import blockwise
    from mpq.methods import calibrated_tensors

    monkeypatch.setattr(blockwise, "named_block_lists", lambda model: [])  # no blocks to walk

    loaded = load_model("demo-t5")
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 4, 32,
                     decoder_start=decoder_start_of(loaded.model))
    graph = trace_model(loaded.model, task.model_inputs(task.calib_ids[:1]))
    groups = graph.shared_input_groups()
    inputs = {layer.name: layer.in_features for layer in graph.layers}
    (whole,) = list(blockwise.calibrate_blockwise(loaded.model, graph.layers, groups, task))
    bound = 3 * max((k * k + k) * 4 for k in inputs.values())
    passes = list(blockwise.calibrate_blockwise(loaded.model, graph.layers, groups, task, stats_bytes=bound))
    assert len(passes) >= 4 and passes[1].name == f"model, pass 2 of {len(passes)}"
    assert sorted(n for p in passes for n in p.layers) == sorted(whole.layers)
    for calibration in passes:
        distinct = {id(h): calibration.stats.hessian[n].shape[0] for n, h in calibration.stats.hessian.items()}
        assert sum((k * k + k) * 4 for k in distinct.values()) <= bound
        assert all(set(g) <= set(calibration.layers) for g in groups if g[0] in calibration.layers)
        assert all(torch.equal(calibration.stats.hessian[n], whole.stats.hessian[n]) for n in calibration.layers)
        assert all(torch.equal(calibration.stats.absmean[n], whole.stats.absmean[n]) for n in calibration.layers)
    fmt = mpq.get_format("int4-g32")
    for method in ("gptq", "awq"):
        monkeypatch.setattr(blockwise, "STATS_PASS_BYTES", 2**40)
        one = calibrated_tensors(method, loaded.model, graph.layers, groups, [fmt], task).tensors
        monkeypatch.setattr(blockwise, "STATS_PASS_BYTES", bound)
        split = calibrated_tensors(method, loaded.model, graph.layers, groups, [fmt], task).tensors
        assert one.keys() == split.keys() and len(one) == len(whole.layers)
        assert all(torch.equal(one[key][t], split[key][t]) for key in one for t in one[key])


@pytest.fixture
def led_dir(tmp_path, demo_tokenizer):
    from transformers import LEDConfig, LEDForConditionalGeneration

    torch.manual_seed(0)
    config = LEDConfig(vocab_size=len(demo_tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                       max_encoder_position_embeddings=256, max_decoder_position_embeddings=256, attention_window=8,
                       pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    path = tmp_path / "led"
    LEDForConditionalGeneration(config).eval().save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


def test_layers_the_calibration_never_runs_are_rounded_to_nearest_with_a_warning(led_dir, caplog):
    """LED's encoder runs its global-attention projections only for tokens given global attention,
    which calibration text has none of: GPTQ knows nothing of their inputs and rounds them to
    nearest (it raised before), saying so; every other layer is GPTQ's own."""
    from mpq.methods import calibrated_tensors
    from mpq.quantize import quantize_weight

    loaded = load_model(str(led_dir))
    task = _task(loaded)
    graph = trace_model(loaded.model, task.model_inputs(task.calib_ids[:1]))
    never = [layer.name for layer in graph.layers if layer.name.endswith("_global")]
    assert len(never) == 6  # query/key/value_global in each of 2 encoder blocks
    fmt = mpq.get_format("int4-g32")
    with caplog.at_level("WARNING", logger="mpq.methods"):
        calibrated = calibrated_tensors("gptq", loaded.model, graph.layers, graph.shared_input_groups(), [fmt], task)
    assert any(f"never ran {name} and 5 more layers" in caplog.text for name in never)
    assert sorted(calibrated.never_ran) == sorted(never)
    tensors = calibrated.tensors
    for name in never:
        rtn = quantize_weight(loaded.model.get_submodule(name).weight, fmt)
        assert all(torch.equal(tensors[(name, fmt.name)][key], rtn[key]) for key in rtn)
    ran = "led.encoder.layers.0.self_attn.longformer_self_attn.query"
    rtn = quantize_weight(loaded.model.get_submodule(ran).weight, fmt)
    assert not torch.equal(tensors[(ran, fmt.name)]["qweight"], rtn["qweight"])


def test_the_card_names_the_layers_rounded_to_nearest_because_the_calibration_never_ran_them(led_dir, tmp_path):
    """The compile's warning is not the only record: the summary, the report and each card say
    which layers the calibration never ran (their sensitivity, 0, measured nothing) and which of
    them GPTQ rounded to nearest; a card lists only those its own plan calibrates."""
    out = tmp_path / "out"
    result = compile_model(CompileOptions(model=str(led_dir), max_mem="1MB", out=out, samples=4, seq_len=32,
                                          trials=10, max_configs=1, method="gptq", latency=False, progress=False))
    never = sorted(result["calibration_never_ran"])
    assert len(never) == 6 and all(name.endswith("_global") for name in never)
    assert sorted(result["never_ran"]) == never  # seen in the reference pass as in the calibration
    report = (out / "report.md").read_text()
    assert f"never ran 6 layer(s) (`{result['never_ran'][0]}` and 5 more): their sensitivity reads 0" in report
    assert "gptq/awq rounded them to nearest" in report
    sensitivities = json.loads((out / "sensitivity.json").read_text())["values"]
    assert all(value == 0 for name in never for value in sensitivities[name].values())
    for config in result["configs"]:
        manifest = json.loads((out / "configs" / config["name"] / MANIFEST).read_text())
        quantised = [name for name in never if manifest["plan"]["formats"][name] != "fp16"]
        assert quantised, "the 1MB budget quantises them"
        why = ": rtn, as the calibration data never ran them (nothing is known of their inputs)"
        named = [part for part in manifest["card"]["method"].split("; ") if part.endswith(why)]
        assert len(named) == 1 and sorted(named[0].removesuffix(why).split(", ")) == quantised
        card = (out / "configs" / config["name"] / "card.md").read_text()
        assert "rtn, as the calibration data never ran them" in card
        assert manifest["card"]["never_ran"] == {name: manifest["plan"]["formats"][name] for name in never}
        assert "| never ran on the calibration data | " in card
        assert "never ran on the calibration data (sensitivity unmeasured): " in describe(out / "configs" / config["name"])


def test_sensitivity_replays_the_encoder_for_decoder_layers_bit_identically(t5_dir):
    """Block replay runs over both stacks end to end: a decoder layer's passes run no encoder block
    (the encoder hands over its recorded output) and no decoder block before its own, and the
    table is a full pass's, bit for bit."""
    import mpq.sensitivity as sensitivity

    loaded = load_model(str(t5_dir))
    task = _task(loaded)
    graph = trace_model(loaded.model, task.model_inputs(task.calib_ids[:1]))
    formats = [mpq.get_format(name) for name in ("int8", "int4-g32")]
    work = sensitivity.measurement_model(loaded.model)
    cache = QuantizedWeightCache(loaded.model)
    ran: list[str] = []  # the blocks that ran, as they ran
    for stack in ("encoder", "decoder"):
        for index, block in enumerate(work.get_submodule(stack).block):
            block.layer[0].register_forward_pre_hook(lambda module, args, name=f"{stack}.{index}": ran.append(name))
    measured = {}
    for replay_blocks in (True, False):
        ran.clear()
        measured[replay_blocks] = sensitivity.measure_sensitivity(loaded.model, work, graph.layers, formats, task, "k",
                                                                  {}, cache, False, replay_blocks=replay_blocks)
        measured[replay_blocks] = (measured[replay_blocks].values, len(ran))
    (replayed, replayed_runs), (full, full_runs) = measured[True], measured[False]
    assert replayed == full and sum(v > 0 for per in full.values() for v in per.values()) > len(full)
    assert replayed_runs < 0.65 * full_runs  # 163 of 268 here; with only the decoder's blocks replayed, 254
