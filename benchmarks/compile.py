"""Compile benchmark: stage times, and bytes / held-out quality / CPU speed of every Pareto config
and every uniform config, for both demos. Prints a table and writes JSON.

    python benchmarks/compile.py                      # both demos, default budgets
    python benchmarks/compile.py --models demo --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import mpq
from mpq.apply import QuantizedWeightCache, applied
from mpq.compile import CompileOptions, compile_model
from mpq.environment import hardware, versions
from mpq.evaluate import evaluate_model
from mpq.formats import get_format
from mpq.models import load_model
from mpq.tasks import make_task

# Budgets between all-INT4 and all-FP16 of each demo (see each run's summary.json for both ends).
DEFAULT_BUDGETS = {"demo": "8MB", "minilm": "70MB"}


def bench_model(name: str, budget: str, out: Path, trials: int) -> dict:
    start = time.time()
    summary = compile_model(CompileOptions(model=name, max_mem=budget, out=out / name, trials=trials))
    compile_seconds = time.time() - start
    loaded = load_model(name)
    task = make_task(loaded.task, loaded.tokenizer, None)
    task.prepare_eval(loaded.model)
    rows = [{"config": "unquantised", "kind": "baseline", **evaluate_model(loaded.model, loaded.task, task)}]
    cache = QuantizedWeightCache(loaded.model)
    for uniform in summary["uniform"]:
        plan = {layer: get_format(fmt) for layer, fmt in uniform["formats"].items()}
        with applied(loaded.model, plan, cache):
            rows.append({"config": f"all-{uniform['name']}", "kind": "uniform",
                         **evaluate_model(loaded.model, loaded.task, task)})
    for config in summary["configs"]:
        model = mpq.load(out / name / "configs" / config["name"])
        rows.append({"config": config["name"], "kind": "pareto", **evaluate_model(model, loaded.task, task)})
    return {"model": name, "budget": summary["budget"], "smallest": summary["smallest"],
            "compile_seconds": round(compile_seconds, 1), "stage_seconds": summary["seconds"], "rows": rows}


def _quality(row: dict) -> str:
    q = row["quality"]
    return f"ppl {q['ppl']:.3f} (text {q['ppl_text']:.2f}, code {q['ppl_code']:.2f})" if "ppl" in q else \
        f"cos {q['mean_cosine']:.5f}, NN agree {q['nn_agreement']:.3f}"


def _speed(row: dict) -> str:
    s = row["speed"]
    if "decode_tokens_per_s" in s:
        return f"decode {s['decode_tokens_per_s']:.1f} tok/s, prefill {s['prefill_tokens_per_s']:.0f} tok/s"
    return f"{s['sentences_per_s']:.1f} sentences/s"


def print_table(result: dict) -> None:
    print(f"\n## {result['model']}: budget {result['budget'] / 1e6:.2f} MB, smallest {result['smallest'] / 1e6:.2f} MB, "
          f"compile {result['compile_seconds']} s")
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items()))
    print("| config | kind | MB | quality | speed |\n|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['config']} | {row['kind']} | {row['bytes'] / 1e6:.3f} | {_quality(row)} | {_speed(row)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,minilm")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--work", type=Path, help="where the compile outputs go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse cached sensitivity tables (default: measure afresh)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mpq-bench-"))
    if not args.reuse:  # stage times must include the measurement, so start from an empty cache
        os.environ["MPQ_CACHE_DIR"] = str(work / "cache")
    results = {"hardware": hardware(), "versions": versions(), "torch_threads": torch.get_num_threads(), "models": []}
    for name in args.models.split(","):
        result = bench_model(name, DEFAULT_BUDGETS.get(name, "8MB"), work, args.trials)
        results["models"].append(result)
        print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nhardware: {results['hardware']}\nwrote {args.out / 'compile.json'}; compile outputs in {work}")


if __name__ == "__main__":
    main()
