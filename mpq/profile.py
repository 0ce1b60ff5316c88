"""`mpq profile MODEL`: the latency model of a model on this machine, as a table.

The same measurement `mpq compile` makes before its search (mpq.latency.profile), shown per
distinct layer shape and format: seconds, and speedup over the 16-bit layer, in the regime asked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mpq.errors import MpqError
from mpq.formats import parse_formats
from mpq.latency import LatencyModel, make_regime, profile
from mpq.models import CAUSAL_LM, SEQ2SEQ_LM, load_model
from mpq.trace import trace_model


def example_inputs(task: str, vocab: int) -> dict:
    """Token ids to trace with (their values do not matter to the graph)."""
    ids = torch.randint(0, max(vocab, 2), (2, 16), generator=torch.Generator().manual_seed(0))
    if task == CAUSAL_LM:
        return {"input_ids": ids[:1], "use_cache": False}
    if task == SEQ2SEQ_LM:
        return {"input_ids": ids[:1], "decoder_input_ids": ids[:1], "use_cache": False}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def profile_table(latency: LatencyModel) -> str:
    """One row per distinct (shape, format): microseconds alone, fused, and against 16 bits."""
    rows: dict[tuple, dict[str, float]] = {}
    for name, per_format in latency.layer_seconds.items():
        n, k, _ = latency.layers[name]
        calls = latency.calls.get(name, 1.0)
        how = ("lookup" if name in latency.tables else "not in a step" if calls == 0 else
               "alone" if calls == int(calls) else "routed (per call)")
        rows.setdefault((f"{n}x{k}", how), per_format)
    for key, per_format in latency.group_seconds.items():
        names = key.split("|")
        shape = "+".join(str(latency.layers[n][0]) for n in names) + f"x{latency.layers[names[0]][1]}"
        rows.setdefault((shape, "fused"), per_format)
    for mixture in latency.mixtures:  # mixtures that decode grouped (mpq.grouped_latency)
        for stack, launch in zip(mixture["stacks"], mixture["launch"]):
            n, k, _ = latency.layers[stack[0]]
            rows.setdefault((f"{n}x{k}", "grouped launch, fixed"), {fmt: fixed for fmt, (fixed, _) in launch.items()})
            rows.setdefault((f"{n}x{k}", "grouped, per expert read"), {fmt: each for fmt, (_, each) in launch.items()})
    formats = sorted({f for per_format in rows.values() for f in per_format})
    header = "| layer (out x in; table: rows x dim) | how | " + " | ".join(f"{f} us" for f in formats) + " | " + \
             " | ".join(f"{f} vs 16-bit" for f in formats if f != "fp16") + " |"
    lines = [header, "|" + "---|" * (2 + len(formats) + len([f for f in formats if f != "fp16"]))]
    for (shape, how), per_format in sorted(rows.items()):
        base = per_format.get("fp16")
        times = " | ".join(f"{per_format[f] * 1e6:.1f}" if f in per_format else "-" for f in formats)
        ratios = " | ".join(f"{base / per_format[f]:.2f}x" if per_format.get(f) and base else "-" for f in formats if f != "fp16")
        lines.append(f"| {shape} | {how} | {times} | {ratios} |")
    regime = latency.regime
    lines += ["", f"regime: {regime['kind']}, batch {regime['batch']}, length {regime['length']}; device: {latency.device}",
              f"unquantised step: {latency.baseline_seconds * 1e3:.3f} ms measured; outside the layers: "
              f"{latency.rest_seconds * 1e3:.3f} ms; " + ("all from the cache" if latency.reused
                                                          else f"measured in {latency.profile_seconds:.1f} s"),
              *[f"note: {note}" for note in latency.notes]]
    return "\n".join(lines)


def profile_model(model: str, formats: str = "fp16,int8,int4", group_size: int = 128, int4_symmetric: bool = False,
                  regime: str | None = None, batch: int = 1, length: int = 128, device: str = "cpu",
                  out: Path | None = None, cache: bool = True) -> str:
    try:
        specs = parse_formats(formats, group_size, int4_symmetric)
    except ValueError as exc:
        raise MpqError(str(exc)) from exc
    loaded = load_model(model)
    config = loaded.model.config
    chosen = make_regime(regime, batch, length, loaded.task, getattr(config, "max_position_embeddings", None))
    graph = trace_model(loaded.model, example_inputs(loaded.task, getattr(config, "vocab_size", 1000)))
    if device != "cpu" and not torch.cuda.is_available():
        raise MpqError(f"--device {device}: no GPU here; use --device cpu")
    loaded.model.to(device)
    latency = profile(loaded.model, loaded.task, graph.layers, specs, chosen, graph.shared_input_groups(), use_cache=cache)
    if out is not None:
        latency.save(Path(out))
    return profile_table(latency)
