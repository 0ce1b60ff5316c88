"""mpq.kernels: the matmul kernels behind QuantizedLinear.

- reference: dequantise to float32 and multiply (the ground truth every kernel is tested against)
- cpu: torch's weight-only CPU kernels (int8 per channel, int4 group-wise) with bf16 activations
Triton kernels for CUDA are imported lazily, so a CPU-only install imports mpq without triton.
"""

from mpq.formats import FormatSpec
from mpq.kernels.cpu import cpu_supports, linear_cpu, prepare_cpu
from mpq.kernels.reference import linear_reference

__all__ = ["cpu_supports", "linear_cpu", "linear_reference", "prepare_cpu", "triton_supports"]


def triton_supports(fmt: FormatSpec, in_features: int) -> bool:
    """Whether the Triton kernels take a layer: INT8 at any shape; INT4 when its groups are whole
    32-column K steps (a step reads one scale per column, and a GPU's tl.dot needs 16+ packed bytes)."""
    if fmt.bits == 8:
        return True
    return fmt.bits == 4 and fmt.group_along(in_features) % 32 == 0
