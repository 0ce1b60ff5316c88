"""Grouped 16-bit experts: a mixture's unquantised (fp16-format) experts in one launch.

The plan may keep some experts of a mixture in 16 bits (the ones the router sends the most
tokens, or the most sensitive). Without a grouped kernel for them, one such expert sent the
whole mixture back to the per-expert loop at decode (a host sync and 2 x top-k launches, see
mpq.expert_stacks). This kernel runs the 16-bit stack as the INT4/INT8 grouped kernels run
theirs: every (token, expert) pair one row of x, each row against its own expert's [N, K]
weight, one program per (row, column tile, K split), fp32 accumulation on the FMA units.

Weights: [E, N, K] in any float dtype (the model's: bf16, fp16, or fp32 for a float32 model).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpq.kernels.triton_common import (accumulator_fits, check_activation, check_grouped_config, check_stacks, grouped_candidates,
                                       grouped_row, interpreter_config, interpreting, launch, store_tile)


def grouped_space() -> list[dict]:
    # 16-bit weights: a 64-element K step is 128 bytes of a weight row, as W8A16's 128.
    return grouped_candidates([32, 64, 128], accumulator_fits)


@triton.jit
def _dense_grouped_kernel(x_ptr, w_ptr, slot_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_we, stride_om, sums_ptr, counts_ptr,
                          ATOMIC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_k = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    pair, offs_m, offs_n, mask_n, expert = grouped_row(slot_ptr, M, N, BLOCK_N)
    w_ptr += expert * stride_we
    # Products pile up per (k, n) over the whole K loop and are summed across threads once at the
    # end, not once per K step (the reduction costs more issue slots than the multiply-adds).
    acc_k = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        mask_k = (k0 + offs_k) < K
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        x = tl.load(x_ptr + pair * stride_xm + k0 + offs_k, mask=mask_k, other=0.0)
        acc_k += x.to(tl.float32)[:, None] * w.to(tl.float32)
    acc = tl.sum(acc_k, axis=0)[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, sums_ptr, counts_ptr, ATOMIC, SPLIT_K)


def dense_grouped(x: torch.Tensor, slots: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """y[p] = x[p] @ weight[slots[p]]^T for every row p of x, in one launch: weight [E, N, K] the
    stacked 16-bit experts; slot -1 (an expert another stack holds): row of y 0. y has x's dtype."""
    check_stacks(x, slots, (weight,))
    n, k = weight.shape[-2:]
    check_activation(x, k)
    if weight.stride(-1) != 1:
        raise ValueError("the stacked weights must be contiguous along K")
    x = x.contiguous()
    if config is None and interpreting():
        config = interpreter_config(x.shape[0], 64, grouped=True)
    check_grouped_config(config, slots)
    scalars = (x.shape[0], n, k, x.stride(0), weight.stride(-2), weight.stride(0))
    return launch(_dense_grouped_kernel, x, n, (weight, slots), scalars, {}, config,
                  shape_key=(k, "grouped", weight.shape[0], weight.dtype), candidates=grouped_space)
