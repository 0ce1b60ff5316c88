"""Methods x sensitivity signals x budgets, on both demos: is the search near-optimal, and do
GPTQ and AWQ beat round-to-nearest?

For each model and method (rtn, gptq, awq): held-out quality of uniform INT4 and INT8; then for
each sensitivity signal (kl, fisher, local; fisher for causal LMs only): its measuring time, and at
budgets 25/50/75% of the way from all-INT4 to all-INT8 bytes, the exact DP optimum of the additive
model (predicted) and Optuna's best within the same budget (predicted; the study is warm-started
from the DP, so it can only match or beat it on predicted loss), each measured on held-out data.
Also the additive model's check (Spearman of predicted vs measured calibration divergence) over the
plans measured. Prints Markdown tables and writes JSON.

    python benchmarks/search.py                       # both demos, every method and signal
    python benchmarks/search.py --models demo --methods rtn,gptq --signals kl --trials 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mpq.additivity import additivity_check
from mpq.apply import QuantizedWeightCache, applied
from mpq.calib_stats import collect_input_stats
from mpq.environment import hardware, versions
from mpq.formats import get_format, parse_formats
from mpq.fusion import fusion_groups
from mpq.memory import memory_model
from mpq.methods import make_quantizer
from mpq.models import CAUSAL_LM, load_model
from mpq.profile import example_inputs
from mpq.search import evaluate_plan, exact_front, search_plans, uniform_plan
from mpq.sensitivity import MEASURE_BACKEND, MEASURES, measurement_model
from mpq.tasks import calibration_text, make_task
from mpq.trace import trace_model

FRACTIONS = (0.25, 0.5, 0.75)
SAMPLES = {CAUSAL_LM: 32, "encoder": 128}


def quality(metrics: dict) -> float:
    return metrics["ppl"] if "ppl" in metrics else metrics["mean_cosine"]


def bench_model(name: str, methods: list[str], signals: list[str], trials: int) -> dict:
    loaded = load_model(name)
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), SAMPLES[loaded.task], 128)
    graph = trace_model(loaded.model, example_inputs(loaded.task, getattr(loaded.model.config, "vocab_size", 1000)))
    formats = parse_formats("fp16,int8,int4")
    groups = graph.shared_input_groups()
    has_bias = {layer.name: layer.has_bias for layer in graph.layers}
    work = measurement_model(loaded.model)
    task.prepare_eval(loaded.model)
    reference = task.reference(work)
    baseline = task.evaluate(loaded.model)
    result = {"model": name, "task": loaded.task, "baseline": baseline, "methods": {}}
    for method in methods:
        start = time.time()
        stats = collect_input_stats(work, graph.layers, groups, task) if method != "rtn" else None
        cache = QuantizedWeightCache(loaded.model, make_quantizer(method, loaded.model, stats, groups))
        memory = memory_model(loaded.model, graph.layers, formats, method)
        costs = memory.layer_bytes

        def measure(plan: dict[str, str]) -> dict:
            specs = {layer: get_format(fmt) for layer, fmt in plan.items()}
            with applied(loaded.model, specs, cache, fusion_groups(plan, groups, has_bias)):
                metrics = task.evaluate(loaded.model)
            with applied(work, specs, cache, backend=MEASURE_BACKEND):
                metrics["calib_divergence"] = task.divergence(work, reference)
            return metrics

        uniform = {fmt: uniform_plan(costs, fmt) for fmt in ("int4-g128", "int8")}
        low, high = (memory.total(uniform["int4-g128"]), memory.total(uniform["int8"]))
        per_method = {"uniform": {fmt: {"bytes": memory.total(plan), **measure(plan)} for fmt, plan in uniform.items()},
                      "quantize_seconds": None, "signals": {}}
        per_method["quantize_seconds"] = round(time.time() - start, 1)  # statistics + both uniform plans' weights
        for signal in signals:
            if signal == "fisher" and loaded.task != CAUSAL_LM:
                continue
            table = MEASURES[signal](loaded.model, work, graph.layers, formats, task, "bench", {}, cache, False)
            sens = {layer: {fmt: table.values[layer][fmt] for fmt in costs[layer]} for layer in costs}
            rows, predicted, measured = [], [], []
            for fraction in FRACTIONS:
                budget = int(low + fraction * (high - low))
                exact = exact_front(costs, sens, budget - memory.fixed_bytes)[-1]
                found = search_plans(costs, sens, memory.fixed_bytes, budget, trials, 0, [f.name for f in formats],
                                     tied=groups)
                best = min(found.front, key=lambda c: c.predicted)
                exact_metrics = measure(exact.plan)
                best_metrics = exact_metrics if best.formats == exact.plan else measure(best.formats)
                rows.append({"fraction": fraction, "budget": budget,
                             "exact": {"bytes": memory.fixed_bytes + exact.bytes, "predicted": exact.predicted,
                                       **exact_metrics},
                             "optuna": {"bytes": best.bytes, "predicted": best.predicted, "origin": best.origin,
                                        "sampler_best": found.sampler_best, **best_metrics}})
                for cand_predicted, metrics in ((exact.predicted, exact_metrics), (best.predicted, best_metrics)):
                    predicted.append(cand_predicted)
                    measured.append(metrics["calib_divergence"])
            check = additivity_check(predicted, measured, same_units=table.metric == task.metric) \
                if len(set(predicted)) >= 3 else None
            per_method["signals"][signal] = {"seconds": table.seconds, "rows": rows, "additivity": check}
        result["methods"][method] = per_method
    return result


def print_tables(result: dict) -> None:
    higher = result["task"] != CAUSAL_LM
    name = "mean cosine" if higher else "held-out ppl"
    print(f"\n## {result['model']} (baseline {name} {quality(result['baseline']):.4f})\n")
    print(f"| method | all-INT4 {name} | all-INT8 {name} |\n|---|---|---|")
    for method, per in result["methods"].items():
        u = per["uniform"]
        print(f"| {method} | {quality(u['int4-g128']):.4f} | {quality(u['int8']):.4f} |")
    print(f"\n| method | signal | signal s | budget | DP predicted | DP {name} | Optuna predicted | Optuna {name} | "
          f"additivity Spearman |\n|---|---|---|---|---|---|---|---|---|")
    for method, per in result["methods"].items():
        for signal, data in per["signals"].items():
            spearman = "n/a" if data["additivity"] is None else f"{data['additivity']['spearman']:.3f}"
            for row in data["rows"]:
                print(f"| {method} | {signal} | {data['seconds']:.1f} | {row['budget'] / 1e6:.3f} MB | "
                      f"{row['exact']['predicted']:.4g} | {quality(row['exact']):.4f} | {row['optuna']['predicted']:.4g} | "
                      f"{quality(row['optuna']):.4f} | {spearman} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,minilm")
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--signals", default="kl,fisher,local")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        start = time.time()
        result = bench_model(name, args.methods.split(","), args.signals.split(","), args.trials)
        result["seconds"] = round(time.time() - start, 1)
        print_tables(result)
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "search.json"
    path.write_text(json.dumps({"hardware": hardware(), "versions": versions(), "results": results}, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
