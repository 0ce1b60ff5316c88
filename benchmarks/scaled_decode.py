"""Greedy decoding of Llama-3-8B-shaped blocks, bf16 against every block linear layer quantised.

The demo answers "does a compiled config decode on the GPU"; its layers (256 to 1536 wide, 5.8M
parameters) sit in the L2 cache, so each kernel costs its launch floor whatever its format. Here
the blocks have Llama 3 8B's shapes (4096 wide, a 14336-wide MLP, 32 query and 8 key/value heads)
and random weights (built from a config: nothing to download), `--layers` of its 32, with a
32000-token vocabulary: at batch 1 a decode step reads every weight once, so tokens/s follows the
bytes read, which is what INT4 and INT8 cut. The quantised model takes every linear layer of the
blocks in one format (round to nearest), q/k/v and gate/up fused as `mpq compile` fuses them
(mpq.fusion); embeddings and the head stay bf16. Both run graph_decode's static-cache loop, eager
and replayed from a CUDA graph. (Random weights give near-tied logits, so a format's greedy
tokens may part from the bf16 model's, and even from its own generate()'s, without anything
being wrong: the kernel table and the demo check the numbers; this times them.)

    python benchmarks/scaled_decode.py                       # a CUDA machine: 4 blocks, INT4-g128 and INT8, INT4 with PDL
    python benchmarks/scaled_decode.py --smoke               # tiny blocks on the CPU: checks the script

Prints a table and writes JSON (scaled-decode-DEVICE.json). gpu_session.sh runs it after the
kernel table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if str(Path(__file__).parent) not in sys.path:  # imported by path (the tests), not run as a script
    sys.path.insert(0, str(Path(__file__).parent))

# Llama 3 8B's blocks (config.json of meta-llama/Meta-Llama-3-8B), and a tiny stand-in for --smoke
BLOCKS = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 32000, "rope_theta": 500000.0, "max_position_embeddings": 8192}
SMOKE_BLOCKS = {**BLOCKS, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 128, "max_position_embeddings": 256}
SHARED_INPUTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def llama_blocks(layers: int, device: str, smoke: bool = False) -> torch.nn.Module:
    """A LlamaForCausalLM of `layers` blocks in bf16 on `device`, random weights (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **(SMOKE_BLOCKS if smoke else BLOCKS))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def quantise_blocks(model: torch.nn.Module, fmt_name: str) -> list[str]:
    """Every linear layer of the model's blocks in `fmt_name`, in place, each block's shared-input
    groups (q/k/v, gate/up) fused by the compiler's rule (mpq.fusion.fusion_groups); returns the
    layers' names."""
    from mpq.apply import build_layers, set_module
    from mpq.formats import get_format
    from mpq.fusion import fusion_groups
    from mpq.quantize import quantize_weight

    fmt = get_format(fmt_name)
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")]
    modules = {name: model.get_submodule(name) for name in names}
    tensors = {name: quantize_weight(module.weight.detach(), fmt) for name, module in modules.items()}
    shared = [[f"model.layers.{i}.{member}" for member in group]
              for i in range(len(model.model.layers)) for group in SHARED_INPUTS]
    groups = fusion_groups({name: fmt.name for name in names}, shared,
                           {name: module.bias is not None for name, module in modules.items()})
    layers = build_layers({name: fmt for name in names}, tensors, {name: module.bias for name, module in modules.items()},
                          {name: module.in_features for name, module in modules.items()}, groups,
                          device=next(model.parameters()).device,
                          dtypes={name: module.weight.dtype for name, module in modules.items()})
    for name, layer in layers.items():
        set_module(model, name, layer)
    return names


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the blocks hold (a quantised layer's packed weight, scales and zeros; norms too)."""
    blocks = model.model.layers
    # parameters() and buffers() give a shared tensor once; a fused group's later members do not register it
    return sum(t.numel() * t.element_size() for t in [*blocks.parameters(), *blocks.buffers()])


def scaled_decode(device: str, layers: int, formats: list[str], tokens: int, smoke: bool = False,
                  on_row: Callable[[dict], None] = lambda rows: None) -> dict:
    """graph_decode's report for the bf16 blocks and for each format, with the blocks' weight bytes
    and what each quantised model's layers run (mpq's `kernel` per layer kind). `on_row` gets the
    rows so far after each model (a run cut off at its time limit keeps them)."""
    from graph_decode import decode_report

    # 4 tokens: the prompt's call lands in an M bucket the kernel table tuned (M = 4)
    prompt = torch.tensor([[1, 2, 3, 4]], device=device)
    rows = {}
    for fmt_name in ["bf16", *formats]:
        base_format, _, option = fmt_name.partition("+")  # "int4-g128+pdl": that format's layers launched with PDL
        start = time.perf_counter()
        model = llama_blocks(layers, device, smoke)
        names = [] if base_format == "bf16" else quantise_blocks(model, base_format)
        kernels = sorted({model.get_submodule(name).kernel for name in names})
        built_s = time.perf_counter() - start
        pdl, launches = False, contextlib.nullcontext()
        if option == "pdl" and any(k.startswith("triton") for k in kernels):  # triton is there: import it
            from mpq.kernels.triton_common import dependent_launch, pdl_capable

            pdl = pdl_capable(torch.device(device))
            launches = dependent_launch(pdl)
        with launches:  # the graph captured inside keeps its launches' programmatic edges
            report = decode_report(model, prompt, tokens)
        rows[fmt_name] = {**report, "weight_bytes": weight_bytes(model), "layers_quantised": len(names),
                          "kernels": kernels, "built_s": built_s, "pdl": pdl}
        print(f"{fmt_name}: {rows[fmt_name]}", flush=True)
        on_row(rows)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny blocks on the CPU, no GPU needed")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default 4; 2 with --smoke)")
    parser.add_argument("--formats", default="int4-g128,int8,int4-g128+pdl",
                        help="formats of the quantised blocks; FORMAT+pdl: its Triton launches with PDL (MPQ_PDL=1), "
                             "where the GPU takes it (Hopper on)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded after the prompt")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("benchmarks/scaled_decode.py times decoding on a GPU: run it on a CUDA machine, or use --smoke")
    layers = args.layers or (2 if args.smoke else 4)
    tokens = min(args.tokens, 8) if args.smoke else args.tokens
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scaled-decode-{name.replace(' ', '_')}{'-smoke' if args.smoke else ''}.json"

    def save(rows: dict) -> None:
        path.write_text(json.dumps({"device": name, "torch": torch.__version__, "layers": layers, "tokens": tokens,
                                    "blocks": SMOKE_BLOCKS if args.smoke else BLOCKS, "rows": rows}, indent=2) + "\n")

    rows = scaled_decode(device, layers, args.formats.split(","), tokens, args.smoke, on_row=save)
    print(f"\n# {layers} Llama-3-8B-shaped blocks{' (smoke: tiny blocks)' if args.smoke else ''}, {name}, "
          f"batch 1, {tokens} tokens after a 4-token prompt")
    print("| weights | block weight MB | eager tokens/s | CUDA graph tokens/s | x bf16 (graph) | kernels |")
    print("|---|---|---|---|---|---|")
    base = rows["bf16"].get("graph_tokens_per_s")
    for fmt_name, row in rows.items():
        graph = row.get("graph_tokens_per_s")
        ratio = f"{graph / base:.2f}x" if graph and base else "-"
        print(f"| {fmt_name} | {row['weight_bytes'] / 1e6:.1f} | {row['static_eager_tokens_per_s']:.0f} | "
              f"{f'{graph:.0f}' if graph else row.get('graph_error', '-')} | {ratio} | {', '.join(row['kernels']) or '-'} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
