"""`mpq compile`: trace -> calibrate -> measure -> search -> evaluate -> emit, plain data between stages."""

from __future__ import annotations

import logging
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mpq.additivity import additivity_check
from mpq.acceptance import PREFERENCES, Criteria, failures, recommend
from mpq.apply import QuantizedWeightCache, applied
from mpq.checkpoint import save_config
from mpq import cpu_matmul
from mpq.environment import hardware, versions
from mpq.errors import MpqError
from mpq.evaluate import PeakMemory
from mpq.experts import coverage, describe_routed, expert_projections, routed_tokens
from mpq.fingerprint import data_fingerprint, model_fingerprint
from mpq.formats import get_format, parse_formats
from mpq.fusion import fusion_groups
from mpq.io import write_json_atomic
from mpq.method_choice import choose_method
from mpq.methods import AUTO, calibrates, check_method, describe, rounded_to_nearest
from mpq.latency import (LatencyModel, Regime, find_profile, make_regime, measure_plans, models_dir, parse_seconds, profile,
                         profile_key)
from mpq.memory import (float_dtype_of, format_size, kept_as_stored, kept_summary, kept_to_json, memory_model, parse_size,
                        resident_bytes)
from mpq.models import CAUSAL_LM, DTYPES, GENERATIVE, SEQ2SEQ_LM, LoadedModel, decoder_start_of, load_model, model_device
from mpq.plan import Plan
from mpq.refine import REFINE_TRIALS, refine_at_budget
from mpq.selection import (chosen_for_measuring, emitted_front, latency_fields, latency_limit, latency_summary,
                           plan_key, time_step, within_noise)
from mpq.report import draw_heatmap, draw_pareto, draw_speedup, heatmap_markdown, write_report
from mpq.spill import spilled_bytes, spilling
from mpq.search import Candidate, evaluate_plan, exact_front, open_storage, search_plans, uniform_plan
from mpq.search.measured import plan_key as layer_plan_key  # a plan dict's key (selection.plan_key: a Candidate's)
from mpq.sensitivity import VERSION as SENSITIVITY_VERSION
from mpq.sensitivity import (MEASURE_BACKEND, MEASURES, SIGNALS, SensitivityTable, cache_dir, find_cached, layers_run,
                             measurement_model, never_measured)
from mpq.tasks import calibration_text, make_task
from mpq.trace import ModelGraph, embedding_scale, trace_model

log = logging.getLogger(__name__)
# About 4k calibration tokens either way: 32 x 128-token windows, or 256 sentences (~16 tokens each).
# 128 sentences (2k tokens) left GPTQ's INT4-g128 on all-MiniLM at 1 - cosine 0.0157 on held-out
# sentences, 256 at 0.0136, 512 at 0.0130 (for 3x the compile time).
DEFAULT_SAMPLES = {CAUSAL_LM: 32, SEQ2SEQ_LM: 32, "encoder": 256}
DEFAULT_SEQ_LEN = {CAUSAL_LM: 128, SEQ2SEQ_LM: 128, "encoder": 128}  # a seq2seq window: half source, half target


@dataclass
class CompileOptions:
    model: str = "demo"
    out: Path = Path("mpq-out")
    max_mem: str | int | None = None  # None: the unquantised size (no memory pressure)
    formats: str = "fp16,int8,int4"
    group_size: int = 128
    int4_symmetric: bool = False
    calib: Path | None = None
    samples: int | None = None
    seq_len: int | None = None
    trials: int = 300
    seed: int = 0
    max_configs: int = 12  # mixed configs measured on held-out data (uniform ones come on top)
    max_quality_drop: float | None = None  # causal LM: perplexity ratio - 1 (0.01 = 1%); encoder: cosine drop
    tie: bool = True  # layers reading one input (q/k/v, gate/up) take one format, so kernels fuse them
    embeddings: bool = True  # the input embedding table is a layer of the plan (unless tied to the head)
    keep: str | None = None  # a regular expression: the layers whose names it matches stay as stored
    storage: str | None = None  # Optuna storage: None -> OUT/study.journal; "memory"; or a database URL
    sensitivity: str = "kl"  # the signal: "kl" (output divergence), "local" (layer output error) or "fisher"
    method: str = "rtn"  # how weights are rounded: "rtn", "gptq" or "awq", or per format "int8=rtn,int4=gptq" (mpq.methods)
    refine: int = REFINE_TRIALS  # trials of the measured study at the budget (mpq.refine); 0: none
    latency: bool = True  # profile layer latencies and search on predicted step time too (mpq.latency)
    regime: str | None = None  # "decode" | "prefill"; None: decode for causal LMs, prefill for encoders
    batch: int = 1
    length: int = 128  # prefill: tokens per sequence; decode: tokens in the KV cache
    max_latency: str | float | None = None  # hard cap on predicted seconds per step ("25ms")
    min_speedup: float | None = None  # hard floor on predicted speedup over the unquantised model
    prefer: str = "smallest"  # which passing config to recommend: "smallest" or "fastest" (mpq.acceptance)
    dtype: str | None = None  # "fp32" | "bf16" | "fp16": cast the model on load (it is then the baseline, and
    # what is not quantised stays in it); None: as stored
    eval_data: str = "both"  # causal LMs: the held-out perplexity targeted ("text", "code" or "both"), and the
    # default calibration text's kind
    spill: bool = True  # hold the quantised tensors, reference outputs and float32 copies in files under OUT,
    # mapped back (mpq.spill): the compile's RAM is then mostly the model's; False: all in memory
    progress: bool = True


def _example_inputs(task, loaded: LoadedModel) -> dict:
    if loaded.task in GENERATIVE:
        return task.model_inputs(task.calib_ids[:1, :16])
    batch = task.calib_batches[0]
    return {key: value[:2] for key, value in batch.items()}


def _sensitivity(opts: CompileOptions, loaded: LoadedModel, work, graph: ModelGraph, formats, task, calib_info: dict,
                 cache: QuantizedWeightCache, method: str, reference) -> tuple[SensitivityTable, bool]:
    calib_data = task.calib_ids if loaded.task in GENERATIVE else [b["input_ids"] for b in task.calib_batches]
    key = data_fingerprint(model_fingerprint(loaded.model), calib_data, [f.name for f in formats], task.metric,
                           [layer.name for layer in graph.layers], SENSITIVITY_VERSION, opts.sensitivity, method)
    table = find_cached(key, Path(opts.out) / "sensitivity.json")
    reused = table is not None
    if table is None:
        given = {"reference": reference} if opts.sensitivity == "kl" else {}  # the divergences' reference, taken once
        table = MEASURES[opts.sensitivity](loaded.model, work, graph.layers, formats, task, key, calib_info, cache,
                                           opts.progress, **given)
        try:
            table.save(cache_dir() / f"{key}.json")
        except OSError as exc:  # a read-only home still compiles; only reuse is lost
            log.warning("cannot write the sensitivity cache (%s)", exc)
    table.save(Path(opts.out) / "sensitivity.json")
    return table, reused


def _latency(opts: CompileOptions, loaded: LoadedModel, graph: ModelGraph, formats, regime: Regime,
             groups: list[list[str]]) -> LatencyModel:
    key = profile_key(model_fingerprint(loaded.model), regime, formats, groups, model_device(loaded.model),
                      [layer.name for layer in graph.layers])
    latency = find_profile(key, Path(opts.out) / "latency.json")
    if latency is None:
        latency = profile(loaded.model, loaded.task, graph.layers, formats, regime, groups, progress=opts.progress, key=key)
        try:
            if latency.consistent:
                latency.save(models_dir() / f"{key}.json")
        except OSError as exc:
            log.warning("cannot write the latency cache (%s)", exc)
    latency.save(Path(opts.out) / "latency.json")
    return latency


def compile_model(opts: CompileOptions) -> dict:
    """Run the whole pipeline; returns the summary (also written as OUT/summary.json), with each
    stage's time and peak resident memory (sampled every 20 ms). Unless `opts.spill` is off, the
    tensors the compile makes and keeps are held in files under OUT and mapped back (mpq.spill)."""
    with PeakMemory(interval_s=0.02) as resident, spilling(opts.out) if opts.spill else nullcontext():
        return _compile_model(opts, resident)


def _compile_model(opts: CompileOptions, resident: PeakMemory) -> dict:
    seconds: dict[str, float] = {}
    peaks: dict[str, tuple[int | None, int | None]] = {}  # stage -> (peak RSS, peak anonymous)
    clock = time.time()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.time() - clock, 2)
        peaks[stage] = resident.take()
        clock = time.time()

    out = Path(opts.out)
    # Cheap checks of the user's input first, before minutes of loading and measuring.
    if opts.sensitivity not in SIGNALS:
        raise MpqError(f"--sensitivity {opts.sensitivity!r} is not one of {', '.join(SIGNALS)}")
    try:
        formats = parse_formats(opts.formats, opts.group_size, opts.int4_symmetric)
        check_method(opts.method, formats)
    except ValueError as exc:
        raise MpqError(str(exc)) from exc
    requested_budget = parse_size(opts.max_mem) if opts.max_mem is not None else None
    max_latency = parse_seconds(opts.max_latency) if opts.max_latency is not None else None
    if opts.min_speedup is not None and opts.min_speedup <= 0:
        raise MpqError(f"--min-speedup must be positive, got {opts.min_speedup}")
    if opts.prefer not in PREFERENCES:
        raise MpqError(f"--prefer {opts.prefer!r}: use one of {', '.join(PREFERENCES)}")
    if not opts.latency and (max_latency is not None or opts.min_speedup is not None):
        raise MpqError("--max-latency and --min-speedup need the latency profile: drop --no-latency")
    if opts.keep is not None:
        try:
            re.compile(opts.keep)
        except re.error as exc:
            raise MpqError(f"--keep {opts.keep!r} is not a regular expression ({exc}): e.g. 'lm_head|layers\\.0\\.'") from exc
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise MpqError(f"--dtype {opts.dtype!r}: use one of {', '.join(DTYPES)}")
    loaded = load_model(opts.model, DTYPES[opts.dtype] if opts.dtype else "auto")
    regime = make_regime(opts.regime, opts.batch, opts.length, loaded.task,
                         getattr(loaded.model.config, "max_position_embeddings", None)) if opts.latency else None
    samples = opts.samples or DEFAULT_SAMPLES[loaded.task]
    seq_len = opts.seq_len or DEFAULT_SEQ_LEN[loaded.task]
    calib = calibration_text(opts.calib, opts.eval_data)
    task = make_task(loaded.task, loaded.tokenizer, calib, samples, seq_len, target=opts.eval_data,
                     decoder_start=decoder_start_of(loaded.model))
    calib_info = {"source": calib.source, "samples": samples, "seq_len": seq_len, "tokens": task.calib_tokens}
    lap("load")

    graph = trace_model(loaded.model, _example_inputs(task, loaded), opts.embeddings, keep=opts.keep)
    # a pattern that matches only parts kept anyway (a vision tower text never runs) asks for what holds
    if opts.keep is not None and not any(why.endswith(f"(--keep {opts.keep})") or re.search(opts.keep, name)
                                         for name, why in graph.excluded.items()):
        names = [layer.name for layer in graph.layers]
        raise MpqError(f"--keep {opts.keep!r} matches no quantisable layer; they are named like "
                       f"{', '.join(dict.fromkeys(names[:2] + names[-1:]))} ({len(names)} in all)")
    graph.excluded.update(loaded.unrouted)
    if not graph.layers:
        raise MpqError(f"{opts.model} has no linear layers that mpq can quantise")
    # auto chooses between rtn and gptq, which store the same bytes
    memory = memory_model(loaded.model, graph.layers, formats, "rtn" if opts.method == AUTO else opts.method)
    budget = requested_budget if requested_budget is not None else memory.largest()
    kept = kept_as_stored(loaded.model, graph.layers)
    if budget < memory.smallest():
        raise MpqError(f"--max-mem {format_size(budget)} is below the smallest possible model, {format_size(memory.smallest())} "
                       f"({memory.smallest()} bytes, every layer in its smallest format; {format_size(memory.fixed_bytes)} "
                       f"of it is kept as stored, largest: {kept_summary(kept, 2)}): raise --max-mem to at least that")
    experts = coverage(routed_tokens(loaded.model, task.calibration_inputs()))  # None without a mixture
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "layers.json", graph.to_json())
    lap("trace")

    work = measurement_model(loaded.model)
    groups = graph.shared_input_groups()
    has_bias = {layer.name: layer.has_bias for layer in graph.layers}
    task.prepare_eval(loaded.model)

    def heldout_loss(plan: dict[str, str], plan_cache: QuantizedWeightCache) -> torch.Tensor:
        with as_emitted(loaded, plan, plan_cache, groups, has_bias):
            return task.window_losses(loaded.model)

    choice = choose_method(opts.method, loaded.model, graph.layers, groups, formats, task, memory.layer_bytes,
                           heldout_loss, opts.progress)
    method = choice.method
    cache = QuantizedWeightCache(loaded.model, choice.quantizer)
    # The unquantised twin's outputs on the calibration data: kl sensitivities, the measured
    # refinement and every config's calibration divergence are taken against them.
    with layers_run(work, graph.layers) as ran:
        reference = task.reference(work, held=True)
    never_ran = never_measured(graph.layers, ran)
    if never_ran:
        log.warning("the calibration data never ran %s%s: their sensitivity reads 0 in every format, so the search "
                    "places them unmeasured (--keep leaves layers as stored)", never_ran[0],
                    f" and {len(never_ran) - 1} more layers" if len(never_ran) > 1 else "")
    table, reused = _sensitivity(opts, loaded, work, graph, formats, task, calib_info, cache, method, reference)
    draw_heatmap(table, graph.layers, out / "heatmap.png")
    (out / "sensitivity.md").write_text(heatmap_markdown(table, graph.layers))
    lap("sensitivity")

    latency, latency_cap = None, None
    if regime is not None:
        latency = _latency(opts, loaded, graph, formats, regime, groups)
        latency_cap = latency_limit(latency, max_latency, opts.min_speedup, memory.layer_bytes, groups if opts.tie else [])
        lap("profile")

    costs = memory.layer_bytes
    sens = {layer: {fmt: table.values[layer][fmt] for fmt in costs[layer]} for layer in costs}
    uniform_names = [f.name for f in formats if not f.embedding_only]  # a +hot format is one table's option
    storage = opts.storage if opts.storage is not None else str(out / "study.journal")
    # Named by everything the study's answers depend on, the sensitivity and latency values
    # included, so a resumed study is always the same problem.
    together = expert_projections(loaded.model)  # the sampler's unit for a mixture's experts
    study_name = "mpq-" + data_fingerprint(table.values, costs, memory.fixed_bytes, budget, opts.tie, groups, opts.seed,
                                           None if latency is None else [latency.layer_seconds, latency.group_seconds,
                                                                         latency.rest_seconds, latency.calls, latency.mixtures], latency_cap,
                                           together)[:16]
    try:
        study_storage = open_storage(storage)  # both studies, the search's and the measured one at the budget
        result = search_plans(costs, sens, memory.fixed_bytes, budget, opts.trials, opts.seed, uniform_names,
                              tied=groups if opts.tie else [], storage=study_storage, study_name=study_name,
                              latency=latency, max_latency=latency_cap, sampled_together=together)
    except ImportError as exc:
        raise MpqError(f"--storage {storage}: {exc}; install the database driver or use a journal file path") from exc
    if not result.front:
        raise MpqError(f"no config found within both --max-mem {format_size(budget)} and the latency cap "
                       f"{latency_cap * 1e3:.3f} ms per step: raise one of them")
    untied = exact_front(costs, sens, budget - memory.fixed_bytes, max_points=1)
    lap("search")

    divergences: dict[tuple, float] = {}  # the measured study's plans come back to the held-out evaluation below

    def calib_divergence(plan: dict[str, str]) -> float:
        """The whole config's divergence on calibration data, measured as the sensitivities were (once a plan)."""
        key = layer_plan_key(plan)
        if key not in divergences:
            with applied(work, {layer: get_format(fmt) for layer, fmt in plan.items()}, cache, backend=MEASURE_BACKEND):
                divergences[key] = task.divergence(work, reference)
        return divergences[key]

    refinement = None
    if opts.refine > 0 and result.exact_plan is not None:
        predict = (lambda plan: None) if latency is None else latency.predict  # noqa: E731
        exact = Candidate(result.exact_plan, *evaluate_plan(result.exact_plan, costs, sens, memory.fixed_bytes), "exact",
                          latency=predict(result.exact_plan))
        pool = [Candidate(c.formats, c.bytes, c.predicted, c.origin, latency=predict(c.formats)) for c in result.feasible]
        pool = [c for c in pool if latency_cap is None or c.latency <= latency_cap]
        refinement = refine_at_budget(exact, pool, calib_divergence, costs, sens, memory.fixed_bytes, budget,
                                      tied=groups if opts.tie else [], trials=opts.refine, seed=opts.seed,
                                      storage=study_storage, study_name=study_name + "-measured",
                                      fits=lambda plan: latency_cap is None or latency.predict(plan) <= latency_cap,
                                      time_step=None if latency_cap is None else step_timer(loaded, regime, latency, cache,
                                                                                            groups, has_bias),
                                      max_latency=latency_cap)
        refinement.best.latency = predict(refinement.best.formats)
        lap("refine")

    baseline = {"bytes": resident_bytes(loaded.model), "metrics": task.evaluate(loaded.model)}
    uniform = [Candidate(plan, *evaluate_plan(plan, costs, sens, memory.fixed_bytes), f"uniform:{name}",
                         latency=None if latency is None else latency.predict(plan))
               for name, plan in ((name, uniform_plan(costs, name)) for name in uniform_names)]
    mixed = [c for c in chosen_for_measuring(result.front, opts.max_configs, time_step(latency)) if not c.origin.startswith("uniform")]
    if refinement is not None and all(c.formats != refinement.best.formats for c in uniform + mixed):
        mixed.append(refinement.best)  # the measured best at the budget is always judged on held-out data
    measured = uniform + mixed
    windows = {}  # plan key -> per-window held-out losses, for the emitted front's noise test
    for cand in tqdm(measured, desc="held-out eval", disable=not opts.progress, unit="config"):
        with as_emitted(loaded, cand.formats, cache, groups, has_bias):
            cand.measured, windows[plan_key(cand)] = task.evaluate_windows(loaded.model)
        cand.measured["calib_divergence"] = calib_divergence(cand.formats)  # to check the additive prediction
    if regime is not None:  # the prediction's check: each emitted model's own step, timed
        baseline["latency_s"] = _time_configs(loaded, regime, measured, cache, groups, has_bias)
    additivity = additivity_check([c.predicted for c in measured], [c.measured["calib_divergence"] for c in measured],
                                  same_units=table.metric == task.metric)
    lap("evaluate")

    feasible = [c for c in measured if c.bytes <= budget and (latency_cap is None or c.latency <= latency_cap)]
    front = emitted_front(feasible, time_step(latency), windows)
    env = {"versions": versions(), "hardware": hardware(), "quality_matmuls": cpu_matmul.describe()}
    criteria = Criteria(opts.max_quality_drop, opts.min_speedup, requested_budget, opts.prefer)
    if (out / "configs").exists():
        shutil.rmtree(out / "configs")  # configs of an earlier run would mislead next to this one
    config_rows = [_emit_config(out / "configs", index, cand, opts, loaded, task, graph, cache, baseline, calib_info, env,
                                latency, fusion_groups(cand.formats, groups, has_bias), criteria, method, never_ran)
                   for index, cand in enumerate(front)]
    recommended = recommend(config_rows, criteria)
    lap("emit")

    points = [{"name": c.origin.split(":")[-1] if c.origin.startswith("uniform") else "", "bytes": c.bytes,
               "quality": _display_quality(c.measured), "pareto": c in front, "uniform": c.origin.startswith("uniform"),
               "speedup": None if latency is None else latency.baseline_seconds / c.latency}
              for c in measured]
    draw_pareto(points, out / "pareto.png", task.quality_name, _display_quality(baseline["metrics"]), budget)
    if latency is not None:
        draw_speedup(points, out / "speedup.png", task.quality_name, _display_quality(baseline["metrics"]),
                     latency.regime, None if latency_cap is None else latency.baseline_seconds / latency_cap)
    summary = {
        "model": loaded.source, "loaded": {"part": loaded.part, "weights": loaded.stored_as},
        "task": loaded.task, "formats": [f.name for f in formats], "method": method, "budget": budget,
        "method_choice": choice.to_json(), "never_ran": never_ran,
        "calibration_never_ran": never_ran if calibrates(method) else [],  # gptq/awq knew nothing of their inputs
        "smallest": memory.smallest(), "fixed_bytes": memory.fixed_bytes, "kept_as_stored": kept_to_json(kept), "experts": experts, "seed": opts.seed,
        "metric": table.metric, "task_metric": task.metric, "quality_name": task.quality_name, "max_quality_drop": opts.max_quality_drop,
        "criteria": criteria.to_json(), "eval_data": opts.eval_data, "recommended": None if recommended is None else recommended["name"],
        "trace": {"method": graph.method, "warning": graph.warning, "layers": len(graph.layers),
                  "shared_input_groups": len(groups)},
        "calibration": calib_info, "baseline": baseline,
        "search": {"trials": result.trials, "variables": result.variables, "storage": storage, "study": study_name, "front": len(result.front), "measured": len(measured), "seconds": result.seconds,
                   "tied_groups": len(groups) if opts.tie else 0, "exact_best": result.exact_best,
                   "sampler_best": result.sampler_best, "exact_best_untied": untied[-1].predicted if untied else None},
        "refinement": None if refinement is None else refinement.to_json(),
        "sensitivity_seconds": table.seconds, "sensitivity_reused": reused, "additivity": additivity,
        "configs": config_rows, "within_noise": within_noise(feasible, front),
        "uniform": [{"name": c.origin.split(":")[1], "bytes": c.bytes, "predicted": c.predicted, "metrics": c.measured,
                     "formats": c.formats, **latency_fields(c, latency)} for c in uniform],
        "latency": None if latency is None else latency_summary(latency, latency_cap, max_latency, opts.min_speedup,
                                                                 measured, baseline.get("latency_s")),
        **env,
    }
    lap("report")
    summary["seconds"] = seconds
    summary["memory"] = {"peak_rss_bytes": _largest(rss for rss, _ in peaks.values()),
                         "peak_anonymous_bytes": _largest(anonymous for _, anonymous in peaks.values()),
                         "stages": {stage: rss for stage, (rss, _) in peaks.items()},
                         "anonymous_stages": {stage: anonymous for stage, (_, anonymous) in peaks.items()},
                         "spilled_bytes": spilled_bytes()}
    write_report(out / "report.md", summary)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _largest(values) -> int | None:
    known = [value for value in values if value is not None]
    return max(known) if known else None


def as_emitted(loaded: LoadedModel, plan: dict[str, str], cache: QuantizedWeightCache, groups: list[list[str]],
               has_bias: dict[str, bool]):
    """A context that puts `plan` into the model as its checkpoint will run: emitted kernels, fused groups."""
    return applied(loaded.model, {n: get_format(f) for n, f in plan.items()}, cache, fusion_groups(plan, groups, has_bias))


def step_timer(loaded: LoadedModel, regime: Regime, latency: LatencyModel, cache: QuantizedWeightCache,
               groups: list[list[str]], has_bias: dict[str, bool]):
    """plan -> its measured step as emitted, in the profile's seconds: timed beside the unquantised
    model and scaled by the profile's baseline over the one timed now, so the machine's drift since
    the profile does not decide whether a plan meets the latency cap."""
    def time_step(plan: dict[str, str]) -> float:
        run = lambda: as_emitted(loaded, plan, cache, groups, has_bias)  # noqa: E731
        step_s, baseline_now = measure_plans(loaded.model, loaded.task, regime, [run, nullcontext], rounds=2)
        return step_s * latency.baseline_seconds / baseline_now
    return time_step


def _time_configs(loaded: LoadedModel, regime: Regime, measured: list[Candidate], cache: QuantizedWeightCache,
                  groups: list[list[str]], has_bias: dict[str, bool]) -> float:
    """Time one step of each config as emitted (into cand.measured) and of the unquantised model in
    the same rounds, whose time it returns: a shared machine's speed drifts between the profile and
    now, and speedups measured side by side do not drift with it."""
    runs = [lambda c=c: as_emitted(loaded, c.formats, cache, groups, has_bias) for c in measured]
    *steps, baseline_now = measure_plans(loaded.model, loaded.task, regime, [*runs, nullcontext])
    for cand, step_s in zip(measured, steps):
        cand.measured["latency_s"] = step_s
        cand.measured["speedup"] = baseline_now / step_s
    return baseline_now


def _emit_config(configs_dir: Path, index: int, cand: Candidate, opts: CompileOptions, loaded: LoadedModel, task,
                 graph: ModelGraph, cache: QuantizedWeightCache, baseline: dict, calib_info: dict, env: dict,
                 latency: LatencyModel | None, fused: list[list[str]], criteria: Criteria, method: str,
                 never_ran: list[str]) -> dict:
    """Write one config folder (atomically), its layers fused as `fused`, and return its row of the summary."""
    uniform = cand.origin.startswith("uniform")
    name = f"c{index}-{cand.bytes / 1e6:.2f}MB" + (f"-all-{cand.origin.split(':')[1]}" if uniform else "")
    plan = Plan(formats=cand.formats, model=loaded.source, meta={"origin": cand.origin})
    reasons = failures(cand.bytes, cand.measured, baseline["metrics"], criteria)
    accepted, because = not reasons, "; ".join(reasons)
    card = _card(loaded, plan, cand, baseline, calib_info, task, accepted, env, graph, method, never_ran)
    card["criteria"] = criteria.to_json()
    with applied(loaded.model, plan.specs(), cache, fused) as tensors:
        save_config(configs_dir / name, loaded.model, loaded.tokenizer, loaded.task, plan, tensors, card, fused)
    return {"name": name, "bytes": cand.bytes, "predicted": cand.predicted, "metrics": cand.measured,
            "counts": plan.counts(), "origin": cand.origin, "accepted": accepted, "rejected_because": because,
            **latency_fields(cand, latency)}


def _display_quality(metrics: dict) -> float:
    return metrics["ppl"] if "ppl" in metrics else metrics["mean_cosine"]


def _card(loaded: LoadedModel, plan: Plan, cand: Candidate, baseline: dict, calib_info: dict, task, accepted: bool,
          env: dict, graph: ModelGraph, method: str, never_ran: list[str]) -> dict:
    """The quantisation card (mpq.card); `never_ran`: layers the calibration data never ran (under
    GPTQ/AWQ rounded to nearest: nothing is known of their inputs)."""
    shapes = {layer.name: (layer.out_features, layer.in_features) for layer in graph.layers}
    specs = plan.specs()
    tables = [layer.name for layer in graph.layers if layer.is_embedding and specs[layer.name].quantized]
    method_text = describe(method, list(specs.values()))
    if tables and not method_text.startswith("rtn"):
        method_text += f"; {', '.join(tables)}: rtn with a searched clipping range (a table's input is a token id: nothing else of gptq or awq applies)"
    nearest = rounded_to_nearest(never_ran, specs, method)
    if nearest:
        method_text += (f"; {', '.join(nearest)}: rtn, as the calibration data never ran them (nothing is known of "
                        "their inputs)")
    tied = [f"{layer.tied_table} (tied to {layer.name})" for layer in graph.layers if layer.tied_table and layer.name in specs]
    if tied:
        method_text += f"; {', '.join(tied)}: looked up in the head's quantised weight, in its format"
    looked_up = [layer.name for layer in graph.layers if layer.is_embedding and layer.name in specs]
    looked_up += [layer.tied_table for layer in graph.layers if layer.tied_table and layer.name in specs]
    scales = {table: embedding_scale(loaded.model.get_submodule(table)) for table in looked_up}
    scaled = [f"{table} times {scale:g}" for table, scale in scales.items() if scale not in (None, 1.0)]
    if scaled:
        method_text += f"; rows of {', '.join(scaled)} (the table's embed_scale, as the model's own lookup multiplies them)"
    return {
        "model": loaded.source,
        **({"source_weights": loaded.stored_as} if loaded.stored_as else {}),
        **({"compiled_part": loaded.part} if loaded.part else {}),
        "task": loaded.task,
        "method": method_text,
        "formats": {fmt.name: fmt.card() for fmt in {s.name: s for s in specs.values()}.values()},
        "bits_per_layer": {layer: round(fmt.bits_per_weight(*shapes[layer]), 4) for layer, fmt in specs.items()},
        "activations": "bf16 in int8/int4 layers on the CPU (W8A16 / W4A16); the model's dtype elsewhere",
        "model_dtype": str(float_dtype_of(loaded.model)).removeprefix("torch."),
        "calibration": calib_info,
        "evaluation_data": "mpq corpus, heldout split, validation half" + (" (text and code)" if loaded.task in GENERATIVE else " (text sentences)")
                           + "; `mpq eval CONFIG` reports the test half, which compile never saw",
        "quality": {"sensitivity_metric": task.metric, "predicted": cand.predicted, "measured": cand.measured,
                    "baseline": baseline["metrics"]},
        "bytes": {"predicted": cand.bytes, "baseline": baseline["bytes"]},
        "accepted": accepted,
        "excluded_layers": graph.excluded,
        "experts": describe_routed(loaded.model),
        "never_ran": {layer: plan.formats[layer] for layer in never_ran if layer in plan.formats},  # sensitivity unmeasured
        **env,
    }
