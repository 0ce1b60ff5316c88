"""The quantisation card of a config as Markdown (`card.md` beside `mpq.json`): everything needed to
compare it with another config or another tool's checkpoint, as the seed documents ask."""

from __future__ import annotations

from collections import Counter

from mpq.memory import format_size


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("loss", "calib_divergence"))


def card_markdown(manifest: dict) -> str:
    card, formats = manifest["card"], manifest["plan"]["formats"]
    if not {"model", "task", "method", "bytes", "quality", "calibration", "formats"} <= set(card):
        return _plain_card(card, formats)  # a card written by other code than compile: shown as it is
    quality, counts = card["quality"], Counter(formats.values())
    fused = {name: len(group) for group in manifest.get("fused", []) for name in group}
    criteria = card.get("criteria") or {}
    asked = ", ".join(f"{k} {v}" for k, v in criteria.items() if v is not None and k != "prefer") or "none given"
    lines = [
        f"# Quantisation card: {card['model']}",
        "",
        "| | |",
        "|---|---|",
        *([f"| weights as released | {card['source_weights']} |"] if card.get("source_weights") else []),
        *([f"| compiled | {card['compiled_part']} |"] if card.get("compiled_part") else []),
        f"| task | {card['task']} |",
        f"| method | {card['method']} |",
        f"| weight bytes | {format_size(card['bytes']['predicted'])} ({card['bytes']['predicted']} B; "
        f"unquantised {format_size(card['bytes']['baseline'])}) |",
        f"| quality (held-out) | {_metrics(quality['measured'])} |",
        f"| quality of the unquantised model | {_metrics(quality['baseline'])} |",
        f"| predicted {quality['sensitivity_metric']} (calibration) | {quality['predicted']:.4g} |",
        f"| acceptance criteria | {asked}: {'passes' if card['accepted'] else 'fails'} |",
        f"| calibration data | {card['calibration']['source']}: {card['calibration']['samples']} samples x "
        f"{card['calibration']['seq_len']} tokens ({card['calibration']['tokens']} tokens) |",
        f"| evaluation data | {card['evaluation_data']} |",
        *([f"| mixture of experts | {card['experts']} |"] if card.get("experts") else []),
        *([f"| never ran on the calibration data | {', '.join(f'{k} ({v})' for k, v in card['never_ran'].items())}: "
           "sensitivity unmeasured (it reads 0 in every format) |"] if card.get("never_ran") else []),
        f"| activations | {card['activations']} |",
        f"| hardware | {card['hardware']} |",
        *([f"| matmuls in quality passes | {card['quality_matmuls']} |"] if card.get("quality_matmuls") else []),
        f"| software | {', '.join(f'{k} {v}' for k, v in card['versions'].items())} |",
        "",
        "## Formats",
        "",
        "| format | bits | granularity | symmetric | scales | zero point | layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in card["formats"].values():
        sym = "-" if spec["symmetric"] is None else ("yes" if spec["symmetric"] else "no")
        lines.append(f"| {spec['name']} | {spec['bits']} | {spec['granularity']} | {sym} | {spec['scale_dtype'] or '-'} | "
                     f"{spec['zero_point'] or '-'} | {counts[spec['name']]} |")
    lines += [f"- {spec['name']}: {spec['hot_rows']}" for spec in card["formats"].values() if spec.get("hot_rows")]
    lines += ["", "## Layers", "", "| layer | format | bits per weight | fused with |", "|---|---|---|---|"]
    for layer, fmt in formats.items():
        lines.append(f"| {layer} | {fmt} | {card['bits_per_layer'].get(layer, float('nan')):.3f} | "
                     f"{fused[layer] - 1 if layer in fused else 0} others |")
    for layer, why in card.get("excluded_layers", {}).items():
        lines.append(f"| {layer} | kept | - | {why} |")
    return "\n".join(lines) + "\n"


def _plain_card(card: dict, formats: dict[str, str]) -> str:
    lines = ["# Quantisation card", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in card.items()),
             "", "## Layers", "", "| layer | format |", "|---|---|", *(f"| {k} | {v} |" for k, v in formats.items())]
    return "\n".join(lines) + "\n"
