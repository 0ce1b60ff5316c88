"""W8A16: INT8 per-output-channel symmetric weights, fp16/bf16 activations, fp32 accumulation.

Weights: qweight int8 [N, K], scales [N] bf16; w[n, k] = q[n, k] * s[n]. The scale is per
column of the output, so it is applied once to the accumulator, after the K loop.
Same two regimes as W4A16 (split-K gemv for M <= 16, tiled gemm above); K is masked, since an
INT8 layer may have any K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpq.kernels.triton_common import (check_activation, decode_candidates, interpreter_config, interpreting, launch,
                                       regime, store_tile, tile_offsets)


def _candidates(m: int) -> list[dict]:
    """As W4A16's: decode_candidates for M <= 16; tile shape and pipeline depth for prefill."""
    if regime(m) == "gemv":
        # The M = 1 path keeps a [BLOCK_K, BLOCK_N] fp32 accumulator: at 128 x 256 that is 256
        # registers a thread, which spill to local memory inside the K loop (kernels_compile.py).
        return [c for c in decode_candidates(m, [128, 256], 128)
                if c["BLOCK_M"] > 1 or c["BLOCK_N"] * c["BLOCK_K"] <= 128 * 32 * c["num_warps"]]
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "num_warps": w, "num_stages": st}
            for bm, bn, w in ((64, 128, 4), (128, 128, 8), (128, 64, 4)) for bk in (64, 128) for st in (3, 4)]


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                  ATOMIC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_k = tl.program_id(1)
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if BLOCK_M == 1:
        # The scale is per output channel, so the products can pile up per (k, n) over the whole
        # K loop and be summed across threads once at the end, not once per K step.
        acc_k = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        mask_k = (k0 + offs_k) < K
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BLOCK_K, BLOCK_N] bytes of int8
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BLOCK_M == 1:
            # int8 to float without a conversion instruction: the byte read unsigned with its top
            # bit flipped is q + 128; XOR-ing both into the mantissa of 2^23 gives 2^23 + q + 128.
            biased = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True)
            acc_k += x.to(tl.float32).reshape(BLOCK_K, 1) * (biased - 8388736.0)
        else:
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc=acc, out_dtype=tl.float32)
    if BLOCK_M == 1:
        acc = tl.sum(acc_k, axis=0)[None, :]
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, ATOMIC)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """y = x @ (q * s)^T (+ bias) for a 2-D x. `config` pins the tile sizes (tests, interpreter)."""
    n, k = qweight.shape
    check_activation(x, k)
    if scales.shape != (n,):
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a {n}x{k} weight (one per output channel)")
    x = x.contiguous()
    if config is None and interpreting():
        config = interpreter_config(x.shape[0], 64)
    scalars = (x.shape[0], n, k, x.stride(0), qweight.stride(0))
    out = launch(_w8a16_kernel, x, n, (qweight, scales), scalars, {}, config, shape_key=(k,),
                 candidates=lambda: _candidates(x.shape[0]))
    if bias is not None:
        out += bias.to(out.dtype)
    return out
