"""`mpq eval CONFIG|MODEL`: held-out quality, resident bytes, peak memory and speed on this machine.

The same functions measure every contender (configs, uniform configs, the original model), so
their numbers compare.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch
from torch import nn

from mpq.checkpoint import kernels_of, load, read_manifest
from mpq.cpu_matmul import describe as describe_matmuls
from mpq.environment import hardware
from mpq.kv_cache import encode, forward_with_cache
from mpq.memory import resident_bytes
from mpq.models import GENERATIVE, SEQ2SEQ_LM, decoder_start_of, load_model, model_device
from mpq.tasks import make_task

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
    """Causal and seq2seq LM: prefill and greedy-decode tokens/s at batch 1 (a seq2seq LM's prefill
    is its task's forward over a window, source and target; its decode encodes the prompt as the
    source once, then decodes from the start token). Encoder: sentences/s."""
    if task_kind in GENERATIVE:
        ids = task.heldout["text"][:1, :PREFILL_TOKENS]
        inputs = task.inputs_on(model, ids)
        prefill = _median_seconds(lambda: model(**inputs))
        prompt = ids[:, :DECODE_PROMPT].to(model_device(model))

        def decode() -> None:
            encoded, first = None, prompt
            if task_kind == SEQ2SEQ_LM:
                encoded, first = encode(model, prompt), prompt.new_full((1, 1), task.decoder_start)
            out, past = forward_with_cache(model, first, encoder_outputs=encoded)
            for _ in range(DECODE_TOKENS):
                out, past = forward_with_cache(model, out.logits[:, -1:].argmax(-1), past, encoder_outputs=encoded)

        total = _median_seconds(decode, repeats=7)
        return {"prefill_tokens_per_s": ids.shape[1] / prefill, "decode_tokens_per_s": DECODE_TOKENS / total}
    device = model_device(model)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in task.heldout_batches]
    # The plain forward, not task.embeddings: quality passes may route 16-bit products through
    # float32 (mpq.cpu_matmul), and speed is what the user's runtime does.
    seconds = _median_seconds(lambda: [model(**batch) for batch in batches], repeats=5)
    return {"sentences_per_s": sum(b["input_ids"].shape[0] for b in batches) / seconds}


class PeakMemory:
    """The process's peak resident set size (RSS) while the block runs, sampled every few ms by a
    thread (/proc/self/statm): with `mpq eval` in its own process, what loading and running the
    model takes, activations and kernels' scratch included, beyond the weights' own bytes. Within
    a longer process it includes whatever else the process holds. Linux only; else None.

    `peak_anonymous` is the peak of the part no file backs (RSS less file-mapped and shared pages):
    what must fit in RAM, as the kernel can drop a mapped file's clean pages and read them again
    (a safetensors checkpoint that torch maps, mpq.spill's tensors)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak: int | None = None
        self.peak_anonymous: int | None = None
        self._stop = threading.Event()

    @staticmethod
    def _pages() -> tuple[int, int] | None:
        """(resident, of it file-backed or shared) bytes, from /proc/self/statm."""
        try:
            with open("/proc/self/statm") as handle:
                fields = handle.read().split()
            page = os.sysconf("SC_PAGE_SIZE")
            return int(fields[1]) * page, int(fields[2]) * page
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def rss() -> int | None:
        pages = PeakMemory._pages()
        return None if pages is None else pages[0]

    def _update(self) -> tuple[int, int] | None:
        pages = self._pages()
        if pages is not None:
            self.peak = max(self.peak or 0, pages[0])
            self.peak_anonymous = max(self.peak_anonymous or 0, pages[0] - pages[1])
        return pages

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def __enter__(self) -> "PeakMemory":
        self._update()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update()

    def take(self) -> tuple[int | None, int | None]:
        """(peak RSS, peak anonymous) since the block began or the last take; the next take counts from now."""
        pages = self._update()
        peaks = (self.peak, self.peak_anonymous)
        self.peak, self.peak_anonymous = (None, None) if pages is None else (pages[0], pages[0] - pages[1])
        return peaks


def evaluate_model(model: nn.Module, task_kind: str, task, with_speed: bool = True) -> dict:
    """Every contender's numbers, by the same code: resident weight bytes, held-out quality, peak
    process memory while evaluating, and (optionally) speed on this machine."""
    with PeakMemory() as memory:
        out = {"bytes": resident_bytes(model), "quality": task.evaluate(model)}
        if with_speed:
            out["speed"] = speed(model, task_kind, task)
    out["peak_rss_bytes"] = memory.peak
    return out


def evaluate_config(folder: str | Path, device: str = "cpu", eval_data: str = "both", with_speed: bool = True,
                    split: str = "test") -> dict:
    """`mpq eval CONFIG`: an mpq config folder, loaded with mpq's kernels for `device`."""
    manifest = read_manifest(Path(folder))
    model = load(folder, device=device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = make_task(manifest["task"], tokenizer, None, target=eval_data, split=split, decoder_start=decoder_start_of(model))
    if manifest["task"] not in GENERATIVE:  # fidelity is measured against the original model
        task.prepare_eval(load_model(manifest["card"]["model"]).model)
    result = {"contender": f"mpq config {Path(folder).name}", **evaluate_model(model, manifest["task"], task, with_speed)}
    result["predicted_bytes"] = manifest["card"]["bytes"]["predicted"]
    result["hardware"] = hardware()
    result["quality_matmuls"] = describe_matmuls()
    result["kernels"] = sorted(set(kernels_of(model).values()))
    return result


def evaluate_original(name: str, dtype: str | None = None, bnb: str | None = None, device: str = "cpu",
                      eval_data: str = "both", with_speed: bool = True, split: str = "test") -> dict:
    """`mpq eval MODEL`: a plain model (a demo, folder or id) in a dtype, or quantised by bitsandbytes."""
    from mpq.contenders import load_original

    loaded = load_original(name, dtype, bnb, device)
    task = make_task(loaded.task, loaded.tokenizer, None, target=eval_data, split=split,
                     decoder_start=decoder_start_of(loaded.model))
    if loaded.task not in GENERATIVE:
        task.prepare_eval(load_model(name).model)
    what = f"bitsandbytes {bnb}" if bnb else (dtype or "as stored")
    result = {"contender": f"{name} ({what})", **evaluate_model(loaded.model, loaded.task, task, with_speed)}
    result["hardware"] = hardware()
    result["quality_matmuls"] = describe_matmuls()
    return result
