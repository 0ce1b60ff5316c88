"""`mpq eval CONFIG`: held-out quality, resident bytes and speed on this machine.

The same functions measure every contender (configs, uniform configs, the original model), so
their numbers compare.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from mpq.checkpoint import kernels_of, load, read_manifest
from mpq.environment import hardware
from mpq.memory import resident_bytes
from mpq.models import CAUSAL_LM, load_model
from mpq.tasks import make_task, model_device

PREFILL_TOKENS = 256
DECODE_PROMPT, DECODE_TOKENS = 32, 32


def _median_seconds(fn, repeats: int = 9) -> float:
    fn()  # warm-up: kernel layout caches, autotuning, allocator
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def speed(model: nn.Module, task_kind: str, task) -> dict[str, float]:
    """Causal LM: prefill and greedy-decode tokens/s at batch 1. Encoder: sentences/s."""
    if task_kind == CAUSAL_LM:
        ids = task.heldout["text"][:1, :PREFILL_TOKENS].to(model_device(model))
        prefill = _median_seconds(lambda: model(input_ids=ids, use_cache=False))
        prompt = ids[:, :DECODE_PROMPT]

        def decode() -> None:
            out = model(input_ids=prompt, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(DECODE_TOKENS):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        total = _median_seconds(decode, repeats=7)
        return {"prefill_tokens_per_s": ids.shape[1] / prefill, "decode_tokens_per_s": DECODE_TOKENS / total}
    batches = task.heldout_batches
    seconds = _median_seconds(lambda: task.embeddings(model, batches), repeats=5)
    return {"sentences_per_s": sum(b["input_ids"].shape[0] for b in batches) / seconds}


def evaluate_model(model: nn.Module, task_kind: str, task, with_speed: bool = True) -> dict:
    out = {"bytes": resident_bytes(model), "quality": task.evaluate(model)}
    if with_speed:
        out["speed"] = speed(model, task_kind, task)
    return out


def evaluate_config(folder: str | Path, device: str = "cpu") -> dict:
    manifest = read_manifest(Path(folder))
    model = load(folder, device=device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = make_task(manifest["task"], tokenizer, None)
    if manifest["task"] != CAUSAL_LM:  # fidelity is measured against the original model
        task.prepare_eval(load_model(manifest["card"]["model"]).model)
    result = evaluate_model(model, manifest["task"], task)
    result["predicted_bytes"] = manifest["card"]["bytes"]["predicted"]
    result["hardware"] = hardware()
    result["kernels"] = sorted(set(kernels_of(model).values()))
    return result
