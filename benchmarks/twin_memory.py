"""Memory of the float32 twin that sensitivities are measured in: lazy (mpq.float_twin: the blocks
upcast the model's own bf16 tensors while they run) against a whole float32 copy of the model
(what mpq held before).

Each run is a process of its own on a randomly initialised bf16 Llama (no download): build the
twin, take the reference pass, then measure every 5th layer at int4 as the "kl" signal does
(one divergence pass each). Per run: the bytes the twin holds of its own (tensors it does not
share with the model), the peak RSS of those passes above the RSS with the model loaded, and the
seconds. The variants alternate, `--repeats` times each, since the allocator's peak moves by
tens of MB from run to run. Both variants must give the same divergences, to the last bit.
Prints a table, writes JSON.

    python benchmarks/twin_memory.py                          # 8 blocks, hidden 1024 (218 MB)
    python benchmarks/twin_memory.py --blocks 2 --hidden 128  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VARIANTS = {"whole float32 copy": "whole", "lazy float32 twin": "lazy"}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Child process: build the model, then the twin and its measuring passes, sampling RSS."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mpq.apply import QuantizedWeightCache, applied
    from mpq.evaluate import PeakMemory
    from mpq.formats import get_format
    from mpq.models import DEMO_DIR, load_model
    from mpq.sensitivity import MEASURE_BACKEND, measurement_model
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                             num_hidden_layers=args.blocks, num_attention_heads=max(1, args.hidden // 64),
                             num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=512)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        loaded = load_model(tmp)
        model = loaded.model
        for param in model.parameters():  # fault the loaded weights in, so both variants start from them resident
            param.float().sum()
        task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), args.samples, 128)
        graph = trace_model(model, {"input_ids": task.calib_ids[:1, :8], "use_cache": False})
        layers = [layer for layer in graph.layers if not layer.is_embedding][::5]
        cache = QuantizedWeightCache(model)
        for layer in layers:
            cache.get(layer.name, get_format("int4-g128"))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        start, start_rss = time.time(), PeakMemory.rss()
        with torch.no_grad(), PeakMemory(interval_s=0.005) as memory:
            work = measurement_model(model, lazy=variant == "lazy")
            shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
            own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*work.parameters(), *work.buffers()]
                   if t.untyped_storage().data_ptr() not in shared}
            reference = task.reference(work)
            divergences = []
            for layer in layers:
                with applied(work, {layer.name: get_format("int4-g128")}, cache, backend=MEASURE_BACKEND):
                    divergences.append(task.divergence(work, reference))
    return {"weights_bytes": weights, "twin_own_bytes": sum(own.values()),
            "peak_above_loaded_bytes": memory.peak - start_rss, "seconds": round(time.time() - start, 1),
            "layers_measured": len(layers), "divergences": divergences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 128 tokens (default 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "twin_memory.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    runs: dict[str, list[dict]] = {label: [] for label in VARIANTS}
    for _ in range(args.repeats):
        for label, child in VARIANTS.items():
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", child, "--blocks", str(args.blocks),
                                   "--hidden", str(args.hidden), "--samples", str(args.samples)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
            runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = runs["whole float32 copy"][0]
    same = all(run["divergences"] == first["divergences"] for variant in runs.values() for run in variant)
    print(f"Llama, {args.blocks} blocks, hidden {args.hidden}: bf16 weights {first['weights_bytes'] / 1e6:.0f} MB; "
          f"reference pass + {first['layers_measured']} divergence passes on {args.samples} x 128 tokens; "
          f"{args.repeats} runs each\n")
    print("| twin | its own bytes (MB) | peak RSS above the loaded model (MB): median (min-max) | seconds (median) |")
    print("|---|---|---|---|")
    rows = {}
    for label, variant in runs.items():
        peaks = [run["peak_above_loaded_bytes"] / 1e6 for run in variant]
        rows[label] = {"twin_own_bytes": variant[0]["twin_own_bytes"], "peak_above_loaded_mb": peaks,
                       "seconds": [run["seconds"] for run in variant]}
        print(f"| {label} | {variant[0]['twin_own_bytes'] / 1e6:.0f} | {statistics.median(peaks):.0f} "
              f"({min(peaks):.0f}-{max(peaks):.0f}) | {statistics.median(rows[label]['seconds']):.1f} |")
    print(f"\nsame divergences, bit for bit: {'yes' if same else 'NO'}")
    from mpq.environment import hardware
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hardware(), "blocks": args.blocks, "hidden": args.hidden,
                                    "samples": args.samples, "weights_bytes": first["weights_bytes"],
                                    "same_divergences": same, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not same:
        raise SystemExit("the two twins measured different divergences")


if __name__ == "__main__":
    main()
