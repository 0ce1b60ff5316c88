"""How fast a GPU reads a weight matrix in the pieces the decode kernels read it (GPU; no arithmetic).

Run 2 (H200): INT8's tensor-core tiles streamed their weights at 3.2-3.9 TB/s and INT4's at
1.1-2.2, though both issued about 4-5 instructions a weight byte and their launches left each
scheduler a similar handful of warps (2.6-6.8 against 1.0-2.9; GPU_NOTES.md). One thing that
differs is what a K step reads of each weight row: every INT4 tile takes 64 bytes of a row a step
(K steps of 128, half a 128-byte line), INT8's 128 or 256; and in run 2's decode-space sweep INT4's
K steps of 64 (32 bytes a row) were 10-30% slower than those of 128 on every code path. This script
takes the arithmetic away: a kernel that only reads the layer's packed rows as a decode tile does,
[BLOCK_N rows x CHUNK bytes] a step, each program CHUNK x SPLIT bytes of a row apart from one step to
the next, through Triton's pipeline (cp.async, STAGES - 1 steps ahead: compiled for sm_90 with
Triton 3.6 its loop holds 16-byte LDGSTS copies and no plain load, about 70-150 instructions a step
of 4-16 KB), and XORs what it read (so nothing is left unread; the smoke run checks each program
read its rows' steps and no others). Timed as gpu_kernels.py times a layer (a CUDA graph over copies that
overflow L2), against the device's copy bandwidth. If 64-byte pieces read well under the 128- and
256-byte ones, INT4's tiles need longer runs of a row a step (two steps a pass, or a weight layout
that puts a step's pieces of neighbouring rows together; the first is built and in the tuner's
space: triton_w4a16's STEPS and long_steps); if they read as well, the INT4 tiles' time is their
own (time_from_l2 in gpu_kernels.py measures that side).

    python benchmarks/row_reads.py --out $OUT       # on a CUDA machine (not yet run on one)
    python benchmarks/row_reads.py --smoke          # tiny shape, every config, correctness only (CPU: interpreter)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel below is made: a smoke run on the CPU interprets it

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gpu_kernels import ROTATE_BYTES, benchmark_device, copy_bandwidth  # a sibling script: run as one, this folder is first on sys.path

SHAPES = {"INT4 up 4096->14336": (14336, 2048), "INT4 down 14336->4096": (4096, 7168)}  # rows, bytes a row
SMOKE_SHAPES = {"smoke 40 rows x 768 B": (40, 768)}
CHUNKS = (32, 64, 128, 256)  # bytes of a row a step: INT4 K steps of 64 and 128, INT8's of 128 and 256
TILES = ((64, 1), (128, 4))  # rows a program and its warps: the turned tile's, and a 4-warp one
SPLITS = (4, 8)
STAGES = 3


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def read_rows(w_ptr, out_ptr, N, ROW_WORDS, stride_wn, SPLIT, BLOCK_N: tl.constexpr, CHUNK_WORDS: tl.constexpr,
              STAGES: tl.constexpr):
    """Program (n tile, k split) reads [BLOCK_N, CHUNK_WORDS] int32 words of its rows a step, the
    steps CHUNK_WORDS x SPLIT words apart from pid_k's (the decode kernels' split-K walk), and
    stores the XOR of each row's words it read at out[pid_k, row]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_wn // 4) + tl.arange(0, CHUNK_WORDS)[None, :]
    acc = tl.zeros((BLOCK_N, CHUNK_WORDS), dtype=tl.int32)
    for k in tl.range(pid_k * CHUNK_WORDS, ROW_WORDS, CHUNK_WORDS * SPLIT, num_stages=STAGES):
        acc ^= tl.load(words_ptr + k, mask=mask_n[:, None], other=0)
    tl.store(out_ptr + pid_k * N + offs_n, tl.reduce(acc, 1, _xor), mask=mask_n)


def launch(weight: torch.Tensor, out: torch.Tensor, block_n: int, chunk: int, split: int, warps: int) -> torch.Tensor:
    """read_rows over a [N, row bytes] uint8 weight (row bytes a multiple of chunk x split); out [split, N] int32."""
    n, row_bytes = weight.shape
    read_rows[(triton.cdiv(n, block_n), split)](weight, out, n, row_bytes // 4, weight.stride(0), split, BLOCK_N=block_n,
                                                CHUNK_WORDS=chunk // 4, STAGES=STAGES, num_warps=warps, num_stages=STAGES)
    return out


def expected_xor(weight: torch.Tensor, chunk: int, split: int) -> np.ndarray:
    """What read_rows stores: per split and row, the XOR of the int32 words of its steps."""
    words = weight.cpu().numpy().view(np.int32)  # [N, row words]
    per_step = words.reshape(words.shape[0], -1, split, chunk // 4)  # [N, passes, split, chunk words]
    return np.bitwise_xor.reduce(np.bitwise_xor.reduce(per_step, axis=3), axis=1).T  # [split, N]


def configs(smoke: bool) -> list[dict]:
    if smoke:
        return [{"block_n": 16, "warps": 1, "chunk": chunk, "split": split} for chunk in CHUNKS for split in (1, 3)]
    return [{"block_n": block_n, "warps": warps, "chunk": chunk, "split": split}
            for block_n, warps in TILES for chunk in CHUNKS for split in SPLITS]


def measure(name: str, n: int, row_bytes: int, device: str, smoke: bool, copy_gbps: float | None) -> list[dict]:
    """Every config on an [n, row_bytes] layer: checked against expected_xor, and (not smoke) timed
    over copies that overflow L2 (mpq.kernels.triton_tuning.rotating_time_ms)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8, generator=generator).to(device)
    copies = [weight] if smoke else [weight.clone() for _ in range(max(2, ROTATE_BYTES // weight.numel() + 1))]
    rows = []
    for c in configs(smoke):
        if row_bytes % (c["chunk"] * c["split"]):
            continue
        out = torch.empty((c["split"], n), dtype=torch.int32, device=device)
        got = launch(weight, out, c["block_n"], c["chunk"], c["split"], c["warps"]).cpu().numpy()
        row = {"shape": name, "rows": n, "row_bytes": row_bytes, **c, "programs": triton.cdiv(n, c["block_n"]) * c["split"],
               "right": bool((got == expected_xor(weight, c["chunk"], c["split"])).all())}
        if not smoke:
            from mpq.kernels.triton_tuning import rotating_time_ms

            ms = rotating_time_ms([lambda w=w: launch(w, out, c["block_n"], c["chunk"], c["split"], c["warps"])
                                   for w in copies])
            row.update({"ms": ms, "GBps": weight.numel() / (ms * 1e-3) / 1e9})
            row["pct_of_copy_bw"] = 100 * row["GBps"] / copy_gbps
        rows.append(row)
        print_row(row)
    return rows


def print_row(r: dict) -> None:
    timed = f" {r['ms'] * 1e3:.1f} us, {r['GBps']:.0f} GB/s ({r['pct_of_copy_bw']:.0f}% of copy)" if "ms" in r else ""
    print(f"| {r['shape']} | {r['block_n']} rows, {r['warps']} warp(s) | {r['chunk']} B | {r['split']} | {r['programs']} | "
          f"{r['right']} |{timed} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, no timing: checks what each config reads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = benchmark_device("benchmarks/row_reads.py", args.smoke)
    from mpq.io import write_json_atomic
    from mpq.qlinear import triton_version

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "triton": triton_version(), "stages": STAGES, "rows": []}
    if not args.smoke:
        report["copy_GBps"] = copy_bandwidth() / 1e9
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("row-reads-smoke.json" if args.smoke else f"row-reads-{report['device'].replace(' ', '_')}.json")
    start = time.perf_counter()
    print("| layer | program | bytes of a row a step | split | programs | right | time |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, row_bytes) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        report["rows"] += measure(name, n, row_bytes, device, args.smoke, report.get("copy_GBps"))
        report["elapsed_s"] = time.perf_counter() - start
        write_json_atomic(path, report)
    print(f"wrote {path}")
    wrong = [r for r in report["rows"] if not r["right"]]
    if wrong:
        raise SystemExit(f"{len(wrong)} configs read other bytes than their rows' steps")


if __name__ == "__main__":
    main()
