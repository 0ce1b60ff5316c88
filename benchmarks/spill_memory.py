"""Memory of a whole `mpq compile` with its kept tensors in files mapped back (mpq.spill, the
default) against held in memory (`--no-spill`).

Each run is a compile in a process of its own (the CLI's own entry point) of a randomly
initialised bf16 Llama (no download) with a vocabulary of Llama-2's size, whose reference
log-probabilities and float32 head are large beside its blocks, as a real LM's are. Per run, from
the compile's summary.json: the peak resident memory (RSS) and the peak of its part no file backs
(anonymous: what must fit in RAM, as the kernel can drop a mapped file's clean pages), the bytes
spilled, and the seconds. The variants alternate, `--repeats` times each, since the allocator's
peak moves from run to run. Each run measures its sensitivities afresh (a cache folder of its own),
but all share the first run's choice of CPU path for quantised layers (mpq.kernels.cpu_thresholds
times it once per machine; a near tie could go either way from one probe to the next). Both
variants must give the same sensitivities and the same configs (formats, bytes, calibration
divergence, held-out perplexities), to the last bit. Prints a table, writes JSON.

    python benchmarks/spill_memory.py                                      # 4 blocks, hidden 1024, vocab 32000
    python benchmarks/spill_memory.py --blocks 2 --hidden 128 --vocab 4096 --samples 4 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpq.kernels.cpu_thresholds import FILENAME

ROOT = Path(__file__).resolve().parent
VARIANTS = {"in memory (--no-spill)": ["--no-spill"], "spilled to files (default)": []}


def make_model(folder: Path, args: argparse.Namespace) -> int:
    """Save the random bf16 Llama with the demo's tokenizer in `folder`; returns its weight bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mpq.models import DEMO_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(args.vocab, len(tokenizer)), hidden_size=args.hidden,
                         intermediate_size=args.hidden * 3, num_hidden_layers=args.blocks,
                         num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def compile_once(model: Path, out: Path, flags: list[str], args: argparse.Namespace, tiles: Path | None) -> dict:
    """One compile in a process of its own, with a cache folder of its own (it measures every
    sensitivity, none is reused from an earlier run) holding the CPU path choice `tiles`, where the
    first run measured one (none is measured where MPQ_CPU_TILES pins it, as the tests do)."""
    if tiles is not None and tiles.exists():
        (out / "cache").mkdir(parents=True)
        shutil.copy(tiles, out / "cache" / tiles.name)
    command = [sys.executable, "-m", "mpq.cli", "compile", str(model), "-o", str(out), "-q", "--no-latency",
               "--samples", str(args.samples), "--trials", "100", "--refine", "0", "--max-configs", "2", *flags]
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "MPQ_CACHE_DIR": str(out / "cache")})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    memory = summary["memory"]
    return {"peak_rss_bytes": memory["peak_rss_bytes"], "peak_anonymous_bytes": memory["peak_anonymous_bytes"],
            "spilled_bytes": memory["spilled_bytes"], "seconds": round(time.time() - start, 1),
            "stage_seconds": summary["seconds"], "anonymous_stages": memory["anonymous_stages"],
            "sensitivity": json.loads((out / "sensitivity.json").read_text())["values"],
            "configs": [[row["counts"], row["bytes"], row["metrics"]] for row in summary["configs"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 128 tokens (default 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "spill_memory.json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {label: [] for label in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        weights = make_model(model, args)
        for repeat in range(args.repeats):
            for i, (label, flags) in enumerate(VARIANTS.items()):
                tiles = None if repeat == i == 0 else Path(tmp) / "out-0-0" / "cache" / FILENAME
                runs[label].append(compile_once(model, Path(tmp) / f"out-{repeat}-{i}", flags, args, tiles))
    first = runs["in memory (--no-spill)"][0]
    same = all(run["sensitivity"] == first["sensitivity"] and run["configs"] == first["configs"]
               for variant in runs.values() for run in variant)
    print(f"Llama, {args.blocks} blocks, hidden {args.hidden}, vocabulary {args.vocab}: bf16 weights {weights / 1e6:.0f} MB; "
          f"mpq compile --no-latency --samples {args.samples} (x 128 tokens); {args.repeats} runs each\n")
    print("| kept tensors | spilled (MB) | peak RSS (MB) | peak anonymous (MB): median (min-max) | seconds (median) |")
    print("|---|---|---|---|---|")
    rows = {}
    for label, variant in runs.items():
        anonymous = [run["peak_anonymous_bytes"] / 1e6 for run in variant]
        rss = [run["peak_rss_bytes"] / 1e6 for run in variant]
        rows[label] = {"spilled_bytes": variant[0]["spilled_bytes"], "peak_rss_mb": rss, "peak_anonymous_mb": anonymous,
                       "seconds": [run["seconds"] for run in variant],
                       "anonymous_stages_mb": [{k: round(v / 1e6) for k, v in run["anonymous_stages"].items()}
                                               for run in variant]}
        print(f"| {label} | {variant[0]['spilled_bytes'] / 1e6:.0f} | {statistics.median(rss):.0f} | "
              f"{statistics.median(anonymous):.0f} ({min(anonymous):.0f}-{max(anonymous):.0f}) | "
              f"{statistics.median(rows[label]['seconds']):.1f} |")
    print(f"\nsame sensitivities and configs (held-out perplexities included), bit for bit: {'yes' if same else 'NO'}")
    from mpq.environment import hardware
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hardware(), "blocks": args.blocks, "hidden": args.hidden,
                                    "vocab": args.vocab, "samples": args.samples, "weights_bytes": weights,
                                    "same_results": same, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not same:
        raise SystemExit("the compiles with and without the spill gave different results")


if __name__ == "__main__":
    main()
