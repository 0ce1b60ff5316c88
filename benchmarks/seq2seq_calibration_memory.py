"""Memory of GPTQ's calibration of an encoder-decoder, three ways, each ending with every layer's
INT8 and INT4 tensors: its statistics gathered in one pass over the whole model (what mpq did
first), in passes over shares of its layers that each hold at most mpq.blockwise's bound
(STATS_PASS_BYTES; what mpq then did, and still does for layers no walk reaches), and walked block
by block, the encoder's blocks and then the decoder's (mpq.blockwise's walk: the default). Each
variant runs in a process of its own on a randomly initialised T5 in bf16 (no download; the
demo-t5 tokenizer), and the table gives the peak RSS above the RSS with the model loaded. Prints a
table and writes JSON.

    python benchmarks/seq2seq_calibration_memory.py                       # T5-base's shape
    python benchmarks/seq2seq_calibration_memory.py --layers 2 --d-model 128 --bound-mb 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ONE_PASS = "one pass"
BOUNDED = "passes under the bound"
WALKED = "block by block"


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Child process: build the model, then calibrate one way, sampling RSS."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from mpq import blockwise
    from mpq.evaluate import PeakMemory
    from mpq.formats import parse_formats
    from mpq.methods import calibrated_tensors
    from mpq.models import DEMO_T5_DIR, SEQ2SEQ_LM, decoder_start_of
    from mpq.tasks import calibration_text, make_task
    from mpq.trace import trace_model

    tokenizer = AutoTokenizer.from_pretrained(DEMO_T5_DIR)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=args.d_model, d_kv=64, d_ff=args.d_model * 4,
                      num_layers=args.layers, num_heads=args.d_model // 64, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config).to(torch.bfloat16).eval()
    task = make_task(SEQ2SEQ_LM, tokenizer, calibration_text(None), args.samples, 128,
                     decoder_start=decoder_start_of(model))
    graph = trace_model(model, task.model_inputs(task.calib_ids[:1]))
    groups = graph.shared_input_groups()
    formats = parse_formats("fp16,int8,int4")
    bound = 2**62 if variant == ONE_PASS else args.bound_mb * 2**20
    blockwise.STATS_PASS_BYTES = bound
    if variant != WALKED:
        blockwise.named_block_lists = lambda model: []  # no blocks to walk: the whole model is fed
    represent = {name: group[0] for group in groups for name in group}
    names = [layer.name for layer in graph.layers if not layer.is_embedding]
    in_features = {layer.name: layer.in_features for layer in graph.layers}
    blocks = sum(len(stack) for stack in (model.encoder.block, model.decoder.block))
    passes = blocks + 1 if variant == WALKED else len(blockwise.stats_passes(names, represent, in_features, bound))
    owners = {represent.get(name, name) for name in names}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    start_rss = PeakMemory.rss()
    start = time.time()
    with torch.no_grad(), PeakMemory() as memory:
        tensors = calibrated_tensors("gptq", model, graph.layers, groups, formats, task).tensors
    assert len(tensors) == 2 * len(names), "every layer's int8 and int4 tensors"
    return {"variant": variant, "layers": args.layers, "d_model": args.d_model, "weights_bytes": weights,
            "statistics_bytes": sum(blockwise.statistic_bytes(in_features[o]) for o in owners), "bound_bytes": bound,
            "passes": passes, "peak_above_loaded_bytes": memory.peak - start_rss,
            "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="blocks in each of the encoder and the decoder")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--bound-mb", type=int, default=512, help="mpq.blockwise.STATS_PASS_BYTES, in MiB")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    rows = []
    for variant in (ONE_PASS, BOUNDED, WALKED):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", variant,
                               "--layers", str(args.layers), "--d-model", str(args.d_model),
                               "--samples", str(args.samples), "--bound-mb", str(args.bound_mb)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(f"T5, {args.layers}+{args.layers} blocks, d_model {args.d_model}, bf16 weights "
          f"{first['weights_bytes'] / 1e6:.0f} MB, statistics of every layer {first['statistics_bytes'] / 1e6:.0f} MB; "
          f"GPTQ int8 + int4, calibration {args.samples} windows of 128 tokens\n")
    print("| statistics gathered | passes (walked: blocks + the head) | peak RSS above the loaded model (MB) | seconds |\n|---|---|---|---|")
    for row in rows:
        label = f"{row['variant']} ({row['bound_bytes'] / 2**20:.0f} MiB)" if row["variant"] == BOUNDED else row["variant"]
        print(f"| {label} | {row['passes']} | {row['peak_above_loaded_bytes'] / 1e6:.0f} | {row['seconds']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "seq2seq_calibration_memory.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
