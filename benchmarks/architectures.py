"""Which Hugging Face architectures mpq takes, and how much of each it can shrink.

For each causal-LM and encoder-decoder architecture below, a 2-block model (2 + 2 for an
encoder-decoder) with random weights (hidden 128, the demo's 4096-token vocabulary): trace it,
count the layers found and the bytes no format can shrink (mpq.memory.kept_as_stored: norms,
biases, a mixture of experts' 3-D weights), quantise every layer at int8 (`--format`), save the
config, load it back, and check that the loaded model's logits equal those of the model it was
saved from, that it holds the bytes the memory model predicted, that its logits stay close to the
unquantised model's (cosine), that it generates, and that the float32 twin sensitivities are
measured in (mpq.float_twin, whose blocks upcast the model's own tensors while they run) gives
exactly a whole float32 copy's logits, and that GPTQ/AWQ's calibration (mpq.blockwise, which walks
the blocks one at a time) gathers exactly the input statistics of a whole float32 copy's single
pass. Where export works, the trace's fallback (hooks on an eager forward, for the models export
fails on) must find the same layers and shared-input groups. No timing: this is coverage, not speed.
Prints a table, writes JSON.

    python benchmarks/architectures.py                        # benchmarks/results/architectures.json
    python benchmarks/architectures.py --only falcon,gemma --out /tmp/architectures.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
VOCAB, HIDDEN = 4096, 128
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=256, max_position_embeddings=512)
# name -> (transformers config class, what it needs beyond COMMON)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, pad_token_id=0)),
    "phi": ("PhiConfig", dict()),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=32)),
    # sliding-window and global attention alternate, each block given its own mask (window 16 < the 64-token windows)
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=32, sliding_window=16)),
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=32, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"])),
    "granite": ("GraniteConfig", dict()),
    "olmo": ("OlmoConfig", dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "stablelm": ("StableLmConfig", dict(num_key_value_heads=4)),
    "starcoder2": ("Starcoder2Config", dict(num_key_value_heads=2)),
    "gpt2": ("GPT2Config", dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512)),
    "gpt_neox": ("GPTNeoXConfig", dict()),
    "gptj": ("GPTJConfig", dict(n_embd=HIDDEN, n_layer=2, n_head=4, rotary_dim=16)),
    "opt": ("OPTConfig", dict(ffn_dim=256, word_embed_proj_dim=HIDDEN)),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4)),
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    # mixtures of experts (mpq.experts: each expert's projections become layers)
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
                                         moe_intermediate_size=64, shared_expert_intermediate_size=128)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=2, head_dim=32,
                                         moe_intermediate_size=64)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=2, pad_token_id=0,
                                  bos_token_id=0, eos_token_id=0)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, head_dim=32,
                                     sliding_window=16,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
# architectures of 2025-2026 (transformers >= 5.25): hybrid linear attention (Qwen3.5, Qwen3-Next, Kimi
# Linear, LFM2), multi-head latent attention (DeepSeek-V3, Kimi Linear, HY-V4), new mixtures, and model code
# that peeks at its layers' weights (Llama 4, HunYuan, HY-V4: mpq.packed_weight)
_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
_MLA = dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)
_LINEAR_ATTENTION = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                         layer_types=["linear_attention", "full_attention"])
_ROUTED = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_group=1, topk_group=1)
RECENT: dict[str, tuple[str, dict]] = {
    "llama4": ("Llama4TextConfig", dict(num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=1,
                                        intermediate_size_mlp=256, layer_types=["chunked_attention", "full_attention"], **_IDS)),
    "gemma4": ("Gemma4TextConfig", dict(num_key_value_heads=2, head_dim=32, sliding_window=16, vocab_size_per_layer_input=VOCAB,
                                        hidden_size_per_layer_input=16, layer_types=["sliding_attention", "full_attention"])),
    "gemma4_moe": ("Gemma4TextConfig", dict(num_key_value_heads=2, head_dim=32, sliding_window=16, vocab_size_per_layer_input=VOCAB,
                                            hidden_size_per_layer_input=16, layer_types=["sliding_attention", "full_attention"],
                                            enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=64)),
    "qwen3_5": ("Qwen3_5TextConfig", dict(num_key_value_heads=2, head_dim=32, **_LINEAR_ATTENTION, **_IDS)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=64, shared_expert_intermediate_size=64, **_LINEAR_ATTENTION, **_IDS)),
    "qwen3_next": ("Qwen3NextConfig", dict(num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=64, shared_expert_intermediate_size=64, **_LINEAR_ATTENTION, **_IDS)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1, **_ROUTED, **_MLA, **_IDS)),
    "glm4": ("Glm4Config", dict(num_key_value_heads=2, head_dim=32, **_IDS)),
    "glm4_moe": ("Glm4MoeConfig", dict(num_key_value_heads=2, n_shared_experts=1, first_k_dense_replace=1, **_ROUTED, **_IDS)),
    "minimax_m2": ("MiniMaxM2Config", dict(num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, **_IDS)),
    "kimi_linear": ("KimiLinearConfig", dict(num_key_value_heads=4, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=64, n_shared_experts=1, layer_types=["linear_attention", "full_attention"],
                                             mlp_layer_types=["dense", "sparse"], **_MLA, **_IDS)),
    "ministral3": ("Ministral3Config", dict(num_key_value_heads=2, head_dim=32, sliding_window=16, **_IDS)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(num_key_value_heads=2, head_dim=32, num_experts=4, moe_topk=2, **_IDS)),
    "hy_v4": ("HYV4Config", dict(num_key_value_heads=2, head_dim=32, n_shared_experts=1, index_head_dim=32, index_n_heads=2,
                                 index_topk=8, layer_types=["indexed_attention", "indexed_attention"], mlp_layer_types=["dense", "sparse"],
                                 **_ROUTED, **_MLA, **_IDS)),
    "cohere2": ("Cohere2Config", dict(num_key_value_heads=2, head_dim=32, sliding_window=16,
                                      layer_types=["sliding_attention", "full_attention"], **_IDS)),
    "olmo3": ("Olmo3Config", dict(num_key_value_heads=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"], **_IDS)),
    "smollm3": ("SmolLM3Config", dict(num_key_value_heads=2, **_IDS)),
    "exaone4": ("Exaone4Config", dict(num_key_value_heads=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"], **_IDS)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=64, **_IDS)),
    "seed_oss": ("SeedOssConfig", dict(num_key_value_heads=2, head_dim=32, **_IDS)),
    "lfm2": ("Lfm2Config", dict(num_key_value_heads=2, layer_types=["conv", "full_attention"], **_IDS)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", dict(num_key_value_heads=2, head_dim=32, v_head_dim=32, sliding_window=16,
                                                layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"],
                                                **{**_ROUTED, "n_group": 1}, **_IDS)),
}
# image-and-text models (...ForConditionalGeneration), compiled as causal LMs on text (mpq.models):
# name -> (model class, config class, config). Text never runs the vision tower: it is kept as stored.
_TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
IMAGE_TEXT: dict[str, tuple[str, str, dict]] = {
    "llama4-image-text": ("Llama4ForConditionalGeneration", "Llama4Config", dict(
        text_config=dict(_TEXT, head_dim=32, intermediate_size_mlp=256, num_local_experts=4, num_experts_per_tok=1,
                         layer_types=["chunked_attention", "full_attention"], **_IDS),
        vision_config=dict(_VISION, image_size=32, patch_size=16, vision_output_dim=64, projector_input_dim=64,
                           projector_output_dim=64))),
    "gemma3-image-text": ("Gemma3ForConditionalGeneration", "Gemma3Config", dict(
        text_config=dict(_TEXT, head_dim=32, sliding_window=16), vision_config=dict(_VISION, image_size=32, patch_size=16),
        mm_tokens_per_image=4)),
    "gemma4-image-text": ("Gemma4ForConditionalGeneration", "Gemma4Config", dict(
        text_config=dict(_TEXT, head_dim=32, sliding_window=16, hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(_VISION, num_key_value_heads=2, head_dim=16), audio_config=None)),
    "mistral3": ("Mistral3ForConditionalGeneration", "Mistral3Config", dict(
        text_config=dict(_TEXT, head_dim=32), vision_config=dict(_VISION, head_dim=16, image_size=32, patch_size=16))),
    "llava": ("LlavaForConditionalGeneration", "LlavaConfig", dict(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=dict(_VISION, model_type="clip_vision_model", image_size=32, patch_size=16))),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", dict(
        text_config=dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN))),
    "qwen3_5-image-text": ("Qwen3_5ForConditionalGeneration", "Qwen3_5Config", dict(
        text_config=dict(_TEXT, head_dim=32, **_LINEAR_ATTENTION, **_IDS),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN))),
    "qwen3_5_moe-image-text": ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig", dict(
        text_config=dict(_TEXT, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                         shared_expert_intermediate_size=64, **_LINEAR_ATTENTION, **_IDS),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN))),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", dict(
        text_config=dict(_TEXT, head_dim=32),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           deepstack_visual_indexes=[0]))),
}
# encoder-decoder LMs: their configs name the sizes their own way, so each gives them whole
_BART_LIKE = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
_T5_LIKE = dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=32, d_ff=256, num_layers=2, num_heads=4, pad_token_id=0,
                eos_token_id=0, decoder_start_token_id=0)
SEQ2SEQ: dict[str, tuple[str, dict]] = {
    "t5": ("T5Config", _T5_LIKE),
    "t5-gated": ("T5Config", {**_T5_LIKE, "feed_forward_proj": "gated-gelu"}),  # T5 v1.1's and Flan-T5's feed-forward
    "mt5": ("MT5Config", _T5_LIKE),
    "umt5": ("UMT5Config", _T5_LIKE),
    "longt5": ("LongT5Config", _T5_LIKE),
    "switch_transformers": ("SwitchTransformersConfig", {**_T5_LIKE, "num_decoder_layers": 2, "num_sparse_encoder_layers": 1,
                                                         "num_sparse_decoder_layers": 1, "num_experts": 4}),
    "bart": ("BartConfig", _BART_LIKE),
    "mbart": ("MBartConfig", _BART_LIKE),
    "plbart": ("PLBartConfig", _BART_LIKE),
    "pegasus": ("PegasusConfig", _BART_LIKE),
    "marian": ("MarianConfig", {**_BART_LIKE, "decoder_vocab_size": VOCAB}),
    "m2m_100": ("M2M100Config", _BART_LIKE),
    "blenderbot": ("BlenderbotConfig", _BART_LIKE),
    "led": ("LEDConfig", {**_BART_LIKE, "max_encoder_position_embeddings": 512, "max_decoder_position_embeddings": 512,
                          "attention_window": 8}),
}


def build(name: str, folder: Path):
    """The random 2-block model of `name`, saved to `folder` with the demo's tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from mpq.models import DEMO_DIR

    seq2seq = name in SEQ2SEQ
    torch.manual_seed(0)
    if name in IMAGE_TEXT:
        model_class, config_class, extra = IMAGE_TEXT[name]
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**extra))
    else:
        config_class, extra = SEQ2SEQ[name] if seq2seq else {**ARCHITECTURES, **RECENT}[name]
        config = getattr(transformers, config_class)(**(extra if seq2seq else {**COMMON, **extra}))
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config)
    model = model.eval().to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_DIR).save_pretrained(folder)
    return model


def check(name: str, fmt: str, work: Path) -> dict:
    import mpq
    from mpq.apply import QuantizedWeightCache, applied
    from mpq.checkpoint import kernels_of, save_config
    from mpq.experts import RoutedExperts
    from mpq.formats import get_format
    from mpq.memory import kept_as_stored, memory_model, resident_bytes
    from mpq.models import load_model
    from mpq.plan import Plan
    from mpq.trace import trace_model

    build(name, work / name)
    loaded = load_model(str(work / name))
    model = loaded.model
    ids = torch.randint(0, VOCAB, (1, 16))
    # an encoder-decoder's decoder reads the same ids (their values do not matter here)
    inputs = {"input_ids": ids, "use_cache": False, **({"decoder_input_ids": ids} if name in SEQ2SEQ else {})}
    short = {key: value[:, :8] if key != "use_cache" else value for key, value in inputs.items()}
    graph = trace_model(model, short)
    hooks = trace_model(model, short, capture="hooks")  # the fallback where export fails, checked against it
    kept = kept_as_stored(model, graph.layers)
    memory = memory_model(model, graph.layers, [get_format(fmt)])
    plan = Plan(formats={layer.name: fmt for layer in graph.layers}, model=str(work / name))
    original = model(**inputs).logits.float()
    with applied(model, plan.specs(), QuantizedWeightCache(model)) as tensors:
        quantised = model(**inputs).logits.float()
        save_config(work / f"{name}-cfg", model, loaded.tokenizer, loaded.task, plan, tensors, {"note": "benchmark"})
    twin_exact = _lazy_twin_is_exact(model, graph, inputs)
    restored = mpq.load(work / f"{name}-cfg")
    again = restored(**inputs).logits.float()
    generated = restored.generate(ids[:, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    tables = [layer for layer in graph.layers if layer.is_embedding or layer.tied_table]
    kernels = kernels_of(restored)
    return {
        "architecture": name, "model_class": type(model).__name__, "trace": graph.method,
        "layers": len(graph.layers), "shared_input_groups": len(graph.shared_input_groups()),
        # the same layers and shared inputs; the order may differ (Qwen2-MoE runs its routed experts
        # before its shared expert eagerly, after it in the exported graph)
        "hooks_agree": None if graph.method != "export" else (
            sorted(layer.name for layer in hooks.layers) == sorted(layer.name for layer in graph.layers)
            and sorted(hooks.shared_input_groups()) == sorted(graph.shared_input_groups())),
        "hooks_same_order": None if graph.method != "export" else (
            [layer.name for layer in hooks.layers] == [layer.name for layer in graph.layers]), "layer_types": sorted({layer.module_type for layer in graph.layers}),
        "table": ("tied to the head" if any(layer.tied_table for layer in tables) else "a layer") if tables else "kept",
        "table_kernel": kernels.get(tables[0].tied_table or tables[0].name) if tables else None,
        "excluded": {**graph.excluded, **loaded.unrouted},
        "routed_experts": sum(isinstance(m, RoutedExperts) for m in restored.modules()),
        "unquantised_bytes": resident_bytes(model), "smallest_bytes": memory.smallest(), "kept_bytes": memory.fixed_bytes,
        "kept_largest": kept[0].describe() if kept else None,
        "loaded_equals_saved": bool(torch.equal(again, quantised)),
        "bytes_as_predicted": resident_bytes(restored) == memory.total(plan.formats),
        "predicted_bytes": memory.total(plan.formats), "loaded_bytes": resident_bytes(restored),
        "cosine_to_unquantised": round(F.cosine_similarity(quantised.flatten(), original.flatten(), dim=0).item(), 6),
        # a causal LM continues its 4-token prompt; an encoder-decoder starts from its own token
        "generates": tuple(generated.shape) == ((1, 5) if name in SEQ2SEQ else (1, 8)),
        "float32_twin_exact": twin_exact,
        **_walk(loaded),
    }


@torch.no_grad()
def _walk(loaded) -> dict:
    """How GPTQ/AWQ's calibration reaches the layers (mpq.blockwise: block by block, or the whole
    model fed), and whether every statistic equals the one a whole float32 copy's single pass gives.
    64-token windows: past the 16-token sliding window of the architectures that alternate it."""
    from mpq.blockwise import calibrate_blockwise
    from mpq.calib_stats import StatsRecorder
    from mpq.float_twin import float32_twin
    from mpq.models import decoder_start_of
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    model = loaded.model
    extra = {"decoder_start": decoder_start_of(model)} if getattr(model.config, "is_encoder_decoder", False) else {}
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), 2, 64, **extra)
    graph = trace_model(model, task.model_inputs(task.calib_ids[:1, :16]))
    groups = graph.shared_input_groups()
    calibrations = list(calibrate_blockwise(model, graph.layers, groups, task))
    whole = float32_twin(model, lazy=False)
    names = [name for c in calibrations for name in c.layers]
    recorder = StatsRecorder({name: whole.get_submodule(name) for name in names},
                             {name: group[0] for group in groups for name in group})
    for batch in task.calibration_inputs():
        whole(**batch)
    expected = recorder.finish()
    walked = sum(c.judge is not None for c in calibrations)
    fed_whole = any(c.name == "model" or c.name.startswith("model, pass ") for c in calibrations)  # mpq.blockwise's fallback
    exact = all(torch.equal(c.stats.hessian[n], expected.hessian[n]) and torch.equal(c.stats.absmean[n], expected.absmean[n])
                for c in calibrations for n in c.layers)
    return {"calibration": f"{walked} blocks walked" + (" + whole-model passes" if fed_whole else ""),
            "calibration_exact": exact and sorted(names) == sorted(l.name for l in graph.layers if not l.is_embedding)}


@torch.no_grad()
def _lazy_twin_is_exact(model, graph, inputs: dict) -> bool:
    """Whether the twin that sensitivities are measured in, whose blocks upcast the model's own
    tensors while they run (mpq.float_twin), gives exactly the logits of a whole float32 copy: as
    it is, and with an attention projection of the last block at int4 (as a sensitivity pass runs
    it; an expert might get no token)."""
    from mpq.apply import QuantizedWeightCache, applied
    from mpq.formats import get_format
    from mpq.sensitivity import MEASURE_BACKEND, measurement_model

    layer = [layer for layer in graph.layers if "att" in layer.name.lower()][-1]
    cache, fmt = QuantizedWeightCache(model), get_format("int4-g32")
    logits = []
    for lazy in (False, True):
        twin = measurement_model(model, lazy)
        plain = twin(**inputs).logits
        with applied(twin, {layer.name: fmt}, cache, backend=MEASURE_BACKEND):
            logits.append((plain, twin(**inputs).logits))
    (full, full_q), (lazy, lazy_q) = logits
    return full.dtype == torch.float32 and torch.equal(full, lazy) and torch.equal(full_q, lazy_q) and not torch.equal(full, full_q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architectures (default: all)")
    parser.add_argument("--format", default="int8", help="the format every layer takes (default int8)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "architectures.json")
    args = parser.parse_args()
    known = [*ARCHITECTURES, *RECENT, *IMAGE_TEXT, *SEQ2SEQ]
    names = args.only.split(",") if args.only else known
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown architectures {unknown}: pick from {', '.join(known)}")
    from mpq.environment import hardware, versions
    from mpq.memory import format_size

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.time()
            try:
                row = check(name, args.format, Path(tmp))
            except Exception as exc:  # one architecture's failure is a row of the table, not the end of the run
                row = {"architecture": name, "error": f"{type(exc).__name__}: {exc}"[:300],
                       "traceback": traceback.format_exc()[-2000:]}
            row["seconds"] = round(time.time() - start, 2)
            rows.append(row)
    print(f"every layer at {args.format}; loaded = the loaded config's logits equal the saved model's")
    print("twin = the lazy float32 twin's logits (mpq.float_twin) equal a whole float32 copy's, plain and with a layer at int4")
    print("GPTQ/AWQ statistics = how mpq.blockwise reaches the layers, and whether every statistic equals a whole copy's")
    print("trace = torch.export, or hooks on an eager forward where export fails; groups = shared-input groups "
          "(hooks: whether the fallback, run anyway, finds the same layers and groups)")
    print("| architecture | trace | layers | groups | layer types | table | unquantised | smallest | kept as stored (largest) | loaded | "
          "bytes as predicted | cos | generates | twin | GPTQ/AWQ statistics |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['architecture']} | error: {row['error']} ||||||||||||||")
            continue
        agree = {None: "", True: " (hooks agree)", False: " (HOOKS DIFFER)"}[row["hooks_agree"]]
        print(f"| {row['architecture']} | {row['trace']} | {row['layers']} | {row['shared_input_groups']}{agree} | "
              f"{', '.join(row['layer_types'])} | {row['table']} | "
              f"{format_size(row['unquantised_bytes'])} | {format_size(row['smallest_bytes'])} | "
              f"{format_size(row['kept_bytes'])} ({row['kept_largest']}) | {'yes' if row['loaded_equals_saved'] else 'NO'} | "
              f"{'yes' if row['bytes_as_predicted'] else 'NO'} | "
              f"{row['cosine_to_unquantised']:.4f} | {'yes' if row['generates'] else 'NO'} | "
              f"{'yes' if row['float32_twin_exact'] else 'NO'} | "
              f"{row['calibration']}, {'exact' if row['calibration_exact'] else 'NOT EXACT'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hardware(), "versions": versions(), "format": args.format,
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    bad = [row["architecture"] for row in rows
           if "error" in row or not (row["loaded_equals_saved"] and row["bytes_as_predicted"] and row["generates"]
                                     and row["float32_twin_exact"] and row["calibration_exact"]
                                     and row["hooks_agree"] is not False)]
    if bad:
        raise SystemExit(f"failed: {', '.join(bad)}")


if __name__ == "__main__":
    main()
