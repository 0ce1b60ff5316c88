"""Which layers mpq's Triton kernels take (no triton import: the CPU path asks too)."""

from mpq.formats import FormatSpec


def triton_supports(fmt: FormatSpec, in_features: int) -> bool:
    """Whether the Triton kernels take a layer: INT8 at any shape; INT4 when its groups are whole
    32-column K steps (a step reads one scale per column, and a GPU's tl.dot needs 16+ packed bytes)."""
    if fmt.bits == 8:
        return True
    return fmt.bits == 4 and fmt.group_along(in_features) % 32 == 0
