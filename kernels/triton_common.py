"""Shared launch helpers for mpq's Triton kernels (imported only when a Triton kernel runs)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mpq.kernels.triton_tuning import choose_config, m_bucket


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(x_dtype: torch.dtype):
    """The dtype fed to tl.dot: the activation dtype on a GPU; fp32 under the interpreter, whose
    bf16 tl.dot returns garbage (seen with triton 3.6-3.9)."""
    if interpreting():
        return tl.float32
    return tl.bfloat16 if x_dtype == torch.bfloat16 else tl.float16


def regime(m: int) -> str:
    """Decode-sized batches (M <= 16) are memory-bound: split-K GEMV. Larger M: tiled GEMM."""
    return "gemv" if m <= 16 else "gemm"


def block_m_for(m: int) -> int:
    # M == 1 takes the multiply-and-sum path (no tensor cores needed); otherwise tl.dot needs 16+ rows.
    return 1 if m == 1 else 16


def check_activation(x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"expected x of shape [M, {in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


def interpreter_config(m: int, k_step: int) -> dict:
    """One fixed small config under the interpreter, where autotuning every config would take minutes."""
    if regime(m) == "gemv":
        return {"BLOCK_M": block_m_for(m), "BLOCK_N": 32, "BLOCK_K": k_step, "SPLIT_K": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": k_step, "SPLIT_K": 1}


def run_config(kernel, x: torch.Tensor, n: int, pointers: tuple, scalars: tuple, meta: dict,
               config: dict) -> torch.Tensor:
    """Allocate the output and launch one config.

    Kernels take (x, *pointers, out, *scalars, stride of out, **meta). A config with SPLIT_K > 1
    adds its partial sums through fp32 atomics into a zeroed buffer that is cast back here; one
    without split stores its tile once, in the activation dtype, with no extra launch.
    """
    m = x.shape[0]
    atomic = config["SPLIT_K"] > 1
    out = (torch.zeros((m, n), device=x.device, dtype=torch.float32) if atomic
           else torch.empty((m, n), device=x.device, dtype=x.dtype))
    grid = (cdiv(m, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
    kernel[grid](x, *pointers, out, *scalars, out.stride(0), **meta, ATOMIC=atomic,
                 DOT_DTYPE=dot_dtype(x.dtype), **config)
    return out.to(x.dtype) if atomic else out


def launch(kernel, x: torch.Tensor, n: int, pointers: tuple, scalars: tuple, meta: dict, config: dict | None,
           shape_key: tuple, candidates: list[dict]) -> torch.Tensor:
    """Run `config` when pinned, else the fastest of `candidates` for this shape (timed on first use)."""
    if config is None:
        m = x.shape[0]
        key = (kernel.__name__, regime(m), m_bucket(m), n, *shape_key, str(x.dtype), str(x.device))
        config = choose_config(key, candidates, lambda c: run_config(kernel, x, n, pointers, scalars, meta, c))
    return run_config(kernel, x, n, pointers, scalars, meta, config)


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of the output tile this program owns (grid axis 0 walks N fastest)."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, ATOMIC: tl.constexpr):
    """Write the fp32 tile: add it into a zeroed fp32 buffer under split-K, else store it cast."""
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
