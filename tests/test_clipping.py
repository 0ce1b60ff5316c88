"""The clipping search keeps, per row and group, the ratio of least error, and only ever lowers it."""

import pytest
import torch

from mpq.clipping import CLIPS, clip_ratios, clipped_grid
from mpq.formats import get_format
from mpq.quantize import grid_for


def _group_errors(w, fmt, grid, hessian=None):
    n, k = w.shape
    g = fmt.group_along(k) if fmt.bits == 4 else k
    delta = (w - grid.snap(w)).reshape(n, k // g, g)
    if hessian is None:
        return delta.square().sum(dim=2)
    blocks = torch.stack([hessian[i:i + g, i:i + g] for i in range(0, k, g)])
    return torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)


@pytest.mark.parametrize("name", ["int4-g32", "int4-g64-sym", "int4-pc", "int8"])
@pytest.mark.parametrize("weighted", [False, True])
def test_each_group_gets_the_ratio_of_least_error(name, weighted):
    torch.manual_seed(0)
    fmt = get_format(name)
    w = torch.randn(7, 128) * torch.rand(7, 128).pow(4) * 3  # heavy tails: clipping pays somewhere
    x = torch.randn(256, 128) * torch.rand(128) * 2
    hessian = x.T @ x / x.shape[0] if weighted else None
    chosen = _group_errors(w, fmt, clipped_grid(w, fmt, hessian), hessian)
    per_ratio = torch.stack([_group_errors(w, fmt, grid_for(w, fmt, clip=r), hessian) for r in CLIPS])
    torch.testing.assert_close(chosen, per_ratio.min(dim=0).values, rtol=1e-5, atol=1e-7)
    assert (chosen <= per_ratio[0] * (1 + 1e-6)).all()  # never worse than the min-max grid (ratio 1.0)
    ratios = clip_ratios(w, fmt, hessian)
    assert ratios.shape == ((7,) if fmt.bits == 8 else (7, 128 // fmt.group_along(128)))


def test_a_gaussian_row_gets_clipped_and_a_uniform_row_does_not():
    # 4-bit rounding of 2048 Gaussian values: min-max spans about +-3.5 sigma, while the step that
    # minimises squared error covers about +-2.5 sigma; uniform values fill their range evenly
    torch.manual_seed(1)
    fmt = get_format("int4-pc")
    w = torch.stack([torch.randn(2048), torch.rand(2048) * 2 - 1])
    ratios = clip_ratios(w, fmt)
    assert ratios[0, 0] <= 0.85
    assert ratios[1, 0] == 1.0
