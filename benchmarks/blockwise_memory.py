"""Memory of GPTQ's calibration: block by block (mpq.blockwise) against a float32 twin of the whole
model hooked in one pass (what mpq did before), both ending with every layer's INT8 and INT4 tensors. Each variant runs in a process
of its own on a randomly initialised Llama in bf16 (no download), and the table gives the peak RSS
above the RSS with the model loaded. Prints a table and writes JSON.

    python benchmarks/blockwise_memory.py                   # 16 blocks, hidden 1024
    python benchmarks/blockwise_memory.py --blocks 8 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run_variant(variant: str, blocks: int, hidden: int, samples: int) -> dict:
    """Child process: build the model, then calibrate one way, sampling RSS."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mpq.calib_stats import StatsRecorder
    from mpq.evaluate import PeakMemory
    from mpq.formats import parse_formats
    from mpq.gptq import gptq_quantize
    from mpq.methods import calibrated_tensors
    from mpq.models import DEMO_DIR, CAUSAL_LM
    from mpq.sensitivity import measurement_model
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=blocks, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    task = make_task(CAUSAL_LM, tokenizer, calibration_text(None), samples, 128)
    graph = trace_model(model, {"input_ids": task.calib_ids[:1, :16], "use_cache": False})
    groups = graph.shared_input_groups()
    formats = parse_formats("fp16,int8,int4")
    linears = [layer for layer in graph.layers if not layer.is_embedding]  # GPTQ has no statistics of a lookup
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    start_rss = PeakMemory.rss()
    start = time.time()
    with torch.no_grad(), PeakMemory() as memory:
        if variant == "blockwise":
            tensors = calibrated_tensors("gptq", model, graph.layers, groups, formats, task).tensors
        else:  # the whole model in float32, every layer hooked, one pass; then the same GPTQ per layer
            twin = measurement_model(model, lazy=False)
            represent = {name: group[0] for group in groups for name in group}
            recorder = StatsRecorder({layer.name: twin.get_submodule(layer.name) for layer in linears}, represent)
            for batch in task.calibration_inputs():
                twin(**batch)
            stats = recorder.finish()
            tensors = {(layer.name, fmt.name): gptq_quantize(model.get_submodule(layer.name).weight, fmt, stats.hessian[layer.name])
                       for layer in linears for fmt in formats if fmt.quantized}
        assert len(tensors) == 2 * len(linears), "every linear layer's int8 and int4 tensors"
    return {"variant": variant, "blocks": blocks, "hidden": hidden, "weights_bytes": weights,
            "peak_above_loaded_bytes": memory.peak - start_rss, "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.blocks, args.hidden, args.samples)))
        return
    rows = []
    for variant in ("whole-model float32 twin", "blockwise"):
        child = "twin" if variant.startswith("whole") else "blockwise"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", child, "--blocks", str(args.blocks),
                               "--hidden", str(args.hidden), "--samples", str(args.samples)],
                              capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["variant"] = variant
        rows.append(row)
    print(f"Llama, {args.blocks} blocks, hidden {args.hidden}, bf16 weights {rows[0]['weights_bytes'] / 1e6:.0f} MB; "
          f"calibration {args.samples} x 128 tokens\n")
    print("| calibration | peak RSS above the loaded model (MB) | seconds |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_above_loaded_bytes'] / 1e6:.0f} | {row['seconds']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blockwise_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {args.out / 'blockwise_memory.json'}")


if __name__ == "__main__":
    main()
