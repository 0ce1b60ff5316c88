"""Prefill's other route: dequantise a layer into a 16-bit weight, then multiply on cuBLAS.

Above a few dozen rows a linear layer is bound by multiply-adds, not by reading its weights, and
FP16 cuBLAS runs them at 756 TFLOP/s on an H200 (4096 x 14336 at M = 512). The fused tiled GEMM
dequantises every weight once per row tile inside its K loop, which Triton does not overlap with
the tensor cores: on that GPU it ran INT4 at 0.38-0.43x of cuBLAS at M = 512 and INT8 at
0.45-0.58x (benchmarks/results/kernels-NVIDIA_H200-*.json). Writing the 16-bit weight once costs
a pass over it at the copy bandwidth (4096 x 14336 INT4: about 146 MB read and written, some 37 us
at that GPU's 4.2 TB/s, before cuBLAS's 89 us at M = 512), so this route should run at about 0.5x
(M = 64) to 0.7x (M = 512) of cuBLAS: not yet timed on a GPU. The tuner times it beside the fused
configs and takes whichever is faster (the config {"DENSE": 1}; kernels/triton_common.launch).

The weight lives only for the call: one layer's 16-bit copy at a time, and never for layers
whose copy would exceed triton_common.DENSE_MAX_BYTES (those keep the fused kernel).

Each 16-bit weight is (q - z) * s computed in fp32 and rounded once, so it equals the reference's
float32 weight (mpq.quantize.dequantize_weight) rounded to the activation dtype, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpq.kernels.triton_common import cdiv

BLOCK_ROWS = 32  # output rows (weight rows) per program


def k_step(group_size: int | None) -> int:
    """Columns per program: for INT4 the largest power of two dividing the group (a program reads one
    scale per row), at most 128; 128 for INT8 (group_size None), whose K is masked."""
    return 128 if group_size is None else min(group_size & -group_size, 128)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_sg,
                    INT4: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = (q[n, k] - z) * s, rounded once to out's dtype. INT4: bytes of two nibbles (the
    even k in the low one), a scale (and zero) per GROUP columns, BLOCK_K inside one group. INT8: a
    scale per row; K masked (any K)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    if INT4:
        offs_j = tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_j)[None, :], mask=mask_n[:, None],
                         other=0).to(tl.int32)
        q = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), (BLOCK_N, BLOCK_K)).to(tl.float32)
        at = offs_n * stride_sn + (k0 // GROUP) * stride_sg  # scales and zeros row- or column-major
        scale = tl.load(s_ptr + at, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + at, mask=mask_n, other=0.0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 8.0, tl.float32)
        w = (q - zero[:, None]) * scale[:, None]
        mask = mask_n[:, None]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight of an INT4 layer (canonical packing) in `dtype`, K steps of one group's share."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    block_k = k_step(group_size)
    _dequant_kernel[(cdiv(n, BLOCK_ROWS), cdiv(k, block_k))](
        qweight, scales, zeros if zeros is not None else scales, out, n, k, qweight.stride(0), *scales.stride(),
        INT4=True, GROUP=group_size, HAS_ZEROS=zeros is not None, BLOCK_N=BLOCK_ROWS, BLOCK_K=block_k)
    return out


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight of an INT8 per-channel layer in `dtype`."""
    n, k = qweight.shape
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    block_k = k_step(None)
    _dequant_kernel[(cdiv(n, BLOCK_ROWS), cdiv(k, block_k))](
        qweight, scales, scales, out, n, k, qweight.stride(0), 0, 0,
        INT4=False, GROUP=1, HAS_ZEROS=False, BLOCK_N=BLOCK_ROWS, BLOCK_K=block_k)
    return out

