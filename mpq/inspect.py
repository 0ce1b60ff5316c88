"""`mpq inspect CONFIG`: a config's plan and quantisation card, readable."""

from __future__ import annotations

from pathlib import Path

from mpq.checkpoint import read_manifest
from mpq.memory import format_size
from mpq.plan import Plan


def describe(folder: str | Path, kernels: dict[str, str] | None = None) -> str:
    """The card and plan of a config; with `kernels` (layer -> kernel of a loaded model), which
    kernel runs each layer on this machine."""
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
        *(["never ran on the calibration data (sensitivity unmeasured): "
           + ", ".join(f"{k} ({v})" for k, v in card["never_ran"].items())] if card.get("never_ran") else []),
        "",
        "formats:",
    ]
    for spec in card["formats"].values():
        sym = "" if spec["symmetric"] is None else (", symmetric" if spec["symmetric"] else ", asymmetric (zero point)")
        hot = f"; {spec['hot_rows']}" if spec.get("hot_rows") else ""
        lines.append(f"  {spec['name']:<14} {spec['bits']:>2} bits, granularity {spec['granularity']}{sym}{hot}")
    fused = {name: len(group) for group in manifest.get("fused", []) for name in group}
    lines += ["", f"fused groups (one matmul each): {len(manifest.get('fused', []))}", "",
              f"{'layer':<48} {'format':<14} bits/weight" + ("  kernel" if kernels else "  fused")]
    for layer, fmt in plan.formats.items():
        extra = kernels.get(layer, "?") if kernels else (f"x{fused[layer]}" if layer in fused else "")
        lines.append(f"{layer:<48} {fmt:<14} {card['bits_per_layer'].get(layer, float('nan')):>11.3f}  {extra}")
    for layer, why in card.get("excluded_layers", {}).items():
        lines.append(f"{layer:<48} {'(kept)':<14} {why}")
    return "\n".join(lines)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "loss")
