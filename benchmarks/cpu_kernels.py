"""Where CPU layers should leave torch's kernels for float32 tiles (mpq.kernels.cpu).

For INT8 and INT4 layers of the demo's shapes and Llama-7B's, at token counts M from 1 to 2048:
torch's kernel (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) against a float32 matmul
over the same tensors dequantised one tile at a time; for a bf16 (fp16-format) layer, F.linear in
bf16 against the same float32 tiles of its weight (what a CPU with no bf16 GEMM runs from
DENSE_FLOAT32_FROM_TOKENS). For each, the M from which the tiles are faster at every larger M
measured (where the shipped thresholds should sit). Then end to end, every linear layer of the
demo's blocks at INT8, at INT4 and at fp16: the held-out evaluation (what compile runs for every
config it measures) and a plain prefill of one prompt (what a user's runtime runs), through the
kernels alone and through the dispatch mpq ships, and (perplexity only) the float32 dequantise
reference. Each timing is the fastest of --repeats after a warm-up. Prints tables, writes JSON.

    python benchmarks/cpu_kernels.py                 # benchmarks/results/cpu_kernels.json
    python benchmarks/cpu_kernels.py --quick --out /tmp/cpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from mpq.apply import QuantizedWeightCache, applied
from mpq.kernels.cpu_thresholds import least_seconds
from mpq.environment import hardware, versions
from mpq.formats import get_format
from mpq.kernels import cpu as cpu_kernels
from mpq.kernels import linear_cpu, prepare_cpu
from mpq.models import load_model
from mpq.quantize import quantize_weight
from mpq.tasks import CausalLMTask

ROOT = Path(__file__).resolve().parent
FORMATS = ("int8", "int4-g128", "int4-g32-sym", "fp16")  # fp16: a bf16 weight, dense
SHAPES = {"demo attention 256x256": (256, 256), "demo MLP up 1024x256": (1024, 256),
          "Llama-7B attention 4096x4096": (4096, 4096), "Llama-7B MLP up 11008x4096": (11008, 4096)}
TOKENS = (1, 16, 32, 64, 128, 256, 512, 2048)
PROMPT_TOKENS = 512  # the end-to-end prefill: one prompt of this many tokens
MAX_MACS = 4096 * 4096 * 512  # a row's budget: the largest products take seconds on 2 cores


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up, in ms: timed as the dispatch's own probe times."""
    return least_seconds(fn, repeats) * 1e3


KERNELS_ONLY = 2**62  # FLOAT32_FROM_TOKENS no layer reaches: the dispatch before float32 tiles
TILES_ONLY = 1


@contextmanager
def float32_from(tokens: int | None) -> Iterator[None]:
    """FLOAT32_FROM_TOKENS and DENSE_FLOAT32_FROM_TOKENS at `tokens` within the block (None: as shipped,
    that is as MPQ_CPU_TILES pins them or as this machine measured them: kernels/cpu_thresholds.py)."""
    saved = {bits: cpu_kernels.float32_from_tokens(bits) for bits in (8, 4)}
    saved_dense = cpu_kernels.DENSE_FLOAT32_FROM_TOKENS
    if tokens is not None:
        cpu_kernels.FLOAT32_FROM_TOKENS.update({bits: tokens for bits in saved})
        cpu_kernels.DENSE_FLOAT32_FROM_TOKENS = tokens
    try:
        yield
    finally:
        cpu_kernels.FLOAT32_FROM_TOKENS.update(saved)
        cpu_kernels.DENSE_FLOAT32_FROM_TOKENS = saved_dense


def _layer(fmt_name: str, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> y through what a CPU layer of the format runs: torch's weight-only kernel (or the float32
    tiles, as float32_from says) for INT8/INT4, the dense path of a bf16 weight for fp16."""
    fmt = get_format(fmt_name)
    if not fmt.quantized:
        bf16 = weight.to(torch.bfloat16)
        return lambda x: cpu_kernels.linear_dense_cpu(x, bf16, None)
    prepared = prepare_cpu(quantize_weight(weight, fmt), fmt)
    return lambda x: linear_cpu(x, prepared, fmt, None)


def shipped_threshold(fmt_name: str) -> int | None:
    """The dispatch's threshold for the format on this machine; None where it never takes the tiles."""
    from mpq.kernels.cpu_thresholds import NEVER

    fmt = get_format(fmt_name)
    tokens = cpu_kernels.float32_from_tokens(fmt.bits) if fmt.quantized else cpu_kernels.DENSE_FLOAT32_FROM_TOKENS
    return None if tokens >= NEVER else tokens


def layer_rows(formats: tuple[str, ...], shapes: dict[str, tuple[int, int]], tokens: tuple[int, ...],
               repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for fmt_name in formats:
        for shape_name, (n, k) in shapes.items():
            layer = _layer(fmt_name, torch.randn(n, k, generator=generator))
            for m in tokens:
                if m * n * k > MAX_MACS:
                    continue
                x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
                with float32_from(KERNELS_ONLY):
                    kernel_ms = _best_ms(lambda: layer(x), repeats)
                    kernel_out = layer(x).float()
                with float32_from(TILES_ONLY):
                    tiles_ms = _best_ms(lambda: layer(x), repeats)
                    tiles_out = layer(x).float()
                rel_err = ((tiles_out - kernel_out).norm() / kernel_out.norm()).item()
                rows.append({"format": fmt_name, "shape": shape_name, "n": n, "k": k, "tokens": m,
                             "kernel_ms": kernel_ms, "tiles_ms": tiles_ms, "speedup": kernel_ms / tiles_ms,
                             "rel_err_tiles_vs_kernel": rel_err})
                print(f"{fmt_name:<13} {shape_name:<30} M={m:<5} kernel {kernel_ms:9.3f} ms  tiles {tiles_ms:9.3f} ms  "
                      f"x{kernel_ms / tiles_ms:5.2f}  rel_err {rel_err:.1e}", flush=True)
    return rows


def crossovers(rows: list[dict]) -> list[dict]:
    """Per format and shape: the smallest measured M from which the tiles win at every larger M."""
    found = []
    for key in dict.fromkeys((row["format"], row["shape"]) for row in rows):
        series = sorted((row for row in rows if (row["format"], row["shape"]) == key), key=lambda row: row["tokens"])
        winning = None
        for row in reversed(series):
            if row["speedup"] <= 1:
                break
            winning = row["tokens"]
        found.append({"format": key[0], "shape": key[1], "tiles_win_from_tokens": winning,
                      "shipped_threshold": shipped_threshold(key[0])})
    return found


def end_to_end(formats: tuple[str, ...], repeats: int) -> list[dict]:
    loaded = load_model("demo")
    model = loaded.model
    task = CausalLMTask(loaded.tokenizer, None, 0, 0)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]
    cache = QuantizedWeightCache(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    rows = []
    for fmt_name in formats:
        plan = {name: get_format(fmt_name) for name in names}
        with applied(model, plan, cache):
            row = {"format": fmt_name, "layers": len(names)}
            for label, tokens in (("kernels", KERNELS_ONLY), ("shipped", None)):
                metrics = {}
                with float32_from(tokens):
                    row[f"{label}_s"] = _best_ms(lambda: metrics.update(task.evaluate(model)), repeats) / 1e3
                    with torch.no_grad():  # a user's prefill: a plain forward, no quality-pass dispatch mode
                        row[f"prefill_{label}_ms"] = _best_ms(lambda: model(input_ids=prompt, use_cache=False), repeats)
                row[f"{label}_ppl"] = metrics["ppl"]
            row["speedup"] = row["kernels_s"] / row["shipped_s"]
            row["prefill_speedup"] = row["prefill_kernels_ms"] / row["prefill_shipped_ms"]
        with applied(model, plan, cache, backend="reference"):  # float32 dequantise + multiply: the ground truth
            row["reference_ppl"] = task.evaluate(model)["ppl"]
        print(f"demo eval, {len(names)} layers at {fmt_name}: kernels {row['kernels_s']:.2f} s (ppl {row['kernels_ppl']:.4f}), "
              f"shipped {row['shipped_s']:.2f} s (ppl {row['shipped_ppl']:.4f}), x{row['speedup']:.2f}; reference ppl "
              f"{row['reference_ppl']:.4f}; prefill of {PROMPT_TOKENS} tokens {row['prefill_kernels_ms']:.1f} -> "
              f"{row['prefill_shipped_ms']:.1f} ms", flush=True)
        rows.append(row)
    return rows


def table(result: dict) -> str:
    lines = [f"hardware: {result['hardware']}", "",
             "| format | layer | " + " | ".join(f"M={m}" for m in result["tokens"]) + " | tiles win from M | shipped |",
             "|---|---|" + "---|" * len(result["tokens"]) + "---|---|"]
    for cross in result["crossovers"]:
        cells = []
        for m in result["tokens"]:
            row = next((r for r in result["layers"] if (r["format"], r["shape"], r["tokens"]) == (cross["format"], cross["shape"], m)), None)
            cells.append("" if row is None else f"{row['kernel_ms']:.2f} / {row['tiles_ms']:.2f}")
        lines.append(f"| {cross['format']} | {cross['shape']} | " + " | ".join(cells)
                     + f" | {cross['tiles_win_from_tokens']} | {cross['shipped_threshold']} |")
    lines += ["", "cells: torch's kernel ms / float32 tiles ms", "",
              "| demo, blocks' linears at | held-out eval, kernels only (s) | as shipped (s) | speedup | "
              f"prefill of {PROMPT_TOKENS} tokens, kernels only (ms) | as shipped (ms) | speedup | ppl kernels | ppl shipped "
              "| ppl MPQ_KERNELS=reference |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["end_to_end"]:
        lines.append(f"| {row['format']} ({row['layers']} layers) | {row['kernels_s']:.2f} | {row['shipped_s']:.2f} | "
                     f"{row['speedup']:.2f}x | {row['prefill_kernels_ms']:.1f} | {row['prefill_shipped_ms']:.1f} | {row['prefill_speedup']:.2f}x | "
                     f"{row['kernels_ppl']:.4f} | {row['shipped_ppl']:.4f} | {row['reference_ppl']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the fastest is kept")
    parser.add_argument("--quick", action="store_true", help="the demo's shapes and one end-to-end format only")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "cpu_kernels.json")
    args = parser.parse_args()
    shapes = {name: shape for name, shape in SHAPES.items() if not args.quick or name.startswith("demo")}
    layers = layer_rows(FORMATS, shapes, TOKENS, args.repeats)
    result = {"hardware": hardware(), "versions": versions(), "repeats": args.repeats, "tokens": list(TOKENS),
              "tile_elements": cpu_kernels.TILE_ELEMENTS, "layers": layers, "crossovers": crossovers(layers),
              "end_to_end": end_to_end(FORMATS[:1] if args.quick else ("int8", "int4-g128", "fp16"), args.repeats),
              "eval": "demo, held-out validation half: 24 x 256 tokens of text and 24 of code, batches of 8 (M = 2048)",
              "prefill": f"demo, a plain forward of one {PROMPT_TOKENS}-token prompt (M = {PROMPT_TOKENS})"}
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
