"""`mpq inspect CONFIG`: a config's plan and quantisation card, readable."""

from __future__ import annotations

from pathlib import Path

from mpq.checkpoint import read_manifest
from mpq.memory import format_size
from mpq.plan import Plan


def describe(folder: str | Path) -> str:
    manifest = read_manifest(Path(folder))
    plan = Plan.from_json(manifest["plan"])
    card = manifest["card"]
    quality = card["quality"]
    lines = [
        f"config: {folder}",
        f"model: {card['model']} ({card['task']}); method: {card['method']}",
        f"bytes: {format_size(card['bytes']['predicted'])} (unquantised {format_size(card['bytes']['baseline'])})",
        f"quality: measured {_fmt(quality['measured'])}; baseline {_fmt(quality['baseline'])}; "
        f"predicted {quality['sensitivity_metric']} {quality['predicted']:.4g}",
        f"calibration: {card['calibration']['samples']} x {card['calibration']['seq_len']} "
        f"({card['calibration']['tokens']} tokens) from {card['calibration']['source']}",
        f"evaluation data: {card['evaluation_data']}",
        f"activations: {card['activations']}",
        f"hardware: {card['hardware']}; versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()),
        "",
        "formats:",
    ]
    for spec in card["formats"].values():
        sym = "" if spec["symmetric"] is None else (", symmetric" if spec["symmetric"] else ", asymmetric (zero point)")
        lines.append(f"  {spec['name']:<14} {spec['bits']:>2} bits, granularity {spec['granularity']}{sym}")
    lines += ["", f"{'layer':<48} {'format':<14} bits/weight"]
    for layer, fmt in plan.formats.items():
        lines.append(f"{layer:<48} {fmt:<14} {card['bits_per_layer'].get(layer, float('nan')):.3f}")
    for layer, why in card.get("excluded_layers", {}).items():
        lines.append(f"{layer:<48} {'(kept)':<14} {why}")
    return "\n".join(lines)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "loss")
