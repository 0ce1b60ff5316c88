"""Image-and-text checkpoints (Llama 4, Gemma 3 and 4, Mistral 3: saved as ...ForConditionalGeneration,
not encoder-decoders) are causal LMs to mpq: it compiles their language model on text, and the
vision tower, which text never runs, stays as stored."""

import json
import logging

import pytest
import torch
import transformers

import mpq
from mpq.cli import main
from mpq.models import CAUSAL_LM, ENCODER, load_model, task_of

SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32)


def _save(model, path, tokenizer):
    model.eval().to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _gemma4(vocab: int):
    text = dict(SMALL_TEXT, vocab_size=vocab, sliding_window=16, hidden_size_per_layer_input=16, vocab_size_per_layer_input=vocab,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    return transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(text_config=text, vision_config=vision,
                                                                                 audio_config=None))


def test_an_image_text_checkpoint_loads_as_a_causal_lm(tmp_path, demo_tokenizer, capfd, caplog):
    """Llama 4 has a causal-LM class, which loads its language model alone (the vision weights it
    leaves are one log line, not transformers' table of every key); Mistral 3 has none, so it loads
    whole, as an image-text-to-text model whose forward takes text alone. Either way the logits are
    the whole model's on text. An encoder (BERT) stays an encoder."""
    vocab = len(demo_tokenizer)
    llama4 = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(
        text_config=dict(SMALL_TEXT, vocab_size=vocab, intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0, layer_types=["chunked_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                           patch_size=16, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)))
    mistral3 = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=dict(SMALL_TEXT, vocab_size=vocab),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                           image_size=32, patch_size=16)))
    ids = torch.randint(0, vocab, (1, 10))
    for model, loaded_as in [(llama4, "Llama4ForCausalLM"), (mistral3, "Mistral3ForConditionalGeneration")]:
        path = _save(model, tmp_path / type(model).__name__, demo_tokenizer)
        assert task_of(transformers.AutoConfig.from_pretrained(path)) == CAUSAL_LM
        capfd.readouterr()
        with caplog.at_level(logging.INFO, logger="mpq.models"):
            loaded = load_model(str(path), torch.float32)
        assert "LOAD REPORT" not in capfd.readouterr().err
        assert loaded.task == CAUSAL_LM and type(loaded.model).__name__ == loaded_as
        # what the card and the report say was compiled, where it is not the whole checkpoint
        assert loaded.part == (None if loaded_as == type(model).__name__ else
                               "Llama4ForCausalLM, the language model of Llama4ForConditionalGeneration: "
                               "its vision model is not in the configs")
        # the whole image-text model as transformers loads it (Llama 4's experts, routed on load, sum in another order)
        whole = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        assert type(whole) is type(model)
        want = whole(input_ids=ids).logits
        assert (loaded.model(input_ids=ids).logits - want).abs().max() <= 1e-5 * want.abs().max()
    assert any("not part of its loaded Llama4ForCausalLM (first: multi_modal_projector" in record.message
               for record in caplog.records)
    bert = transformers.BertConfig(architectures=["BertModel"])
    assert task_of(bert) == ENCODER


@pytest.mark.slow
def test_an_image_text_model_compiles_its_language_model_on_text(tmp_path, demo_tokenizer):
    """Gemma 4's image-and-text forward reads a row of its (quantised, tied) input table, its
    per-layer table is a layer, and its sliding-window layers are timed past their window: the
    compile runs with the latency model, and the config loads back and generates."""
    path = _save(_gemma4(len(demo_tokenizer)), tmp_path / "gemma4", demo_tokenizer)
    out = tmp_path / "out"
    # --keep vision_tower asks for what holds anyway: not an error
    assert main(["compile", str(path), "-q", "--samples", "4", "--seq-len", "32", "--trials", "10", "--refine", "0",
                 "--max-configs", "1", "--keep", "vision_tower", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = out / "configs" / summary["configs"][0]["name"]
    manifest = json.loads((config / "mpq.json").read_text())
    formats = manifest["plan"]["formats"]
    assert "model.language_model.embed_tokens_per_layer" in formats and "lm_head" in formats
    assert not [name for name in formats if "vision" in name]  # text never runs the vision tower
    assert manifest["card"]["excluded_layers"]["model.vision_tower"] == (
        "not in the traced forward on the example inputs (text): its 8 linear layers kept as stored")
    assert "model.vision_tower" in (out / "report.md").read_text()  # named among the bytes kept as stored
    model = mpq.load(config)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
