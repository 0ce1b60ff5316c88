"""Mixture-of-experts decode (GPU): grouped expert launches against the per-expert loop.

A mixture shaped like Qwen3-30B-A3B's (128 experts, hidden 2048, expert width 768, top-8) and one
like Mixtral-8x7B's (8 experts, 4096 x 14336, top-2), their experts quantised (INT4 groups of 128,
INT8; "int4-g128+fp16": every other expert kept in 16 bits, which runs a grouped launch of its
own), run for 1, 4 and 16 tokens routed at random to top-k distinct experts. The loop
(RoutedExperts.group_decode off) asks the GPU which experts got tokens, then launches each one's
two projections; the grouped path (mpq.expert_stacks) runs one launch per projection and format.
Per row: eager wall time per call of both (what a Python decode loop pays, host included), the
grouped path's device time in a CUDA graph (it has no host sync, so a decode step can be captured
whole; the loop's sync cannot be; the L2 cache flushed before each replay, so the weights come
from DRAM), the bytes of the experts the tokens touched and the GB/s that time makes of them, the
call's launches as mpq's latency model predicts them (mpq.grouped_latency's probes) and their
share of the eager call, and both paths' relative error to the dequantise reference. Prints a
table and writes JSON.

    python benchmarks/experts_decode.py            # on a CUDA machine
    python benchmarks/experts_decode.py --smoke    # a tiny mixture, correctness only (CPU: the interpreter)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gpu_kernels import benchmark_device, eager_ms  # a sibling script: run as one, this folder is first on sys.path

MIXTURES = [  # many small experts, and few large ones (whose pairs share experts at 4+ tokens)
    {"name": "Qwen3-30B-A3B mixture", "experts": 128, "hidden": 2048, "intermediate": 768, "top_k": 8},
    {"name": "Mixtral-8x7B mixture", "experts": 8, "hidden": 4096, "intermediate": 14336, "top_k": 2},
]
SMOKE_MIXTURES = [{"name": "smoke mixture", "experts": 6, "hidden": 128, "intermediate": 128, "top_k": 2}]
TOKENS = (1, 4, 16)


def build_mixture(spec: dict, fmt_name: str, device: str, dtype: torch.dtype):
    """A RoutedExperts of `spec`'s shape with random weights, every expert layer in `fmt_name` on Triton
    ("a+b": expert e in the e % 2-th of them; fp16 layers stay 16-bit, "dense")."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from mpq.experts import RoutedExperts
    from mpq.qlinear import QuantizedLinear

    config = Qwen3MoeConfig(hidden_size=spec["hidden"], moe_intermediate_size=spec["intermediate"],
                            num_experts=spec["experts"], num_experts_per_tok=spec["top_k"])
    torch.manual_seed(0)
    with torch.device(device):
        original = Qwen3MoeExperts(config).to(dtype)
    with torch.no_grad():
        for weight in (original.gate_up_proj, original.down_proj):
            weight.normal_(0, 0.02)  # the class leaves them uninitialised
    mixture = RoutedExperts(original).eval()
    del original
    formats = fmt_name.split("+")
    for e in range(mixture.num_experts):
        expert = mixture.expert(e)
        for name in (expert.up_name, "down_proj"):
            layer, _ = QuantizedLinear.from_module(getattr(expert, name), formats[e % len(formats)], backend="triton")
            setattr(expert, name, layer)
    return mixture


def routes(spec: dict, tokens: int, device: str, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, spec["hidden"], generator=generator).to(device=device, dtype=dtype)
    index = torch.stack([torch.randperm(spec["experts"], generator=generator)[:spec["top_k"]] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, spec["top_k"], generator=generator), dim=-1)
    return x, index.to(device), weights.to(device=device, dtype=dtype)


def run_loop(mixture, *inputs):
    mixture.group_decode = False
    try:
        return mixture(*inputs)
    finally:
        mixture.group_decode = True


def run_reference(mixture, *inputs):
    """The loop, each layer dequantising and multiplying (the ground truth)."""
    backends = {layer: layer.backend for projection in mixture.projections() for layer in projection}
    for layer in backends:
        layer.backend = "reference"
    try:
        return run_loop(mixture, *inputs)  # the loop: a grouped call would stack the experts, or note they cannot be
    finally:
        for layer, backend in backends.items():
            layer.backend = backend


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def predicted_launches_ms(mixture, touched: list[int], pairs: int, dtype: torch.dtype, budget_s: float) -> float:
    """This call's launches as mpq's latency model makes them (mpq.grouped_latency): per projection
    and format a probe stack's [fixed, per expert] seconds, the fixed cost paid by every format the
    mixture holds and the per-expert one by each touched expert of the format."""
    from mpq.grouped_latency import time_grouped_launch
    from mpq.latency import MAX_WORKING_SET

    total = 0.0
    for layers in mixture.projections():
        formats = {layer.fmt.name: layer.fmt for layer in layers}
        for name, fmt in formats.items():
            read = sum(1 for e in touched if layers[e].fmt.name == name)
            fixed, per_expert = time_grouped_launch(layers[0].out_features, layers[0].in_features, fmt, len(layers), pairs,
                                                    max(1, read), dtype, next(layers[0].buffers()).device, budget_s,
                                                    MAX_WORKING_SET)
            total += fixed + per_expert * read
    return total * 1e3


def bench(spec: dict, fmt_name: str, tokens: tuple[int, ...], device: str, smoke: bool, dtype: torch.dtype) -> list[dict]:
    from mpq.kernels.triton_tuning import gpu_time_ms

    mixture = build_mixture(spec, fmt_name, device, dtype)
    expert_bytes = [sum(t.numel() * t.element_size() for layer in layers for t in layer._tensors().values())
                    for layers in zip(*mixture.projections())]
    rows = []
    for count in tokens:
        inputs = routes(spec, count, device, dtype, seed=count)
        with torch.no_grad():
            expected = run_reference(mixture, *inputs)
            grouped, looped = mixture(*inputs), run_loop(mixture, *inputs)
            if not mixture._stacks.get(inputs[0].device):
                raise SystemExit(f"{spec['name']} {fmt_name}: the grouped path did not run")
            touched = inputs[1].unique().tolist()
            row = {"mixture": spec["name"], "format": fmt_name, "tokens": count, "top_k": spec["top_k"],
                   "experts_touched": len(touched), "bytes_touched": sum(expert_bytes[e] for e in touched),
                   "rel_err_grouped": rel_err(grouped, expected), "rel_err_loop": rel_err(looped, expected)}
            if not smoke or ("+" in fmt_name and count == tokens[0]):  # the interpreter: one row's probes, as a check
                row["predicted_launches_ms"] = predicted_launches_ms(mixture, touched, count * spec["top_k"], dtype,
                                                                     0.002 if smoke else 0.05)
            if not smoke:
                row["grouped_eager_ms"] = eager_ms(lambda: mixture(*inputs), calls=100)
                row["loop_eager_ms"] = eager_ms(lambda: run_loop(mixture, *inputs), calls=100)
                row["grouped_graph_ms"] = gpu_time_ms(lambda: mixture(*inputs))  # L2 flushed before each replay
                row["eager_speedup"] = row["loop_eager_ms"] / row["grouped_eager_ms"]
                row["grouped_GBps"] = row["bytes_touched"] / (row["grouped_graph_ms"] * 1e-3) / 1e9
                # the latency model's launches against the eager call they are part of (the rest: torch's glue ops)
                row["launches_share"] = row["predicted_launches_ms"] / row["grouped_eager_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny mixture, no timing")
    parser.add_argument("--formats", default="int4-g128,int8,int4-g128+fp16")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = benchmark_device("benchmarks/experts_decode.py", args.smoke)
    from mpq.io import write_json_atomic

    mixtures = SMOKE_MIXTURES if args.smoke else MIXTURES
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "mixtures": mixtures, "rows": []}
    path = args.out / ("experts-decode-smoke.json" if args.smoke else f"experts-decode-{report['device'].replace(' ', '_')}.json")
    for spec in mixtures:
        for fmt_name in args.formats.split(","):
            report["rows"] += bench(spec, fmt_name, TOKENS, device, args.smoke, torch.bfloat16)
            write_json_atomic(path, report)
            if device == "cuda":
                torch.cuda.empty_cache()  # the next mixture is built beside nothing of this one
    print(f"\n# {report['device']}, bf16 activations: "
          + "; ".join(f"{m['name']}: {m['experts']} experts {m['hidden']}x{m['intermediate']}, top-{m['top_k']}" for m in mixtures))
    print("| mixture | format | tokens | experts touched | loop eager ms | grouped eager ms | eager speedup | "
          "grouped graph ms | GB/s | predicted launches ms (share of eager) | rel err grouped | rel err loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        timed = "grouped_graph_ms" in r
        print(f"| {r['mixture']} | {r['format']} | {r['tokens']} | {r['experts_touched']} | "
              + (f"{r['loop_eager_ms']:.3f} | {r['grouped_eager_ms']:.3f} | {r['eager_speedup']:.2f}x | "
                 f"{r['grouped_graph_ms']:.4f} | {r['grouped_GBps']:.0f} | {r['predicted_launches_ms']:.3f} "
                 f"({r['launches_share']:.2f}) | " if timed else "- | - | - | - | - | - | ")
              + f"{r['rel_err_grouped']:.1e} | {r['rel_err_loop']:.1e} |")
    print(f"wrote {path}")
    bad = [r for r in report["rows"] if not (r["rel_err_grouped"] < 1e-2 and r["rel_err_loop"] < 1e-2)]
    if bad:
        raise SystemExit(f"{len(bad)} rows off the reference by 1e-2 or more")


if __name__ == "__main__":
    main()
