"""The `mpq` command: a thin layer over the Python API (mpq.compile_model, mpq.load, mpq.evaluate)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mpq.errors import MpqError


def _compile(args: argparse.Namespace) -> None:
    try:
        from mpq.compile import CompileOptions, compile_model
    except ImportError as exc:  # loading and checking configs need less than compiling does
        raise MpqError(f"mpq compile needs {exc.name or 'a package'}, which is not installed: "
                       f"pip install {exc.name or 'mpq-compiler'}") from exc
    from mpq.memory import format_size

    summary = compile_model(CompileOptions(
        model=args.model, out=args.out, max_mem=args.max_mem, formats=args.formats, group_size=args.group_size,
        int4_symmetric=args.int4_sym, calib=args.calib, samples=args.samples, seq_len=args.seq_len,
        trials=args.trials, seed=args.seed, max_configs=args.max_configs, max_quality_drop=args.max_quality_drop,
        tie=not args.no_tie, embeddings=not args.no_embeddings, keep=args.keep, storage=args.storage, sensitivity=args.sensitivity, method=args.method, refine=args.refine, latency=not args.no_latency,
        spill=not args.no_spill,
        regime=args.regime, batch=args.batch, length=args.length, max_latency=args.max_latency,
        min_speedup=args.min_speedup, prefer=args.prefer, dtype=args.dtype, eval_data=args.eval_data,
        progress=not args.quiet))
    print(f"{len(summary['configs'])} Pareto configs in {args.out}/configs (budget {format_size(summary['budget'])}):")
    for row in summary["configs"]:
        quality = row["metrics"].get("ppl", row["metrics"].get("mean_cosine"))
        speed = _step_times(row)
        print(f"  {row['name']:<28} {format_size(row['bytes']):>10}  {summary['quality_name']} {quality:.4f}{speed}")
    if summary["recommended"]:
        print(f"recommended: {summary['recommended']} ({summary['criteria']['prefer']} that passes)")
    elif any(v is not None for k, v in summary["criteria"].items() if k != "prefer"):
        print("no config passes the acceptance criteria: relax one")
    print(f"report: {args.out}/report.md")


def _step_times(row: dict) -> str:
    """A config's step as timed beside the unquantised model, then as the latency model predicted it, each
    named: the prediction alone, unlabelled, read as a measurement (the demo's 1.00x, timed at 0.86x)."""
    parts = []
    if "speedup" in row["metrics"]:
        parts.append(f"{row['metrics']['latency_s'] * 1e3:.3f} ms timed ({row['metrics']['speedup']:.2f}x)")
    if "speedup_predicted" in row:
        parts.append(f"{row['latency_predicted_s'] * 1e3:.3f} ms predicted ({row['speedup_predicted']:.2f}x)")
    return f"  step {', '.join(parts)}" if parts else ""


def _profile(args: argparse.Namespace) -> None:
    from mpq.profile import profile_model

    print(profile_model(args.model, args.formats, args.group_size, args.int4_sym, args.regime, args.batch, args.length,
                        args.device, args.out, cache=not args.no_cache))


def _inspect(args: argparse.Namespace) -> None:
    from mpq.checkpoint import kernels_of, load
    from mpq.inspect import describe

    if args.check:
        from mpq.device_check import check_on_device, describe_check

        print(describe_check(check_on_device(args.config, args.device)))
        return
    kernels = kernels_of(load(args.config, device=args.device)) if args.kernels else None
    print(describe(args.config, kernels))


def _eval(args: argparse.Namespace) -> None:
    from mpq.evaluate import evaluate_config, evaluate_original

    if (Path(args.target) / "mpq.json").is_file():
        if args.dtype or args.bnb:
            raise MpqError(f"{args.target} is an mpq config: --dtype and --bnb are for plain models")
        result = evaluate_config(args.target, args.device, args.eval_data, not args.no_speed, args.split)
    else:
        result = evaluate_original(args.target, args.dtype, args.bnb, args.device, args.eval_data, not args.no_speed,
                                   args.split)
    print(json.dumps(result, indent=2))


def _heatmap(args: argparse.Namespace) -> None:
    from mpq.report import draw_heatmap
    from mpq.sensitivity import SensitivityTable
    from mpq.trace import LayerInfo

    out = Path(args.out)
    if not (out / "sensitivity.json").is_file() or not (out / "layers.json").is_file():
        raise MpqError(f"{out} has no sensitivity.json and layers.json: give the -o folder of an mpq compile run")
    table = SensitivityTable.load(out / "sensitivity.json")
    layers = [LayerInfo(**layer) for layer in json.loads((out / "layers.json").read_text())["layers"]]
    print(draw_heatmap(table, layers, out / "heatmap.png"))


def _regime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--regime", choices=("decode", "prefill"),
                        help="what one timed step is (default: decode for causal and encoder-decoder LMs, prefill for encoders)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--length", type=int, default=128,
                        help="prefill: tokens per sequence; decode: tokens already in the KV cache (default 128)")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str) -> None:
    """A --device this machine has, or a one-line error (before any model is loaded)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MpqError(f"--device {name} is not a device torch knows: use cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MpqError(f"--device {name}: this machine has no CUDA GPU that torch {torch.__version__} can use; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise MpqError(f"--device {name}: mpq runs on cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    from mpq.models import DTYPES
    from mpq.refine import REFINE_TRIALS

    parser = argparse.ArgumentParser(prog="mpq", description="Sensitivity-driven mixed-precision compiler")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="measure, search and emit a Pareto set of mixed-precision configs")
    c.add_argument("model", nargs="?", default="demo", help="Hugging Face id, local folder, or demo name (demo, demo-t5, minilm)")
    c.add_argument("--max-mem", help="hard budget on resident weight bytes: 6GB, 6GiB, 750MB or bytes (default: unquantised size)")
    c.add_argument("--formats", default="fp16,int8,int4", help="candidate formats (default fp16,int8,int4)")
    c.add_argument("--group-size", type=int, default=128, help="INT4 group size: 32, 64, 128 or 256 (default 128)")
    c.add_argument("--int4-sym", action="store_true", help="symmetric INT4 (no zero point)")
    c.add_argument("--calib", type=Path, help="calibration text: a plain text file, or .jsonl/.json records with a "
                                              "\"text\" field (default: the shipped corpus's calib split)")
    c.add_argument("--samples", type=int, help="calibration samples (default 32 sequences / 256 sentences)")
    c.add_argument("--seq-len", type=int, help="calibration sequence length in tokens (default 128; an encoder-decoder's: half source, half target)")
    c.add_argument("--trials", type=int, default=300, help="Optuna trials (default 300)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-configs", type=int, default=12, help="mixed configs to measure on held-out data (default 12)")
    c.add_argument("--max-quality-drop", type=float,
                   help="acceptance: perplexity ratio - 1 (0.01 = 1%%) for LMs, cosine drop for encoders")
    c.add_argument("--eval-data", default="both", choices=("both", "text", "code"),
                   help="causal LMs: the held-out perplexity that configs are selected and accepted by (text, code or "
                        "both; default both); without --calib, also the kind of the shipped calibration text")
    c.add_argument("--prefer", default="smallest", choices=("smallest", "fastest"),
                   help="which config that passes the acceptance criteria to recommend (default smallest)")
    c.add_argument("--sensitivity", default="kl",
                   help="signal: kl (the model's output divergence, one pass per layer and format; default), "
                        "local (each layer's own output error, one pass in all), fisher (squared gradients "
                        "times rounding error, one forward and backward pass per batch) or hessian "
                        "(Hutchinson trace of each layer's Hessian times rounding error, as HAWQ)")
    c.add_argument("--method", default="rtn",
                   help="how weights are rounded: rtn (round to nearest; default), gptq (Hessian error compensation, "
                        "act-order) or awq (activation-aware channel scaling), or one per format: int8=rtn,int4=gptq "
                        "(int4 covers every int4 group size), or auto: per format, rtn or gptq, whichever config of that "
                        "format alone scores better on held-out (validation) data; sensitivities are measured with it")
    c.add_argument("--dtype", choices=tuple(DTYPES),
                   help="cast the model to this dtype on load (default: as stored): it is then the baseline, and the "
                        "norms (what is not quantised) stay in it: bf16 halves a float32 model's rest")
    c.add_argument("--refine", type=int, default=REFINE_TRIALS,
                   help=f"trials of the measured Optuna study at the budget (default {REFINE_TRIALS}): the exact optimum "
                        "of the additive model and the next-best predicted plans, then plans next to the best measured, "
                        "each measured for real on calibration data; the best wins (0: trust the additive prediction)")
    c.add_argument("--no-embeddings", action="store_true",
                   help="leave the input embedding table (and a head tied to it) as stored (default: a layer like "
                        "the others, looked up row by row in its format; a tied table shares its head's format)")
    c.add_argument("--keep", metavar="REGEX",
                   help="leave the layers whose names match this regular expression as stored, e.g. 'lm_head' or "
                        "'layers\\.0\\.|vision_tower' (a head tied to the input table keeps the table too); "
                        "the card lists them")
    c.add_argument("--no-tie", action="store_true",
                   help="let layers that read one input (q/k/v, gate/up) take different formats (default: tied, so they fuse)")
    c.add_argument("--storage", help="Optuna storage: a journal file path (default OUT/study.journal), 'memory', "
                                      "or a database URL (sqlite:///study.db, postgresql://...) shared by several machines")
    c.add_argument("--max-latency", help="hard cap on the predicted time of one step in --regime: 25ms, 800us, 0.02s")
    c.add_argument("--min-speedup", type=float, help="hard floor on the predicted speedup over the unquantised model (1.5) in the search; "
                        "acceptance checks the measured speedup")
    c.add_argument("--no-latency", action="store_true", help="skip the latency profile: search on bytes and quality only")
    c.add_argument("--no-spill", action="store_true",
                   help="hold the compile's quantised tensors, reference outputs and float32 copies in memory, not in "
                        "files under OUT mapped back (faster only where RAM is plentiful)")
    _regime_arguments(c)
    c.add_argument("-o", "--out", type=Path, default=Path("mpq-out"))
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_compile)

    p = sub.add_parser("profile", help="time every layer shape x format on this machine (the latency model)")
    p.add_argument("model", nargs="?", default="demo", help="Hugging Face id, local folder, or demo name (demo, demo-t5, minilm)")
    p.add_argument("--formats", default="fp16,int8,int4", help="formats to time (default fp16,int8,int4)")
    p.add_argument("--group-size", type=int, default=128, help="INT4 group size (default 128)")
    p.add_argument("--int4-sym", action="store_true", help="symmetric INT4")
    _regime_arguments(p)
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if present)")
    p.add_argument("--no-cache", action="store_true", help="measure again even what the cache holds")
    p.add_argument("-o", "--out", type=Path, help="also write the latency model here as JSON")
    p.set_defaults(func=_profile)

    i = sub.add_parser("inspect", help="show a config's plan and quantisation card")
    i.add_argument("config", type=Path)
    i.add_argument("--kernels", action="store_true", help="load the config and show which kernel runs each layer")
    i.add_argument("--check", action="store_true",
                   help="instead of the card: count the kernels the config runs on --device and compare its outputs with "
                        "the reference on the CPU")
    i.add_argument("--device", default=default_device(), help="device to load on for --kernels/--check (default: cuda if present)")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("eval", help="held-out quality, bytes, peak memory and speed of a config or a plain model")
    e.add_argument("target", help="an mpq config folder, or a model (Hugging Face id, folder, demo name)")
    e.add_argument("--dtype", choices=tuple(DTYPES), help="plain model: cast to this dtype (default: as stored)")
    e.add_argument("--bnb", choices=("int8", "nf4"), help="plain model: quantise on load with bitsandbytes (pip install 'mpq-compiler[bnb]')")
    e.add_argument("--eval-data", default="both", choices=("both", "text", "code"),
                   help="causal LMs: which held-out perplexity is `loss` (default both)")
    e.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if present)")
    e.add_argument("--no-speed", action="store_true", help="skip the speed measurement (quality, bytes and memory only)")
    e.add_argument("--split", default="test", choices=("test", "validation"),
                   help="half of the held-out data: test (default; never seen by compile) or validation (what "
                        "compile chose its configs on)")
    e.set_defaults(func=_eval)

    h = sub.add_parser("heatmap", help="redraw OUT/heatmap.png from OUT/sensitivity.json")
    h.add_argument("out", type=Path)
    h.set_defaults(func=_heatmap)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # huggingface_hub prints its records through a handler of its own and passes them on to the root's as
    # well: each retry of an unreachable hub came out twice (transformers keeps its own to itself already)
    logging.getLogger("huggingface_hub").propagate = False
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        args.func(args)
    except MpqError as exc:
        print(f"mpq: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
