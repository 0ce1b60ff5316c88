"""The "kl" sensitivity table with block replay (mpq.replay) against full passes, on the demos:
seconds each way, and whether the two tables are identical (they must be, bit for bit).

    python benchmarks/sensitivity_replay.py              # demo, demo-t5 and minilm, fp16/int8/int4
    python benchmarks/sensitivity_replay.py --models demo --samples 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mpq.sensitivity as sensitivity
from mpq.apply import QuantizedWeightCache
from mpq.environment import hardware, versions
from mpq.formats import parse_formats
from mpq.io import write_json_atomic
from mpq.models import SEQ2SEQ_LM, decoder_start_of, load_model
from mpq.profile import example_inputs
from mpq.tasks import calibration_text, make_task
from mpq.trace import trace_model

SAMPLES = {"demo": 32, "demo-t5": 32, "minilm": 64}


def bench(name: str, samples: int | None) -> dict:
    loaded = load_model(name)
    extra = {"decoder_start": decoder_start_of(loaded.model)} if loaded.task == SEQ2SEQ_LM else {}
    task = make_task(loaded.task, loaded.tokenizer, calibration_text(None), samples or SAMPLES[name], 128, **extra)
    graph = trace_model(loaded.model, example_inputs(loaded.task, getattr(loaded.model.config, "vocab_size", 1000)))
    formats = parse_formats("fp16,int8,int4")
    work = sensitivity.measurement_model(loaded.model)
    cache = QuantizedWeightCache(loaded.model)

    def table(replay_blocks: bool):
        start = time.time()
        measured = sensitivity.measure_sensitivity(loaded.model, work, graph.layers, formats, task, "k", {}, cache, False,
                                                   replay_blocks=replay_blocks)
        return measured.values, time.time() - start

    replayed, replay_s = table(True)
    full, full_s = table(False)  # every pass runs every block
    return {"model": name, "layers": len(graph.layers), "samples": samples or SAMPLES[name], "replay_s": round(replay_s, 1),
            "full_s": round(full_s, 1), "saved": round(1 - replay_s / full_s, 3), "identical": replayed == full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,demo-t5,minilm")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: compile's per model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sensitivity_replay.json")
    args = parser.parse_args()
    rows = [bench(name, args.samples) for name in args.models.split(",")]
    print("| model | layers | samples | with replay (s) | full passes (s) | saved | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['samples']} | {r['replay_s']} | {r['full_s']} | {r['saved']:.0%} | "
              f"{r['identical']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"rows": rows, "hardware": hardware(), "versions": versions()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
