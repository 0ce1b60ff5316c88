"""Does mixed precision beat what users would pick instead? Every contender and mpq's Pareto set, in
one process, through one evaluation function (mpq.evaluate.evaluate_model).

Contenders: the original model in fp32 / bf16 / fp16; bitsandbytes LLM.int8 and NF4 (when
installed: pip install 'mpq-compiler[bnb]'); uniform INT8 and INT4-g128 by each method; the folk
rule "first and last blocks (and lm_head) at FP16 (or INT8), the rest INT4"; and, at budgets from
uniform INT4 to uniform INT8, 20 random per-layer assignments of the same bytes. mpq's Pareto set
comes from `mpq compile` with INT4 at group sizes 32, 64, 128 and per-channel, asymmetric and (at
32, 64, 128) symmetric, among the candidate formats, and for an untied embedding table INT4 with
the calibration text's 256/512/1024 most frequent tokens' rows also at INT8 (+hotK, mpq.hot_rows),
run with no budget and at each budget the targets name.
Then the issue's targets, checked on the numbers: at each budget mpq's best config of no more bytes
against the rule and the random median; the share of the INT4 -> INT8 quality gap recovered with
10% of the extra bytes; mixed vs uniform INT4-g128 at its own size; the smallest config within a 1%
quality drop against uniform INT8; and whether any contender dominates an mpq config.

    python benchmarks/pareto.py demo                 # one model; writes results/pareto_demo.{json,md,png}
    python benchmarks/pareto.py demo minilm --methods rtn,gptq,awq --random 20
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns of a bf16 -> fp16 cast on every int8 matmul

import torch

import mpq
from mpq.acceptance import Criteria, failures
from mpq.apply import QuantizedWeightCache, applied
from mpq.compile import DEFAULT_SAMPLES, CompileOptions, compile_model
from mpq.contenders import BNB_MODES, load_original, random_plans, rule_plan
from mpq.environment import hardware, versions
from mpq.errors import MpqError
from mpq.evaluate import evaluate_model
from mpq.formats import get_format, parse_formats
from mpq.fusion import fusion_groups
from mpq.memory import MemoryModel, memory_model
from mpq.methods import AUTO, method_of, method_quantizer
from mpq.models import CAUSAL_LM, DTYPES, load_model
from mpq.profile import example_inputs
from mpq.search import uniform_plan
from mpq.tasks import calibration_text, make_task
from mpq.trace import trace_model

# Symmetric groups drop the zero point (2 bytes a group), so g32-sym costs what g64 does and g64-sym
# what g128 does: finer groups at the same bytes, which the search weighs layer by layer.
FORMATS = ("fp16,int8,int4-g32,int4-g64,int4-g128,int4-pc,int4-g32-sym,int4-g64-sym,int4-g128-sym,"
           "int4-pc+hot256,int4-pc+hot512,int4-pc+hot1024,int4-g64-sym+hot512")
RANDOM_FRACTIONS = (0.1, 0.25, 0.5, 0.75)  # budgets, as the share of the way from uniform INT4-g128 to INT8 bytes
SAMPLES = DEFAULT_SAMPLES  # the contenders calibrate as compile does


def loss(row: dict) -> float:
    return row["quality"]["loss"]


def display(row: dict) -> float:
    q = row["quality"]
    return q["ppl"] if "ppl" in q else q["mean_cosine"]


def throughput(row: dict) -> float | None:
    s = row.get("speed") or {}
    return s.get("decode_tokens_per_s", s.get("sentences_per_s"))


class Bench:
    """One model's contenders, all evaluated by `evaluate_model` against the same task."""

    def __init__(self, name: str, method: str, seed: int, dtype: str | None = None) -> None:
        self.name, self.method, self.seed, self.dtype = name, method, seed, dtype
        self.loaded = load_model(name)
        # Reported on the test half of the held-out data: compile chose its configs on the other half.
        self.task = make_task(self.loaded.task, self.loaded.tokenizer, calibration_text(None),
                              SAMPLES[self.loaded.task], 128, split="test")
        self.task.prepare_eval(self.loaded.model)  # encoders: fidelity to the model as stored, whatever the cast
        self.stored = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.loaded.model.dtype]
        if dtype is not None:
            # As `mpq compile --dtype` loads it, so the plans mpq builds (uniform, rule, random) start from the
            # same model: from_pretrained at the dtype, not .to(dtype), which would also round buffers such as
            # rotary inv_freq that transformers keeps in fp32 (0.06% perplexity on the demo).
            self.loaded = load_model(name, DTYPES[dtype])
        self.graph = trace_model(self.loaded.model, example_inputs(self.loaded.task, self.loaded.model.config.vocab_size))
        self.groups = self.graph.shared_input_groups()
        self.has_bias = {layer.name: layer.has_bias for layer in self.graph.layers}
        self.formats = parse_formats(FORMATS)
        self.caches: dict[str, QuantizedWeightCache] = {}
        self.rows: list[dict] = []

    def cache(self, method: str) -> QuantizedWeightCache:
        if method not in self.caches:
            quantizer = method_quantizer(method, self.loaded.model, self.graph.layers, self.groups, self.formats, self.task)
            self.caches[method] = QuantizedWeightCache(self.loaded.model, quantizer)
        return self.caches[method]

    def memory(self, method: str) -> MemoryModel:
        return memory_model(self.loaded.model, self.graph.layers, self.formats, method)

    def run_plan(self, plan: dict[str, str], method: str, with_speed: bool) -> dict:
        specs = {layer: get_format(fmt) for layer, fmt in plan.items()}
        with applied(self.loaded.model, specs, self.cache(method), fusion_groups(plan, self.groups, self.has_bias)):
            return evaluate_model(self.loaded.model, self.loaded.task, self.task, with_speed)

    def add(self, name: str, kind: str, result: dict, **extra) -> dict:
        row = {"contender": name, "kind": kind, **extra, **result}
        self.rows.append(row)
        print(f"  {name:<42} {row['bytes'] / 1e6:8.3f} MB  quality {display(row):.4f}"
              + (f"  {throughput(row):.1f}/s" if throughput(row) else ""), flush=True)
        return row

    def own_process_peak(self, *target: str) -> int | None:
        """Peak RSS of `mpq eval TARGET --no-speed` in a process of its own: loading and running the
        contender alone (the same evaluation; memory cannot be told apart inside this process)."""
        proc = subprocess.run([sys.executable, "-m", "mpq.cli", "eval", *target, "--device", "cpu", "--no-speed",
                               "--split", "test"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  mpq eval {' '.join(target)} failed: {proc.stderr.strip().splitlines()[-1:]}")
            return None
        return json.loads(proc.stdout)["peak_rss_bytes"]

    def originals(self, bnb: bool) -> None:
        for dtype in ("fp32", "bf16", "fp16"):
            loaded = load_original(self.name, dtype=dtype)
            self.add(f"original {dtype}", "original", evaluate_model(loaded.model, loaded.task, self.task),
                     peak_rss_own_process=self.own_process_peak(self.name, "--dtype", dtype))
            del loaded
            gc.collect()
        for mode in BNB_MODES if bnb else ():
            start = time.time()
            try:
                loaded = load_original(self.name, bnb=mode)
            except MpqError as exc:
                print(f"  bitsandbytes {mode}: skipped ({exc})")
                continue
            self.add(f"bitsandbytes {mode}", "bnb", evaluate_model(loaded.model, loaded.task, self.task),
                     seconds=round(time.time() - start, 1), peak_rss_own_process=self.own_process_peak(self.name, "--bnb", mode))
            del loaded
            gc.collect()

    def plans(self, methods: list[str]) -> None:
        done: set[tuple[str, str]] = set()
        for method in dict.fromkeys([*methods, self.method]):  # mpq's own method is the targets' yardstick
            costs = self.memory(method).layer_bytes
            for fmt in ("int8", "int4-g128"):
                rounding = method_of(method, get_format(fmt))  # "int8=rtn,int4=gptq" rounds int8 as rtn does
                if (fmt, rounding) in done:
                    continue
                done.add((fmt, rounding))
                self.add(f"uniform {fmt} ({rounding})", "uniform", self.run_plan(uniform_plan(costs, fmt), method, True),
                         method=rounding, format=fmt)
        costs = self.memory(self.method).layer_bytes
        for high in ("fp16", "int8"):
            plan = rule_plan(self.loaded.model, costs, high=high, low="int4-g128")
            self.add(f"first/last + head {high}, rest int4-g128 ({self.method})", "rule",
                     self.run_plan(plan, self.method, True), method=self.method, high=high)

    def budgets(self) -> tuple[int, int]:
        """Bytes of uniform INT4-g128 and of uniform INT8 (mpq's method)."""
        memory = self.memory(self.method)
        return tuple(memory.total(uniform_plan(memory.layer_bytes, name)) for name in ("int4-g128", "int8"))

    def mpq_set(self, work: Path, trials: int) -> dict:
        """mpq compiles at the budgets the targets name (uniform INT4-g128's bytes, and 10/25/50/75% of
        the way to INT8's) and with no budget; measurements are reused from the first compile on, and
        each compile refines its own budget. Every config emitted is a row."""
        low, high = self.budgets()
        budgets = [None, low] + [int(low + f * (high - low)) for f in RANDOM_FRACTIONS]
        seconds, seen, calib = [], set(), []
        for index, budget in enumerate(budgets):
            start = time.time()
            out = work / self.name / f"budget{index}"
            summary = compile_model(CompileOptions(model=self.name, out=out, formats=FORMATS, method=self.method,
                                                   dtype=self.dtype, max_mem=budget, trials=trials, seed=self.seed, progress=False))
            seconds.append(round(time.time() - start, 1))
            if self.method == AUTO:  # resolved on the validation half by the first compile; the rest reuse it
                self.method = summary["method"]
            calib.append(calibration_recovery(summary))
            for config in summary["configs"]:
                plan = json.loads((out / "configs" / config["name"] / "mpq.json").read_text())["plan"]["formats"]
                key = tuple(sorted(plan.items()))
                if key in seen:
                    continue
                seen.add(key)
                folder = out / "configs" / config["name"]
                model = mpq.load(folder)
                self.add(f"mpq {config['name']}" + ("" if budget is None else f" (budget {budget / 1e6:.3f} MB)"), "mpq",
                         evaluate_model(model, self.loaded.task, self.task), counts=config["counts"],
                         peak_rss_own_process=self.own_process_peak(str(folder)) if budget is None else None)
                del model
        return {"budgets": budgets, "seconds": seconds, "calibration_recovery": calib}

    def random_budgets(self, count: int) -> list[dict]:
        memory = self.memory(self.method)
        low, high = self.budgets()
        out = []
        for fraction in RANDOM_FRACTIONS:
            budget = int(low + fraction * (high - low))
            plans = random_plans(memory.layer_bytes, budget, count, seed=self.seed, tied=self.groups,
                                 fixed_bytes=memory.fixed_bytes)
            results = [{"bytes": memory.total(plan),
                        **self.run_plan(plan, self.method, False)} for plan in plans]
            losses = [loss(r) for r in results]
            out.append({"fraction": fraction, "budget": budget, "bytes": [r["bytes"] for r in results],
                        "losses": losses, "median_loss": statistics.median(losses),
                        "median_display": statistics.median(display(r) for r in results)})
            print(f"  random x{count} at {budget / 1e6:.3f} MB: median quality {out[-1]['median_display']:.4f}", flush=True)
        return out


def calibration_recovery(summary: dict) -> dict | None:
    """On calibration data (what the search optimises), the share of the uniform INT4-g128 -> INT8
    divergence gap that the compile's measured best at its budget closes: if this is small, no
    choice of formats at that budget closes much of the held-out gap either."""
    refinement = summary.get("refinement")
    divergence = {u["name"]: u["metrics"]["calib_divergence"] for u in summary["uniform"]}
    if not refinement or not {"int4-g128", "int8"} <= divergence.keys():
        return None
    gap = divergence["int4-g128"] - divergence["int8"]
    best = refinement["best"]["measured"]
    return {"budget": summary["budget"], "best_bytes": refinement["best"]["bytes"], "best": best,
            "int4-g128": divergence["int4-g128"], "int8": divergence["int8"],
            "recovered": (divergence["int4-g128"] - best) / gap if gap > 0 else None}


def mpq_best(rows: list[dict], budget: float) -> dict | None:
    fits = [r for r in rows if r["kind"] == "mpq" and r["bytes"] <= budget]
    return min(fits, key=loss) if fits else None


def _dominates(a: dict, b: dict) -> bool:
    """a is no larger and no worse than b, and better in one of the two."""
    return a["bytes"] <= b["bytes"] and loss(a) <= loss(b) and (a["bytes"] < b["bytes"] or loss(a) < loss(b))


def check_targets(rows: list[dict], randoms: list[dict], method: str, baseline: dict) -> dict:
    """The issue's targets, from the measured rows (lower `loss` is better for every task)."""
    uniform = {r["format"]: r for r in rows
               if r["kind"] == "uniform" and r["method"] == method_of(method, get_format(r["format"]))}
    int4, int8 = uniform["int4-g128"], uniform["int8"]
    per_budget = []
    for entry in randoms:
        best = mpq_best(rows, entry["budget"])
        per_budget.append({"budget": entry["budget"], "mpq_best": best and best["contender"],
                           "mpq_loss": best and loss(best), "random_median_loss": entry["median_loss"],
                           "beats_random": bool(best and loss(best) < entry["median_loss"])})
    rules = []
    for rule in (r for r in rows if r["kind"] == "rule"):
        best = mpq_best(rows, rule["bytes"])
        rules.append({"rule": rule["contender"], "bytes": rule["bytes"], "rule_loss": loss(rule),
                      "mpq_best": best and best["contender"], "mpq_loss": best and loss(best),
                      "beats_rule": bool(best and loss(best) < loss(rule))})
    tenth = int4["bytes"] + 0.1 * (int8["bytes"] - int4["bytes"])
    best10 = mpq_best(rows, tenth)
    gap = loss(int4) - loss(int8)
    recovered = None if best10 is None or gap <= 0 else (loss(int4) - loss(best10)) / gap
    at_int4 = mpq_best(rows, int4["bytes"])
    passing = [r for r in rows if r["kind"] == "mpq" and not failures(r["bytes"], r["quality"], baseline,
                                                                       Criteria(max_quality_drop=0.01))]
    smallest = min(passing, key=lambda r: r["bytes"]) if passing else None
    mpq_rows = [r for r in rows if r["kind"] == "mpq"]
    front = [r for r in mpq_rows if not any(_dominates(o, r) for o in mpq_rows)]
    dominated = []
    for r in front:
        for other in rows:
            if other["kind"] != "mpq" and _dominates(other, r):
                dominated.append({"mpq": r["contender"], "by": other["contender"]})
    return {
        "method": method,
        "random": per_budget,
        "rule": rules,
        "recovery_at_10pct_extra_bytes": {"budget": tenth, "mpq_best": best10 and best10["contender"],
                                          "recovered": recovered, "target": 0.5},
        "at_uniform_int4_bytes": {"uniform_loss": loss(int4), "mpq_best": at_int4 and at_int4["contender"],
                                  "mpq_loss": at_int4 and loss(at_int4),
                                  "beats_uniform_int4": bool(at_int4 and loss(at_int4) < loss(int4))},
        "one_percent_drop": {"smallest_passing": smallest and smallest["contender"],
                             "bytes": smallest and smallest["bytes"], "uniform_int8_bytes": int8["bytes"],
                             "smaller_than_int8_by": smallest and 1 - smallest["bytes"] / int8["bytes"], "target": 0.15},
        "mpq_front": [r["contender"] for r in sorted(front, key=lambda r: r["bytes"])],
        "dominated_mpq_configs": dominated,
    }


def markdown(result: dict) -> str:
    rows, t = result["rows"], result["targets"]
    encoder = result["task"] != CAUSAL_LM
    reference = next(r for r in rows if r["kind"] == "original" and r["contender"] == f"original {result['stored_dtype']}")
    base_tp = throughput(reference)
    lines = [f"# {result['model']}: mpq against the alternatives", "",
             f"Hardware: {result['hardware']}. Held-out data: "
             + ("256 held-out sentences (fidelity to the fp32 original)" if encoder else
                "24 x 256 tokens of text and 24 x 256 of code (mpq corpus, heldout split)")
             + ", the test half: compile chose its configs on the other (validation) half, so mpq's rows are not "
               "judged on the data they were picked on. Speed: "
             + ("sentences/s over the held-out batches" if encoder else "greedy decode of 32 tokens after a 32-token prompt, "
                "and a 256-token prefill, batch 1") + ", this machine; speedup over the original as stored. Peak RSS: "
             "`mpq eval CONTENDER --no-speed` in a process of its own (bytes on the line for plans built in this "
             "process are exact, their memory is not measured)" + (", the fp32 original loaded beside it for "
                                                                  "the fidelity reference" if encoder else "") + "."
             + (f" mpq's compiles and the plans built here (uniform, rule, random) start from the model cast to "
                f"{result['dtype']} (`--dtype {result['dtype']}`): what is not quantised is stored in it."
                if result.get("dtype", result["stored_dtype"]) != result["stored_dtype"] else ""), "",
             "| contender | kind | MB | " + ("mean cosine | NN agreement" if encoder else "ppl | ppl text | ppl code")
             + " | " + ("sentences/s" if encoder else "decode tok/s | prefill tok/s") + " | speedup | peak RSS MB, own process |",
             "|---|---|---|---|---|" + ("" if encoder else "---|") + "---|---|---|" + ("" if encoder else "---|")]
    for r in rows:
        q, s = r["quality"], r.get("speed") or {}
        quality = f"{q['mean_cosine']:.4f} | {q['nn_agreement']:.3f}" if encoder else \
            f"{q['ppl']:.3f} | {q['ppl_text']:.3f} | {q['ppl_code']:.3f}"
        speed = f"{s.get('sentences_per_s', 0):.1f}" if encoder else \
            f"{s.get('decode_tokens_per_s', 0):.1f} | {s.get('prefill_tokens_per_s', 0):.0f}"
        speedup = f"{throughput(r) / base_tp:.2f}x" if throughput(r) and base_tp else "-"
        peak = f"{r['peak_rss_own_process'] / 1e6:.0f}" if r.get("peak_rss_own_process") else "-"
        lines.append(f"| {r['contender']} | {r['kind']} | {r['bytes'] / 1e6:.3f} | {quality} | {speed} | {speedup} | {peak} |")
    name = "1 - cosine" if encoder else "ppl" + ("" if result["eval_data"] == "both" else f" ({result['eval_data']})")
    auto = " (`--method auto`, resolved by the first compile on the validation half)" if result.get("method_requested") == AUTO else ""
    lines += ["", f"Targets (quality as {name}; lower is better; mpq method {t['method']}{auto}):", "",
              "| budget MB | mpq best at <= budget | its " + name + f" | random median ({result['random_count']}) | mpq better |",
              "|---|---|---|---|---|"]
    for p in t["random"]:
        lines.append(f"| {p['budget'] / 1e6:.3f} | {p['mpq_best']} | {_num(p['mpq_loss'])} | {p['random_median_loss']:.4f} | "
                     f"{'yes' if p['beats_random'] else 'NO'} |")
    lines += ["", "| rule | MB | rule " + name + " | mpq best at <= its bytes | its " + name + " | mpq better |",
              "|---|---|---|---|---|---|"]
    for p in t["rule"]:
        lines.append(f"| {p['rule']} | {p['bytes'] / 1e6:.3f} | {p['rule_loss']:.4f} | {p['mpq_best']} | {_num(p['mpq_loss'])} | "
                     f"{'yes' if p['beats_rule'] else 'NO'} |")
    rec, at4, one = t["recovery_at_10pct_extra_bytes"], t["at_uniform_int4_bytes"], t["one_percent_drop"]
    lines += ["",
              f"- 10% of the INT4 -> INT8 extra bytes ({rec['budget'] / 1e6:.3f} MB): {rec['mpq_best']} recovers "
              f"{_pct(rec['recovered'])} of the quality gap (target >= 50%)" + _calibration_note(result, rec["budget"]),
              f"- at uniform INT4-g128's bytes: {at4['mpq_best']} {_num(at4['mpq_loss'])} vs uniform {at4['uniform_loss']:.4f} "
              f"({'better' if at4['beats_uniform_int4'] else 'NOT better'})",
              f"- smallest config within a 1% quality drop: {one['smallest_passing']} "
              f"({_pct(one['smaller_than_int8_by'])} smaller than uniform INT8; target >= 15%)",
              f"- mpq's Pareto set over all its configs: {len(t['mpq_front'])} configs; of these, dominated by a "
              f"contender (bytes and quality): {_dominated_summary(t)}", ""]
    return "\n".join(lines)


def _calibration_note(result: dict, budget: float) -> str:
    entries = [e for e in result.get("compile", {}).get("calibration_recovery", []) if e and abs(e["budget"] - budget) <= 1]
    if not entries or entries[0]["recovered"] is None:
        return ""
    return (f"; on calibration data, which the search optimises, the compile at that budget closes "
            f"{_pct(entries[0]['recovered'])} of the divergence gap")


def _dominated_summary(t: dict) -> str:
    """Each contender that dominates some of mpq's front, with how many and which."""
    by: dict[str, list[str]] = {}
    for d in t["dominated_mpq_configs"]:
        by.setdefault(d["by"], []).append(d["mpq"])
    if not by:
        return "none"
    return "; ".join(f"{other} dominates {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                     for other, names in by.items())


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    reference = next(r for r in rows if r["contender"] == f"original {result['stored_dtype']}")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"original": ("tab:gray", "D"), "bnb": ("tab:purple", "^"), "uniform": ("tab:red", "s"),
              "rule": ("tab:orange", "v"), "mpq": ("tab:blue", "o")}
    for ax, x, label in ((axes[0], lambda r: r["bytes"] / 1e6, "resident weight bytes (MB)"),
                         (axes[1], lambda r: throughput(r) / throughput(reference), "speedup over the original (measured)")):
        for kind, (color, marker) in styles.items():
            pts = [r for r in rows if r["kind"] == kind and throughput(r)]
            if not pts:
                continue
            ax.scatter([x(r) for r in pts], [display(r) for r in pts], c=color, marker=marker, label=kind, zorder=3)
        for entry in result["random"] if ax is axes[0] else ():
            ax.scatter([b / 1e6 for b in entry["bytes"]], [_display_of_loss(result, v) for v in entry["losses"]],
                       c="0.75", s=10, label="random assignments" if entry is result["random"][0] else None)
        front = _front([r for r in rows if throughput(r)], x, result["task"] != CAUSAL_LM, ax is axes[1])
        ax.plot([x(r) for r in front], [display(r) for r in front], "-", c="tab:blue", alpha=0.6, label="Pareto front (all)")
        ax.set_xlabel(label)
        ax.set_ylabel("mean cosine" if result["task"] != CAUSAL_LM else "held-out perplexity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: mpq configs and the alternatives")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _display_of_loss(result: dict, value: float) -> float:
    return 1.0 - value if result["task"] != CAUSAL_LM else value


def _front(rows: list[dict], x, higher_is_better: bool, larger_x_is_better: bool) -> list[dict]:
    """Points no other beats on both axes, in order of x."""
    ordered = sorted(rows, key=lambda r: -x(r) if larger_x_is_better else x(r))
    front, best = [], None
    for r in ordered:
        if best is None or (display(r) > best if higher_is_better else display(r) < best):
            front.append(r)
            best = display(r)
    return sorted(front, key=x)


def bench_model(name: str, methods: list[str], method: str, count: int, trials: int, bnb: bool, work: Path,
                seed: int, dtype: str | None = None) -> dict:
    start = time.time()
    requested = method
    bench = Bench(name, method, seed, dtype)
    print(f"\n## {name}", flush=True)
    bench.originals(bnb)
    compile_info = bench.mpq_set(work, trials)  # first: it resolves --method auto for the plans below
    method = bench.method
    bench.plans(methods)
    randoms = bench.random_budgets(count)
    stored = bench.stored
    baseline = next(r for r in bench.rows if r["contender"] == f"original {stored}")["quality"]
    return {"model": name, "task": bench.loaded.task, "stored_dtype": stored, "eval_data": "both", "method": method,
            "method_requested": requested,
            "dtype": dtype or stored, "formats": FORMATS, "random_count": count, "compile": compile_info, "rows": bench.rows, "random": randoms,
            "targets": check_targets(bench.rows, randoms, method, baseline), "hardware": hardware(),
            "versions": versions(), "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["demo"])
    parser.add_argument("--methods", default="rtn,gptq,awq", help="methods of the uniform contenders")
    parser.add_argument("--method", default="gptq", help="mpq's method (also the rule's and the random plans'); "
                        "auto: as mpq compile resolves it (per format, on the validation half)")
    parser.add_argument("--random", type=int, default=20, help="random assignments per budget (default 20)")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--no-bnb", action="store_true", help="leave out the bitsandbytes contenders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="mpq's compiles (--dtype) and the plans it builds start from the model cast to this "
                             "(default: as stored); the originals and bitsandbytes rows are as they are")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, help="where mpq's compile outputs go (default: a temporary folder)")
    parser.add_argument("--render", action="store_true", help="only redraw the .md and .png from the saved JSON")
    args = parser.parse_args()
    if args.render:
        for name in args.models:
            result = json.loads((args.out / f"pareto_{name}.json").read_text())
            (args.out / f"pareto_{name}.md").write_text(markdown(result))
            plot(result, args.out / f"pareto_{name}.png")
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mpq-pareto-"))
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        result = bench_model(name, args.methods.split(","), args.method, args.random, args.trials, not args.no_bnb,
                             work, args.seed, args.dtype)
        (args.out / f"pareto_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"pareto_{name}.md").write_text(markdown(result))
        plot(result, args.out / f"pareto_{name}.png")
        print(markdown(result))
        print(f"wrote {args.out}/pareto_{name}.json, .md, .png ({result['seconds']} s)")


if __name__ == "__main__":
    main()
