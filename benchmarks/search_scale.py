"""The search at mixture-of-experts scale: how long the Optuna study takes when a model has
thousands of layers, with every unit a variable of the sampler (`--per-expert`, as mpq searched
before) against one variable per mixture projection over its experts (what `mpq compile` does).

What is timed is `mpq.search.search_plans` alone, the stage whose cost grows with the layer count.
The problems are synthetic but shaped like real models: the layer shapes of Qwen1.5-MoE-A2.7B and
Qwen3-30B-A3B, each format's exact bytes (mpq.formats), q/k/v and gate/up tied as compile ties
them, and a decode latency model (a layer's seconds = its bytes / BANDWIDTH, an expert's times its
expected calls, mpq.latency.routed_calls). Sensitivities are drawn at random: lognormal per
layer, an expert's scaled by a random routing share, so experts of one projection differ. Both
variants see the same problem; the table gives the least predicted loss on each front within the
budget (the exact optimum is on both) and the front's size.

    python benchmarks/search_scale.py                       # both shapes, 300 trials, in memory
    python benchmarks/search_scale.py --shapes qwen1.5-moe --trials 50 --storage journal
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from mpq.environment import hardware, versions
from mpq.formats import parse_formats
from mpq.io import write_json_atomic
from mpq.latency import LatencyModel, routed_calls
from mpq.search import open_storage, search_plans

BANDWIDTH = 3e12  # bytes/s: decode reads every weight once, so a layer's time is its bytes over this
FORMATS = parse_formats("fp16,int8,int4")
# blocks, hidden, q out, k/v out, experts, top-k, expert intermediate, shared expert intermediate (0: none)
SHAPES = {
    "qwen1.5-moe": dict(blocks=24, hidden=2048, q=2048, kv=2048, experts=60, top_k=4, inter=1408, shared=5632),
    "qwen3-moe": dict(blocks=48, hidden=2048, q=4096, kv=512, experts=128, top_k=8, inter=768, shared=0),
}


def problem(shape: dict, seed: int = 0):
    """(shapes, tied groups, sampled-together groups, calls) of one model: layer -> [out, in]."""
    layers: dict[str, tuple[int, int]] = {}
    tied, together, calls = [], [], {}
    h = shape["hidden"]
    share = shape["top_k"] / shape["experts"]
    for b in range(shape["blocks"]):
        p = f"model.layers.{b}"
        qkv = {f"{p}.self_attn.q_proj": (shape["q"], h), f"{p}.self_attn.k_proj": (shape["kv"], h),
               f"{p}.self_attn.v_proj": (shape["kv"], h)}
        layers.update(qkv)
        tied.append(list(qkv))
        layers[f"{p}.self_attn.o_proj"] = (h, shape["q"])
        if shape["shared"]:
            gate_up = [f"{p}.mlp.shared_expert.gate_proj", f"{p}.mlp.shared_expert.up_proj"]
            layers.update({name: (shape["shared"], h) for name in gate_up})
            tied.append(gate_up)
            layers[f"{p}.mlp.shared_expert.down_proj"] = (h, shape["shared"])
        for projection, dims in (("gate_up_proj", (2 * shape["inter"], h)), ("down_proj", (h, shape["inter"]))):
            group = [f"{p}.mlp.experts.{e}.{projection}" for e in range(shape["experts"])]
            layers.update({name: dims for name in group})
            together.append(group)
            calls.update({name: routed_calls(share, 1)[0] for name in group})
    rng = random.Random(seed)
    costs = {name: {f.name: f.weight_bytes(*dims) for f in FORMATS} for name, dims in layers.items()}
    sens = {}
    for name in layers:
        scale = rng.lognormvariate(0, 1.0) * (rng.uniform(0.2, 2.0) if name in calls else 1.0)
        sens[name] = {"fp16": 0.0, "int8": scale * 1e-4 * rng.random(), "int4-g128": scale * 1e-2 * (0.2 + rng.random())}
    seconds = {name: {fmt: nbytes / BANDWIDTH for fmt, nbytes in options.items()} for name, options in costs.items()}
    group_seconds = {"|".join(group): {fmt: sum(seconds[n][fmt] for n in group) for fmt in costs[group[0]]}
                     for group in tied}
    latency = LatencyModel(regime={"tokens": 1}, device="synthetic", layers={n: [*d, False] for n, d in layers.items()},
                           groups=tied, layer_seconds=seconds, group_seconds=group_seconds, baseline_seconds=0.0,
                           rest_seconds=2e-3, calls=calls)
    latency.baseline_seconds = latency.predict({name: "fp16" for name in layers})
    return costs, sens, tied, together, latency


def run(name: str, trials: int, storage: str, per_expert: bool) -> dict:
    costs, sens, tied, together, latency = problem(SHAPES[name])
    low = sum(min(c.values()) for c in costs.values())
    budget = (low + sum(sorted(c.values())[1] for c in costs.values())) // 2  # halfway from all int4 to all int8
    with tempfile.TemporaryDirectory() as tmp:
        store = open_storage("memory" if storage == "memory" else str(Path(tmp) / "study.journal"))
        start = time.time()
        result = search_plans(costs, sens, 0, budget, trials, 0, [f.name for f in FORMATS], tied=tied, storage=store,
                              latency=latency, sampled_together=[] if per_expert else together)
        seconds = time.time() - start
    best = min(result.front, key=lambda c: c.predicted)
    return {"shape": name, "variant": "per expert" if per_expert else "grouped", "layers": len(costs),
            "variables": result.variables, "trials": result.trials, "storage": storage, "seconds": round(seconds, 1),
            "front": len(result.front), "least_predicted": best.predicted, "exact_best": result.exact_best,
            "sampler_best": result.sampler_best, "budget": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--storage", choices=("memory", "journal"), default="memory",
                        help="memory, or a journal file (compile's default storage)")
    parser.add_argument("--variants", default="grouped,per-expert")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_scale.json")
    args = parser.parse_args()
    rows = [run(name, args.trials, args.storage, variant == "per-expert")
            for name in args.shapes.split(",") for variant in args.variants.split(",")]
    print("| shape | variant | layers | variables | trials | storage | seconds | front | least predicted | exact optimum |"
          " sampler's own best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        own = "none" if r["sampler_best"] is None else f"{r['sampler_best']:.4g}"
        print(f"| {r['shape']} | {r['variant']} | {r['layers']} | {r['variables']} | {r['trials']} | {r['storage']} | "
              f"{r['seconds']} | {r['front']} | {r['least_predicted']:.4g} | {r['exact_best']:.4g} | {own} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"rows": rows, "hardware": hardware(), "versions": versions()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
