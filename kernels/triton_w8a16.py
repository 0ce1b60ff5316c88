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

from mpq.kernels.triton_common import (block_m_for, check_activation, interpreter_config, interpreting, launch, regime,
                                       store_tile, tile_offsets)


def _candidates(m: int) -> list[dict]:
    """As W4A16's: tile width, K step and split for decode; tile shape and pipeline depth for prefill."""
    if regime(m) == "gemv":
        return [{"BLOCK_M": block_m_for(m), "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3}
                for bn in (16, 32, 64, 128) for bk in (128, 256) for sk in (1, 2, 4, 8)]
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        mask_k = (k0 + offs_k) < K
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # [BLOCK_K, BLOCK_N] int8
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(x.to(tl.float32).reshape(BLOCK_K, 1) * w.to(tl.float32), axis=0)[None, :]
        else:
            acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), out_dtype=tl.float32)
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
                 candidates=_candidates(x.shape[0]))
    if bias is not None:
        out += bias.to(out.dtype)
    return out
