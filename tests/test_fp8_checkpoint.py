"""FP8 checkpoints (DeepSeek-V3 and later, Kimi K2, MiniMax-M2, Qwen3's -FP8: float8 e4m3 weights with
a scale per block, `quant_method: fp8`) are the model as released: mpq dequantises them on load,
exactly, and quantises from there; the card says so, and the configs it emits hold no FP8 setting."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mpq
from mpq.cli import main
from mpq.errors import MpqError
from mpq.models import load_model

BLOCK = 32


def _fp8_copy(folder, tmp_path):
    """The tiny Llama as DeepSeek releases its weights: each projection's weight in float8 e4m3, with
    `weight_scale_inv` per 32x32 block (the block's largest magnitude over 448, e4m3's largest)."""
    out = tmp_path / "fp8"
    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    for name in [name for name in tensors if name.endswith("proj.weight")]:
        weight = tensors[name].float()
        rows, cols = weight.shape
        blocks = weight.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0
        tensors[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale_inv")] = scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (out / "config.json").write_text(json.dumps(config))
    return out, tensors


def test_an_fp8_checkpoint_loads_dequantised_exactly_and_compiles(tiny_llama_dir, tmp_path):
    pytest.importorskip("accelerate")
    folder, tensors = _fp8_copy(tiny_llama_dir, tmp_path)
    loaded = load_model(str(folder))
    name = "model.layers.1.mlp.down_proj"
    weight = loaded.model.get_submodule(name).weight
    scale = tensors[f"{name}.weight_scale_inv"].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    assert type(loaded.model.get_submodule(name)) is torch.nn.Linear and weight.dtype == torch.bfloat16
    assert torch.equal(weight, (tensors[f"{name}.weight"].float() * scale).to(torch.bfloat16))
    assert loaded.stored_as == "FP8 (e4m3, a scale per 32x32 block) in the checkpoint, dequantised on load (exact)"

    out = tmp_path / "out"
    assert main(["compile", str(folder), "-q", "--samples", "4", "--seq-len", "32", "--trials", "10", "--refine", "0",
                 "--max-configs", "1", "--no-latency", "-o", str(out)]) == 0
    config = out / "configs" / json.loads((out / "summary.json").read_text())["configs"][0]["name"]
    assert "quantization_config" not in json.loads((config / "config.json").read_text())
    assert "| weights as released | FP8 (e4m3, a scale per 32x32 block)" in (config / "card.md").read_text()
    assert "- weights as released: FP8 (e4m3, a scale per 32x32 block)" in (out / "report.md").read_text()
    assert mpq.load(config).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_an_fp8_checkpoint_without_accelerate_says_what_to_install(tiny_llama_dir, tmp_path, monkeypatch):
    import importlib.util

    folder, _ = _fp8_copy(tiny_llama_dir, tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    with pytest.raises(MpqError, match=r"stores its weights in FP8.*pip install 'mpq-compiler\[fp8\]'"):
        load_model(str(folder))


def test_an_fp8_mixture_loads_each_expert_dequantised_then_routed(tmp_path, demo_tokenizer):
    """DeepSeek-V3 as released: every projection in FP8, each expert's its own; transformers
    dequantises them before stacking the experts, and mpq.experts then splits them into layers:
    each expert's gate rows are its dequantised gate_proj, exactly."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=len(demo_tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1,
                              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_group=1, topk_group=1,
                              kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
                              pad_token_id=0, bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "deepseek")
    demo_tokenizer.save_pretrained(tmp_path / "deepseek")
    folder, tensors = _fp8_copy(tmp_path / "deepseek", tmp_path)
    assert "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv" in tensors  # stored per expert
    loaded = load_model(str(folder))
    mixture = loaded.model.get_submodule("model.layers.1.mlp.experts")
    assert type(mixture).__name__ == "RoutedExperts" and not loaded.unrouted
    gate = "model.layers.1.mlp.experts.2.gate_proj"
    scale = tensors[f"{gate}.weight_scale_inv"].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    assert torch.equal(mixture.expert(2).gate_up_proj.weight[:64], (tensors[f"{gate}.weight"].float() * scale).to(torch.bfloat16))
