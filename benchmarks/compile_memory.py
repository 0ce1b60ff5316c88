"""Peak memory of a whole `mpq compile`, stage by stage, with the lazy float32 twin (mpq.float_twin:
the blocks upcast the model's own bf16 tensors while they run) against a whole float32 copy of the
model (what mpq held before). Each variant compiles a randomly initialised bf16 Llama (no
download) in a process of its own; RSS is sampled every 10 ms and split by the compile's own stage
times (summary.json). Both variants must emit the same configs with the same held-out quality.
Prints a table, writes JSON.

    python benchmarks/compile_memory.py                          # 8 blocks, hidden 1024 (210 MB)
    python benchmarks/compile_memory.py --blocks 2 --hidden 128  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VARIANTS = {"whole float32 copy": "whole", "lazy float32 twin": "lazy"}
TIMED = ("latency", "speedup")  # metrics timed on this machine, which differ run to run


def build(folder: Path, blocks: int, hidden: int) -> int:
    """A random bf16 Llama with the demo's tokenizer, saved to `folder`; returns its weight bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mpq.models import DEMO_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=blocks, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Child process: compile with one twin, sampling RSS; per-stage peaks and the emitted configs."""
    import mpq.compile
    from mpq.evaluate import PeakMemory
    from mpq.sensitivity import measurement_model

    if variant == "whole":
        mpq.compile.measurement_model = lambda model: measurement_model(model, lazy=False)
    with tempfile.TemporaryDirectory() as tmp:
        weights = build(Path(tmp) / "model", args.blocks, args.hidden)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                samples.append((time.time(), PeakMemory.rss() or 0))
        thread = threading.Thread(target=sample, daemon=True)
        start = time.time()
        thread.start()
        try:
            summary = mpq.compile.compile_model(mpq.compile.CompileOptions(
                model=str(Path(tmp) / "model"), max_mem=str(int(args.budget * weights)), samples=args.samples, trials=args.trials,
                refine=args.refine, max_configs=args.max_configs, out=str(Path(tmp) / "out"), progress=False))
        finally:
            stop.set()
            thread.join()
    stages, clock = {}, start
    for stage, seconds in summary["seconds"].items():
        inside = [rss for t, rss in samples if clock <= t <= clock + seconds + 0.01]
        stages[stage] = {"seconds": seconds, "peak_rss_bytes": max(inside, default=0)}
        clock += seconds
    return {"weights_bytes": weights, "peak_rss_bytes": max(rss for _, rss in samples), "stages": stages,
            "seconds": round(time.time() - start, 1),
            "configs": [(c["name"], c["bytes"], {key: value for key, value in c["metrics"].items() if not key.startswith(TIMED)})
                        for c in summary["configs"]],
            "sensitivity_seconds": summary["sensitivity_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=0.45, help="--max-mem as a share of the model's bytes (default 0.45)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--refine", type=int, default=4)
    parser.add_argument("--max-configs", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compile_memory.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    rows = {}
    for label, child in VARIANTS.items():
        command = [sys.executable, str(Path(__file__).resolve()), "--child", child]
        for flag in ("blocks", "hidden", "budget", "samples", "trials", "refine", "max_configs"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        with tempfile.TemporaryDirectory() as cache:  # nothing measured by the other variant is reused
            proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MPQ_CACHE_DIR": cache})
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        rows[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    whole, lazy = rows["whole float32 copy"], rows["lazy float32 twin"]
    same = whole["configs"] == lazy["configs"]
    weights = whole["weights_bytes"]
    print(f"Llama, {args.blocks} blocks, hidden {args.hidden}: bf16 weights {weights / 1e6:.0f} MB; "
          f"{args.samples} calibration samples; peak RSS of the process (MB) per stage\n")
    stages = list(whole["stages"])
    print("| twin | " + " | ".join(stages) + " | whole compile | x weights | sensitivity s | seconds |")
    print("|---" * (len(stages) + 5) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row['stages'][s]['peak_rss_bytes'] / 1e6:.0f}" for s in stages)
              + f" | {row['peak_rss_bytes'] / 1e6:.0f} | {row['peak_rss_bytes'] / weights:.1f} | {row['sensitivity_seconds']}"
              f" | {row['seconds']} |")
    print(f"\nsame configs and held-out quality: {'yes' if same else 'NO'} ({len(lazy['configs'])} configs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from mpq.environment import hardware
    args.out.write_text(json.dumps({"hardware": hardware(), "blocks": args.blocks, "hidden": args.hidden,
                                    "samples": args.samples, "same_configs": same, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not same:
        raise SystemExit("the two twins emitted different configs")


if __name__ == "__main__":
    main()
