"""Methods x sensitivity signals x budgets, on both demos: is the search near-optimal, and do
GPTQ and AWQ beat round-to-nearest?

For each model and method (rtn, gptq, awq): held-out quality of uniform INT4 and INT8; then for
each sensitivity signal (kl, fisher, hessian, local): its
measuring time, and at budgets 25/50/75% of the way from all-INT4 to all-INT8 bytes: the exact DP
optimum of the additive model (tied layers, as compile), the best plan the NSGA-II sampler proposed
itself (its predicted gap to the optimum: what the study would find without the DP seeds), and the
measured refinement (mpq.refine: an Optuna study of 24 trials measured on calibration data: the
DP optimum, the 8 least-predicted plans, then neighbours of the best measured), each measured on
held-out data.
Also the additive model's check (Spearman of predicted vs measured calibration divergence) over the
plans measured. Prints Markdown tables and writes JSON.

    python benchmarks/search.py                       # both demos, every method and signal
    python benchmarks/search.py --models demo --methods rtn,gptq --signals kl --trials 100
The JSON keeps the entries of methods not run this time (a method's entry is replaced whole).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mpq.additivity import additivity_check
from mpq.apply import QuantizedWeightCache, applied
from mpq.environment import hardware, versions
from mpq.formats import get_format, parse_formats
from mpq.fusion import fusion_groups
from mpq.memory import memory_model
from mpq.methods import method_quantizer
from mpq.models import CAUSAL_LM, load_model
from mpq.profile import example_inputs
from mpq.refine import refine_at_budget
from mpq.search import Candidate, evaluate_plan, search_plans, uniform_plan
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
        cache = QuantizedWeightCache(loaded.model, method_quantizer(method, loaded.model, graph.layers, groups, formats, task))
        memory = memory_model(loaded.model, graph.layers, formats, method)
        costs = memory.layer_bytes

        def calib_divergence(plan: dict[str, str]) -> float:
            with applied(work, {layer: get_format(fmt) for layer, fmt in plan.items()}, cache, backend=MEASURE_BACKEND):
                return task.divergence(work, reference)

        def measure(plan: dict[str, str]) -> dict:
            specs = {layer: get_format(fmt) for layer, fmt in plan.items()}
            with applied(loaded.model, specs, cache, fusion_groups(plan, groups, has_bias)):
                metrics = task.evaluate(loaded.model)
            metrics["calib_divergence"] = calib_divergence(plan)
            return metrics

        uniform = {fmt: uniform_plan(costs, fmt) for fmt in ("int4-g128", "int8")}
        low, high = (memory.total(uniform["int4-g128"]), memory.total(uniform["int8"]))
        per_method = {"uniform": {fmt: {"bytes": memory.total(plan), **measure(plan)} for fmt, plan in uniform.items()},
                      "quantize_seconds": None, "signals": {}}
        per_method["quantize_seconds"] = round(time.time() - start, 1)  # statistics + both uniform plans' weights
        for signal in signals:
            table = MEASURES[signal](loaded.model, work, graph.layers, formats, task, "bench", {}, cache, False)
            sens = {layer: {fmt: table.values[layer][fmt] for fmt in costs[layer]} for layer in costs}
            rows, predicted, measured = [], [], []
            for fraction in FRACTIONS:
                budget = int(low + fraction * (high - low))
                start_search = time.time()
                found = search_plans(costs, sens, memory.fixed_bytes, budget, trials, 0, [f.name for f in formats],
                                     tied=groups)
                search_seconds = time.time() - start_search
                exact = Candidate(found.exact_plan, *evaluate_plan(found.exact_plan, costs, sens, memory.fixed_bytes), "exact")
                start_refine = time.time()
                refined = refine_at_budget(exact, found.feasible, calib_divergence, costs, sens, memory.fixed_bytes, budget,
                                           tied=groups)
                row = {"fraction": fraction, "budget": budget, "search_seconds": round(search_seconds, 1),
                       "refine_seconds": round(time.time() - start_refine, 1), "refine_trials": len(refined.rows),
                       "refine_gain": refined.gain, "refined_origin": refined.best.origin}
                plans = {"exact": exact.formats, "sampler": found.sampler_plan, "refined": refined.best.formats}
                seen: dict[tuple, dict] = {}
                for role, plan in plans.items():
                    if plan is None:
                        row[role] = None
                        continue
                    key = tuple(sorted(plan.items()))
                    if key not in seen:
                        seen[key] = measure(plan)
                    nbytes, plan_predicted = evaluate_plan(plan, costs, sens, memory.fixed_bytes)
                    row[role] = {"bytes": nbytes, "predicted": plan_predicted, **seen[key]}
                    predicted.append(plan_predicted)
                    measured.append(seen[key]["calib_divergence"])
                rows.append(row)
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
    print(f"\n| method | signal | signal s | budget | DP predicted | DP {name} | NSGA-II own best predicted (gap) | "
          f"NSGA-II {name} | measured study {name} (calib gain, seconds) | additivity Spearman |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for method, per in result["methods"].items():
        for signal, data in per["signals"].items():
            spearman = "n/a" if data["additivity"] is None else f"{data['additivity']['spearman']:.3f}"
            for row in data["rows"]:
                exact, own, refined = row["exact"], row["sampler"], row["refined"]
                gap = "none found" if own is None else \
                    f"{own['predicted']:.4g} ({own['predicted'] / exact['predicted'] - 1:+.1%})" if exact["predicted"] else f"{own['predicted']:.4g}"
                print(f"| {method} | {signal} | {data['seconds']:.1f} | {row['budget'] / 1e6:.3f} MB | "
                      f"{exact['predicted']:.4g} | {quality(exact):.4f} | {gap} | "
                      f"{'-' if own is None else f'{quality(own):.4f}'} | {quality(refined):.4f} ({row['refine_gain']:.1%}, "
                      f"{row.get('refine_seconds', '?')} s) | "
                      f"{spearman} |")


def merged(path: Path, results: list[dict]) -> list[dict]:
    """The results already in `path` with the (model, method) entries just run replaced, so that
    `--methods awq` refreshes AWQ's rows and keeps the others."""
    if not path.exists():
        return results
    old = {r["model"]: r for r in json.loads(path.read_text())["results"]}
    for result in results:
        if result["model"] in old:
            old[result["model"]]["methods"].update(result["methods"])
        else:
            old[result["model"]] = result
    return list(old.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,minilm")
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--signals", default="kl,fisher,hessian,local")
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
    path.write_text(json.dumps({"hardware": hardware(), "versions": versions(), "results": merged(path, results)}, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
