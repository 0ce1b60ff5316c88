"""Prefill turned round, probed on the compiler: is it worth a place in the tuner's space?

At M > 16 the word tiles (kernels/triton_w4a16.py: word_dots' prefill branch) multiply x by the
dequantised weights as Hopper's warpgroup MMA's second operand, which must come from shared
memory: each K step stores the weights there (STS, a fence, a barrier) before the MMA reads them.
Turned round, out^T = W x^T, the weights are the MMA's first operand, which it may take from
registers. This kernel (prefill_turned) does that in K's natural order: thread t of a quad takes
byte t of every word of its rows (the step's words broadcast along the byte axis, read from the
shared memory the pipeline filled), which is where the MMA's operand layout puts inputs 2t and
2t + 1 of each 8, so x stays as it lies (16-byte copies) and nothing moves between threads; a byte
becomes two 16-bit floats B + q by one multiply (q1 to bits 16..19) and one AND-OR, and the
weight is (B + q - (B + z)) * s in 16 bits, two at an instruction, as the word tiles do.

This script compiles it and the word tiles of the same shape for sm_90 (no GPU needed) and prints
their K loops side by side: instructions a step, whether the MMA reads its first operand from
registers (x in the word tiles, the weights turned round; the word tiles' weights come from the
shared memory their STS fill), and the shared-memory stores and copies in the loop. It is not in the tuner's space: with Triton
3.6 (the lent H200 machine's) a step takes more instructions than the word tiles' (its scale pairs
come by 32 4-byte copies a warp), so only a GPU with a newer Triton could show it paying.

    python benchmarks/prefill_turned_probe.py          # sm_90, 4096 x 4096 INT4-g128, bf16 x
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import triton
import triton.language as tl

from mpq.kernels.triton_common import store_tile, tile_offsets
from mpq.kernels.triton_w4a16 import activation_rows, pair_constants

TILES = ((128, 128, 64, 8), (256, 128, 64, 8))  # BLOCK_M (rows of x), BLOCK_N (of W), BLOCK_K, warps


@triton.jit
def byte_pair(words, b, exponents):
    """Byte b of each word (its nibbles q0, q1: inputs 8j + 2b, 8j + 2b + 1) as one register of two
    16-bit floats, B + q0 in the low half and B + q1 in the high: times 0x1001 copies the byte 12
    bits up, so q1 lands in bits 16..19 while q0 stays in 0..3, and the mask drops the rest."""
    byte = (words >> (8 * b)) & 0xFF
    return ((byte * 0x1001) & 0x000F000F) | exponents


@triton.jit
def prefill_turned(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_sg, stride_om,
                   GROUP: tl.constexpr, X_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """out = x @ dequant(W)^T for bf16 x given as int32 pairs, asymmetric INT4 weights whose bf16 scale
    and zero point are one 32-bit word (mpq.qlinear.scale_zero_pairs), computed as out^T = W x^T."""
    J: tl.constexpr = BLOCK_K // 8
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
    mask_n = offs_n < N
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_wn // 4) + tl.arange(0, J)[None, :]
    # the scale pairs unmasked (a column past N reads the last one, stored never): with the mask,
    # Triton 3.6 laid their load out as the store's and each warp copied all of them, 48 ISETP a step
    pairs_ptr = s_ptr.to(tl.pointer_type(tl.int32)) + tl.minimum(offs_n, N - 1) * (stride_sn // 2)
    x_rows = activation_rows(x_ptr, offs_m, stride_xm, True, X_DTYPE)
    _, exponents, base = pair_constants(N, X_DTYPE)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        words = tl.load(words_ptr + k0 // 8, mask=mask_n[:, None], other=0)  # [BLOCK_N, J]
        pair = tl.load(pairs_ptr + (k0 // GROUP) * (stride_sg // 2))
        scale = (pair << 16).to(tl.float32, bitcast=True)
        zero = ((pair >> 16) << 16).to(tl.float32, bitcast=True)
        x = tl.load(x_rows[:, None] + k0 + tl.arange(0, BLOCK_K)[None, :], mask=(offs_m < M)[:, None], other=0.0)
        pairs = tl.reshape(byte_pair(words[:, :, None], tl.arange(0, 4)[None, None, :], exponents), (BLOCK_N, 4 * J))
        halves = tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16)).to(X_DTYPE, bitcast=True)
        w = tl.reshape(halves, (BLOCK_N, BLOCK_K)).to(DOT_DTYPE)
        w = (w - (zero + base).to(DOT_DTYPE)[:, None]) * scale.to(DOT_DTYPE)[:, None]
        acc = tl.dot(w, tl.trans(x.to(DOT_DTYPE)), acc=acc, out_dtype=tl.float32)
    store_tile(out_ptr, tl.trans(acc), offs_m, offs_n, M, N, stride_om, out_ptr, out_ptr, False, 1)


def turned_linear(x, qweight, pairs, group: int, block_m: int, block_n: int, block_k: int):
    """Launch prefill_turned on torch tensors: x [M, K] bf16, qweight [N, K/2] uint8, pairs [G, N, 2]
    bf16 (scale, zero point). The test's entry (interpreter: fp32 dots)."""
    import torch

    from mpq.kernels.triton_common import dot_dtype

    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    prefill_turned[grid](x.view(torch.int32), qweight, pairs, out, m, n, k, k // 2, qweight.stride(0), 2, 2 * n, n,
                         GROUP=group, X_DTYPE=tl.bfloat16, DOT_DTYPE=dot_dtype(x.dtype), BLOCK_M=block_m,
                         BLOCK_N=block_n, BLOCK_K=block_k, STAGES=3)
    return out


def probe(block_m: int, block_n: int, block_k: int, warps: int, n: int, k: int, group: int, arch: int) -> dict:
    """prefill_turned compiled for one tile, its K loop read."""
    import kernels_compile as kc
    from sass_reading import MMA_A_IN_REGISTERS, k_loop, opcode_counts

    runtime = {"x_ptr": ("*i32", 0), "w_ptr": ("*u8", 0), "s_ptr": ("*bf16", 0), "out_ptr": ("*bf16", 0),
               "M": ("i32", 512), "N": ("i32", n), "K": ("i32", k), "stride_xm": ("i32", k // 2),
               "stride_wn": ("i32", k // 2), "stride_sn": ("i32", 2), "stride_sg": ("i32", 2 * n), "stride_om": ("i32", n)}
    constexprs = {"GROUP": group, "X_DTYPE": tl.bfloat16, "DOT_DTYPE": tl.bfloat16, "BLOCK_M": block_m,
                  "BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": 3}
    compiled = kc.compile_for(prefill_turned, runtime, constexprs, warps, 3, arch)
    loop = k_loop(kc.disassemble(compiled.asm["cubin"]))
    return loop_summary(opcode_counts(loop), any(MMA_A_IN_REGISTERS.search(line) for line in loop),
                        compiled.metadata.shared)


def loop_summary(opcodes: dict, first_operand_from_registers: bool, shared: int) -> dict:
    """What a K loop's SASS says about the MMA's operands and the shared memory it goes through."""
    return {"loop_instructions": sum(opcodes.values()), "first_operand_from_registers": first_operand_from_registers,
            "STS": opcodes.get("STS", 0), "LDGSTS": opcodes.get("LDGSTS", 0), "BAR": opcodes.get("BAR", 0),
            "shared": shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    import kernels_compile as kc  # sets TRITON_INTERPRET=0: the real compiler, whatever the environment says

    n = k = 4096
    group = 128
    rows = []
    for block_m, block_n, block_k, warps in TILES:
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": 1, "num_warps": warps,
                  "num_stages": 3}
        word_tiles = kc.compile_candidate("w4a16", 512, config, n, k, group, args.arch)
        sass_rows = {"word tiles": loop_summary(word_tiles["loop_opcodes"], word_tiles["mma_a_from_registers"],
                                                word_tiles["shared"]),
                     "turned round": probe(block_m, block_n, block_k, warps, n, k, group, args.arch)}
        for path, summary in sass_rows.items():
            rows.append({"tile": f"{block_m}x{block_n}x{block_k}", "warps": warps, "path": path, **summary})
    print(f"# sm_{args.arch}, Triton {triton.__version__}, INT4-g{group} {n}x{k}, M = 512, bf16 x: K loop a step")
    print("| tile (x rows x W rows x K) | warps | path | instructions | MMA's first operand from registers | STS | LDGSTS | BAR | shared B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tile']} | {r['warps']} | {r['path']} | {r['loop_instructions']} | {r['first_operand_from_registers']} | "
              f"{r['STS']} | {r['LDGSTS']} | {r['BAR']} | {r['shared']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill-turned-probe-sm{args.arch}-triton{triton.__version__}.json"
    path.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
