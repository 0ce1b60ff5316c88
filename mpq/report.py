"""What users look at: the sensitivity heatmap, the Pareto plot, and report.md."""

from __future__ import annotations

import math
from pathlib import Path

from mpq.memory import KeptTensors, format_size, kept_summary
from mpq.noise import NOISE_Z
from mpq.sensitivity import SensitivityTable
from mpq.trace import LayerInfo

OTHER_ROW = "other"
HEATMAP_MAX_INCHES = 40  # a mixture's experts give hundreds of columns; beyond this they narrow
_LABEL_INCHES = 0.15  # the least room one column's tick label needs


def _grid(table: SensitivityTable, layers: list[LayerInfo], fmt: str) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows = transformer blocks (then layers outside blocks), columns = layer kinds."""
    kinds: list[str] = []
    rows: list[str] = []
    for layer in layers:
        if layer.kind not in kinds:
            kinds.append(layer.kind)
        row = str(layer.block) if layer.block is not None else OTHER_ROW
        if row not in rows:
            rows.append(row)
    grid = [[math.nan] * len(kinds) for _ in rows]
    for layer in layers:
        row = str(layer.block) if layer.block is not None else OTHER_ROW
        value = table.values.get(layer.name, {}).get(fmt)
        if value is not None:
            grid[rows.index(row)][kinds.index(layer.kind)] = value
    return rows, kinds, grid


def _column_label(kind: str) -> str:
    """A heatmap column's label: the layer's own name, with its expert's number where it has one
    (mlp.experts.3.down_proj -> 3.down_proj)."""
    parts = kind.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-2].isdigit() else parts[-1]


def draw_heatmap(table: SensitivityTable, layers: list[LayerInfo], path: Path) -> Path:
    """One panel per quantised format; log colour scale, since sensitivities span decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    formats = [f for f in table.formats if any(f in v and v[f] > 0 for v in table.values.values())]
    formats = formats or table.formats
    rows, kinds, _ = _grid(table, layers, formats[0])
    positive = [v for per in table.values.values() for v in per.values() if v > 0]
    norm = LogNorm(vmin=min(positive), vmax=max(positive)) if positive else None
    column = min(0.9, HEATMAP_MAX_INCHES / (len(kinds) * len(formats)))  # inches
    step = math.ceil(_LABEL_INCHES / column)  # label every step-th column where they would overlap
    fig, axes = plt.subplots(1, len(formats), figsize=(1.2 + column * len(kinds) * len(formats), 1.5 + 0.4 * len(rows)),
                             squeeze=False)
    image = None
    for ax, fmt in zip(axes[0], formats):
        _, _, grid = _grid(table, layers, fmt)
        data = np.array(grid, dtype=float)
        data[data <= 0] = np.nan
        image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="magma_r", norm=norm)
        ax.set_title(fmt)
        ticks = range(0, len(kinds), step)
        ax.set_xticks(ticks, [_column_label(kinds[i]) for i in ticks], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_ylabel("block")
    if image is not None and norm is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label=f"sensitivity ({table.metric}, log scale)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap_markdown(table: SensitivityTable, layers: list[LayerInfo]) -> str:
    lines = [f"Sensitivity ({table.metric}; lower is better) on {table.calib.get('tokens')} calibration tokens "
             f"from {table.calib.get('source')}.", ""]
    for fmt in table.formats:
        rows, kinds, grid = _grid(table, layers, fmt)
        lines += [f"### {fmt}", "", "| block | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for row, values in zip(rows, grid):
            cells = ["" if math.isnan(v) else f"{v:.2e}" for v in values]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def draw_pareto(points: list[dict], path: Path, quality_name: str, baseline: float | None, budget: int | None = None) -> Path:
    """Bytes against measured quality; Pareto configs joined, uniform configs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["bytes"])
    others = [p for p in points if not p["pareto"] and not p["uniform"]]
    uniform = [p for p in points if p["uniform"]]
    if others:
        ax.scatter([p["bytes"] / 1e6 for p in others], [p["quality"] for p in others], c="0.7", label="measured, dominated")
    ax.plot([p["bytes"] / 1e6 for p in front], [p["quality"] for p in front], "o-", c="tab:blue", label="mpq Pareto set")
    _mark_uniform(ax, uniform, lambda p: p["bytes"] / 1e6)
    if budget is not None:
        ax.axvline(budget / 1e6, ls=":", c="tab:green", label="--max-mem")
    return _save(fig, ax, path, "resident weight bytes (MB)", quality_name, baseline)


def draw_speedup(points: list[dict], path: Path, quality_name: str, baseline: float | None, regime: dict,
                 min_speedup: float | None = None) -> Path:
    """Predicted speedup over the unquantised model against measured quality; the front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher_is_better = quality_name != "perplexity"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ordered = sorted(points, key=lambda p: -p["speedup"])
    front, best = [], None
    for p in ordered:  # fastest first: a point is on the front when its quality beats every faster one
        if best is None or (p["quality"] > best if higher_is_better else p["quality"] < best):
            front.append(p)
            best = p["quality"]
    rest = [p for p in points if p not in front]
    if rest:
        ax.scatter([p["speedup"] for p in rest], [p["quality"] for p in rest], c="0.7", label="measured, dominated")
    ax.plot([p["speedup"] for p in front], [p["quality"] for p in front], "o-", c="tab:blue",
            label="Pareto front (speedup, quality)")
    _mark_uniform(ax, [p for p in points if p["uniform"]], lambda p: p["speedup"])
    ax.axvline(1.0, ls="-", c="0.85")
    if min_speedup is not None:
        ax.axvline(min_speedup, ls=":", c="tab:green", label="latency cap")
    kind = "decode step" if regime["kind"] == "decode" else "prefill"
    return _save(fig, ax, path, f"predicted speedup over the unquantised model ({kind}, batch {regime['batch']}, "
                 f"length {regime['length']})", quality_name, baseline)


def _mark_uniform(ax, uniform: list[dict], x) -> None:
    """The uniform configs as red squares, each with its format's name."""
    for p in uniform:
        ax.scatter([x(p)], [p["quality"]], marker="s", s=60, c="tab:red", zorder=3)
        ax.annotate(p["name"], (x(p), p["quality"]), textcoords="offset points", xytext=(5, 5), fontsize=8)


def _save(fig, ax, path: Path, xlabel: str, quality_name: str, baseline: float | None) -> Path:
    """The parts both plots share: the unquantised line, labels, grid, legend; then write and close."""
    import matplotlib.pyplot as plt

    if baseline is not None:
        ax.axhline(baseline, ls="--", c="0.4", label="unquantised")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(quality_name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _latency_lines(s: dict) -> list[str]:
    lat = s.get("latency")
    if not lat:
        return []
    cap = "" if lat["cap_seconds"] is None else f"; cap {lat['cap_seconds'] * 1e3:.3f} ms per step (hard constraint)"
    lines = ["## Latency", "",
             f"- regime: {lat['describe']}; unquantised step {lat['baseline_seconds'] * 1e3:.3f} ms measured, of which "
             f"{lat['rest_seconds'] * 1e3:.3f} ms outside the quantisable layers{cap}",
             f"- profile: {lat['device']}; " + ("reused from the cache" if lat["reused"]
                                                 else f"measured in {lat['profile_seconds']:.1f} s"),
             *[f"- note: {note}" for note in lat["notes"]]]
    if lat["max_abs_error"] is not None:
        lines.append(f"- prediction (sum of layer times + rest) against the emitted model's measured step, over "
                     f"every measured config: median error {lat['median_abs_error']:.1%}, worst {lat['max_abs_error']:.1%}; "
                     f"speedup over the unquantised model (measured beside them) predicted within "
                     f"{lat['median_abs_speedup_error']:.1%} (median), worst {lat['max_abs_speedup_error']:.1%}")
        lines.append(f"- the unquantised step took {lat['baseline_now_seconds'] * 1e3:.3f} ms at evaluation against "
                     f"{lat['baseline_seconds'] * 1e3:.3f} ms at profiling ({lat['drift']:.2f}x): the machine's own drift, "
                     "which speedups cancel and absolute times do not")
    lines += ["", "| config | bytes | predicted ms | measured ms | error | predicted speedup | measured speedup |",
              "|---|---|---|---|---|---|---|"]
    for row in [*s["configs"], *s["uniform"]]:
        measured = row.get("latency_measured_s")
        lines.append(f"| {row['name']} | {format_size(row['bytes'])} | {row['latency_predicted_s'] * 1e3:.3f} | "
                     + (f"{measured * 1e3:.3f} | {row['latency_error']:+.1%}" if measured else "- | -")
                     + f" | {row['speedup_predicted']:.2f}x | "
                     + (f"{row['speedup_measured']:.2f}x |" if row.get("speedup_measured") else "- |"))
    return [*lines, "", "![speedup](speedup.png)", ""]


def _quality_cell(metrics: dict) -> str:
    if "ppl" in metrics:
        return f"{metrics['ppl']:.3f} | {metrics['ppl_text']:.3f} | {metrics['ppl_code']:.3f}"
    return f"{metrics['mean_cosine']:.5f} | {metrics['nn_agreement']:.3f}"


def _quality_header(task_quality: str) -> str:
    if task_quality == "perplexity":
        return "ppl (all) | ppl text | ppl code"
    return "mean cosine | NN agreement"


def _variables(s: dict) -> str:
    """How many formats each trial chose, and why fewer than the layers in a mixture."""
    count = s["search"].get("variables")
    if not count:
        return ""
    return f" of {count} variables each" + (" (a mixture's projection is one variable over all its experts; the exact "
                                             "DP's plans, on the front too, set each expert)" if s.get("experts") else "")


def _search_line(search: dict, metric: str) -> str:
    exact = search.get("exact_best")
    if exact is None:
        return "- exact optimum: none within the budget"
    sampler = search.get("sampler_best")
    found = "found no feasible plan of its own" if sampler is None else f"best of its own {sampler:.4g}"
    tie = (f"; tying {search['tied_groups']} groups of layers that read one input costs "
           f"{exact - search['exact_best_untied']:.3g} predicted {metric} at the budget (untied optimum "
           f"{search['exact_best_untied']:.4g})" if search.get("tied_groups") else "; layers untied (--no-tie)")
    return f"- predicted {metric} at the budget: exact optimum {exact:.4g}; the NSGA-II sampler {found}{tie}"


def _additivity_line(check: dict, metric: str, task_metric: str) -> str:
    if check["spearman"] is None:
        return f"- additive model: only {check['configs']} configs measured, too few to rank-correlate"
    line = (f"- additive model: over the {check['configs']} measured configs, predicted {metric} (sum of layer "
            f"sensitivities) against the whole config's {task_metric} on the calibration data: Spearman "
            f"{check['spearman']:.3f}, median relative error "
            + ("n/a (other units)" if check["median_relative_error"] is None else f"{check['median_relative_error']:.1%}"))
    if check["weak"]:
        line += ". WARNING: correlation under 0.9, so the predicted ranking of configs is not reliable here"
    return line


def _refinement_lines(refinement: dict | None, task_metric: str) -> list[str]:
    if not refinement:
        return []
    exact, optuna, best = refinement["exact"], refinement["optuna"], refinement["best"]
    fits = "" if exact["fits"] else " (over the latency cap, so not a candidate)"
    timed = [row for row in refinement["rows"] if "latency_s" in row]
    if timed:  # each trial's step was timed as emitted and held to the cap
        fits += (f"; every trial's step also timed as emitted, {sum(not r['feasible'] for r in timed)} of {len(timed)} "
                 "over the latency cap by measurement or prediction"
                 + ("" if refinement.get("timing_met", True) else
                    " (none met it as timed, so the best is chosen among those that meet it by prediction)"))
    proposed = sum(row["origin"] == "refined" for row in refinement["rows"])
    return [f"- measured refinement at the budget (an Optuna study of {len(refinement['rows'])} trials measured for real, "
            f"{task_metric} on calibration data; {proposed} of them proposed next to the best measured): "
            f"exact optimum of the additive model predicted {exact['predicted']:.4g}, measured {exact['measured']:.4g}{fits}; "
            f"the study's least-predicted plan predicted {optuna['predicted']:.4g}, measured {optuna['measured']:.4g}; "
            f"best measured {best['measured']:.4g} ({best['origin']}), {refinement['gain']:.1%} less than the "
            f"least-predicted plan"]


def _acceptance_line(s: dict) -> str:
    """The criteria asked and the recommended config (mpq.acceptance)."""
    c = s.get("criteria") or {}
    asked = [f"held-out quality drop <= {c['max_quality_drop']}" + (" (perplexity ratio - 1)" if s["task"] == "causal-lm" else " (cosine)")
             if c.get("max_quality_drop") is not None else "",
             f"measured speedup >= {c['min_speedup']}x" if c.get("min_speedup") is not None else "",
             f"bytes <= {format_size(c['max_bytes'])}" if c.get("max_bytes") is not None else ""]
    asked = [a for a in asked if a]
    if not asked:
        return "Acceptance: no criteria given (--max-quality-drop, --min-speedup, --max-mem); every config passes."
    prefer = c.get("prefer", "smallest")
    verdict = (f"**Recommended: {s['recommended']}** (the {prefer} config that passes; `--prefer smallest|fastest`)."
               if s.get("recommended") else "**No config passes**: relax a criterion or raise --max-mem.")
    return f"Acceptance: {'; '.join(asked)}. {verdict}"


def _method_choice_lines(choice: dict | None, quality_name: str) -> list[str]:
    if not choice:
        return []
    unit = "nats per token" if quality_name == "perplexity" else "1 - cosine"
    parts = [f"{fmt}: rtn {v['rtn']:.5g}, gptq {v['gptq']:.5g} (paired z {v['z']:+.1f}"
             + (", within noise)" if abs(v["z"]) < NOISE_Z else ")") for fmt, v in choice["heldout_loss"].items()]
    return [f"- `--method auto` chose {choice['chosen']}: per format, gptq at 4 bits and rtn at 8 unless the other "
            f"method's uniform config has a lower mean loss on the held-out validation half by more than the noise "
            f"(|z| > {NOISE_Z:g}; {unit}): " + "; ".join(parts)]


def _never_ran_line(s: dict) -> list[str]:
    """Layers (not experts) the calibration data never ran: measured as 0, and under gptq/awq
    rounded to nearest."""
    never_ran = s.get("never_ran") or s.get("calibration_never_ran")
    if not never_ran:
        return []
    line = (f"- the calibration data never ran {len(never_ran)} layer(s) (`{never_ran[0]}`"
            + (f" and {len(never_ran) - 1} more" if len(never_ran) > 1 else "")
            + "): their sensitivity reads 0 in every format, so the search placed them unmeasured")
    if s.get("calibration_never_ran"):
        line += "; nothing is known of their inputs, so gptq/awq rounded them to nearest"
    return [line + "; each config's card names them (`--keep REGEX` leaves layers as stored)"]


def _noise_line(s: dict) -> str:
    dropped = s.get("within_noise", 0)
    return (f"A config is emitted only when it beats every smaller (or faster) emitted one by more than the noise of the "
            f"held-out windows (paired z below -{NOISE_Z:g} on its per-window losses): "
            + (f"{dropped} config(s) on the measured front were better only within noise and are not emitted."
               if dropped else "none on the measured front was left out."))


def _kept_lines(s: dict) -> list[str]:
    """Where the bytes that no format shrinks are (a mixture of experts' stacked weights can be most)."""
    kept = s.get("kept_as_stored")
    if not kept:
        return []
    total = s["baseline"]["bytes"] if isinstance(s.get("baseline"), dict) and s["baseline"].get("bytes") else None
    share = f" of {format_size(total)} ({s['fixed_bytes'] / total:.0%})" if total else ""
    groups = kept_summary([KeptTensors(**k) for k in kept], 3, code=True)
    return [f"- kept as stored in every config (no plan layer holds them): {format_size(s['fixed_bytes'])}{share}; largest: {groups}"]


def _experts_line(s: dict) -> list[str]:
    """How the calibration tokens spread over a mixture's experts: the ones that got none were
    measured and calibrated on nothing."""
    experts = s.get("experts")
    if not experts:
        return []
    line = (f"- experts: {experts['experts']} in {experts['mixtures']} mixtures, each expert's projections layers of "
            f"their own; calibration tokens routed to each expert: min "
            f"{experts['min']}, median {experts['median']}, max {experts['max']}")
    unreached = experts["unreached"]
    if unreached:
        line += (f"; {len(unreached)} got none (e.g. `{unreached[0]}`): their sensitivity reads 0 and they are "
                 "rounded to nearest, so more calibration text (`--samples`, `--calib`) measures them")
    return [line]


def _stage_lines(s: dict) -> list[str]:
    """Each stage's time and, where the platform reports it, the process's peak resident memory, all
    of it and the part no file backs (what must fit in RAM; see mpq.evaluate.PeakMemory)."""
    lines = ["## Time and memory per stage", "", "| | " + " | ".join(s["seconds"]) + " |", "|---" * (len(s["seconds"]) + 1) + "|",
             "| seconds | " + " | ".join(f"{v:.1f}" for v in s["seconds"].values()) + " |"]
    memory = s.get("memory") or {}
    for label, key in (("peak RSS", "stages"), ("peak anonymous", "anonymous_stages")):
        peaks = memory.get(key) or {}
        if any(peaks.get(stage) is not None for stage in s["seconds"]):
            lines.append(f"| {label} | " + " | ".join("" if peaks.get(stage) is None else format_size(peaks[stage])
                                                     for stage in s["seconds"]) + " |")
    if memory.get("spilled_bytes"):
        lines += ["", f"{format_size(memory['spilled_bytes'])} of quantised tensors, reference outputs and float32 "
                      "copies were held in files under the output folder and mapped back, not held in memory "
                      "(`--no-spill` keeps them in memory)."]
    return [*lines, ""]


def write_report(path: Path, summary: dict) -> Path:
    """report.md from the compile summary (plain data, also saved as summary.json)."""
    s = summary
    header = _quality_header(s["quality_name"])
    lines = [
        f"# mpq report: {s['model']}",
        "",
        *[f"- {what}: {line}" for what, line in (("compiled", (s.get("loaded") or {}).get("part")),
                                                 ("weights as released", (s.get("loaded") or {}).get("weights"))) if line],
        f"- task: {s['task']}; trace: {s['trace']['method']} ({s['trace']['layers']} quantisable layers)"
        + (f"; warning: {s['trace']['warning']}" if s["trace"].get("warning") else ""),
        f"- formats: {', '.join(s['formats'])}; method: {s.get('method', 'rtn')}; calibration: {s['calibration']['samples']} samples x "
        f"{s['calibration']['seq_len']} tokens from {s['calibration']['source']}",
        *_method_choice_lines(s.get("method_choice"), s["quality_name"]),
        *_never_ran_line(s),
        f"- budget (--max-mem): {format_size(s['budget'])}; smallest possible: {format_size(s['smallest'])}",
        *_kept_lines(s),
        *_experts_line(s),
        *([f"- configs are selected and accepted by held-out perplexity on {s.get('eval_data', 'both')} "
           f"(`--eval-data`; both are shown)"] if s["task"] == "causal-lm" else []),
        "- held-out numbers here are on the validation half of the held-out data, which chose the configs; "
        "`mpq eval configs/NAME` measures the test half, which nothing here has seen",
        f"- search: {s['search']['trials']} Optuna trials (NSGA-II, seed {s['seed']}){_variables(s)}, warm-started from the exact "
        f"optimum of the additive model; {s['search']['front']} on the predicted front, {s['search']['measured']} measured",
        _search_line(s["search"], s["metric"]),
        _additivity_line(s["additivity"], s["metric"], s["task_metric"]),
        *_refinement_lines(s.get("refinement"), s["task_metric"]),
        f"- hardware: {s['hardware']}; torch {s['versions']['torch']}, mpq {s['versions']['mpq']}"
        + (f"; quality passes: {s['quality_matmuls']}" if s.get("quality_matmuls") else ""),
        "",
        "## Baseline (unquantised)",
        "",
        f"| bytes | {header} |",
        "|---|" + "---|" * len(header.split("|")),
        f"| {format_size(s['baseline']['bytes'])} | {_quality_cell(s['baseline']['metrics'])} |",
        "",
        "## Pareto set",
        "",
        "Configs under `configs/` (each with its quantisation card, `card.md`); `mpq inspect configs/NAME` shows one.",
        "",
        _noise_line(s),
        "",
        _acceptance_line(s),
        "",
        f"| config | bytes | predicted {s['metric']} | {header} | formats | accepted |",
        "|---|---|---|" + "---|" * len(header.split("|")) + "---|---|",
    ]
    for c in s["configs"]:
        counts = ", ".join(f"{n}x {f}" for f, n in sorted(c["counts"].items()))
        lines.append(f"| {c['name']} | {format_size(c['bytes'])} | {c['predicted']:.4g} | {_quality_cell(c['metrics'])} | "
                     f"{counts} | {'yes' if c['accepted'] else 'no: ' + c['rejected_because']} |")
    lines += ["", "Uniform configs, measured the same way:", "",
              f"| config | bytes | {header} | within budget |", "|---|---|" + "---|" * len(header.split("|")) + "---|"]
    for u in s["uniform"]:
        lines.append(f"| {u['name']} | {format_size(u['bytes'])} | {_quality_cell(u['metrics'])} | {'yes' if u['bytes'] <= s['budget'] else 'no'} |")
    lines += ["", "## Pareto plot", "", "![pareto](pareto.png)", "", *_latency_lines(s), "## Sensitivity", "",
              "![heatmap](heatmap.png)", "", "Table: [sensitivity.md](sensitivity.md); raw: sensitivity.json.", "",
              *_stage_lines(s)]
    Path(path).write_text("\n".join(lines))
    return Path(path)
