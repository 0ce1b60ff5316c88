"""mpq.kernels: the matmul kernels behind QuantizedLinear.

- reference: dequantise to float32 and multiply (the ground truth every kernel is tested against)
- cpu: torch's weight-only CPU kernels (int8 per channel, int4 group-wise) with bf16 activations
Triton kernels for CUDA are imported lazily, so a CPU-only install imports mpq without triton.
"""

from mpq.kernels.cpu import cpu_supports, linear_cpu, prepare_cpu
from mpq.kernels.reference import linear_reference

__all__ = ["cpu_supports", "linear_cpu", "linear_reference", "prepare_cpu"]
