"""Does a config loaded on a device run mpq's kernels there, and agree with the reference?

The answer `mpq inspect CONFIG --check --device cuda` prints and `benchmarks/gpu_kernels.py` records:
which kernel runs each quantised layer, which fell back to the dequantise reference, and the
relative error of the outputs against the same config run by the reference on the CPU, once for
a prompt (prefill: M = the prompt's tokens) and once for one token (decode: M = 1), since the
kernels take a different code path for each: Triton's GEMV and tiled GEMM, and on the CPU torch's
kernel and the float32 tiles (mpq.kernels.cpu), which a 128-token prompt reaches.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from mpq.checkpoint import kernels_of, load

FALLBACK = "reference"  # how a layer's kernel name starts when no faster kernel took it


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden states of an encoder, as float32 on the CPU (a seq2seq
    LM's decoder reads the same ids as its encoder)."""
    kwargs = {"use_cache": False} if model.can_generate() else {}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    tensor = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return tensor.float().cpu()


def check_on_device(folder: str | Path, device: str = "cuda", backend: str | None = None, tokens: int = 128,
                    seed: int = 0) -> dict:
    """Load `folder` on `device` (its kernels chosen as a user's load would, or `backend`) and
    compare it with the reference on the CPU on random token ids (fixed by `seed`)."""
    folder = Path(folder)
    reference = load(folder, backend="reference")
    model = load(folder, backend=backend, device=device)
    kernels = kernels_of(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, reference.config.vocab_size, (1, tokens), generator=generator)
    rel_err = {}
    for regime, batch in (("prefill", ids), ("decode", ids[:, :1])):
        expected = model_output(reference, batch)
        got = model_output(model, batch.to(device))
        rel_err[regime] = ((got - expected).norm() / expected.norm()).item()
    return {"config": folder.name, "device": str(device), "layers": len(kernels),
            "kernels": dict(Counter(kernels.values())),
            "fallback_layers": sorted(name for name, kernel in kernels.items() if kernel.startswith(FALLBACK)),
            "rel_err": rel_err}


def describe_check(result: dict) -> str:
    """The check as lines for a terminal."""
    lines = [f"{result['config']} on {result['device']}: {result['layers']} quantised layers"]
    lines += [f"  {count:>3} x {kernel}" for kernel, count in sorted(result["kernels"].items())]
    if result["fallback_layers"]:
        lines.append(f"  on the reference path: {', '.join(result['fallback_layers'])}")
    lines.append("  relative error to the CPU reference: "
                 + ", ".join(f"{regime} {err:.2e}" for regime, err in result["rel_err"].items()))
    return "\n".join(lines)
