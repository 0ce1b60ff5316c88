"""Reading rows back from torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`): a tied
embedding gathers single rows from it, the float32 tiles of the CPU backend read spans of rows."""

import os
import subprocess
import sys

import pytest
import torch

from mpq.kernels.cpu_int4_layout import SPAN_ALIGNMENT, int4_row_span_float, int4_rows

# full blocks of 64 and of 32 rows, and shorter last blocks of 16 and 48 (laid out differently)
_LAYOUT_SHAPES = [(64, 64), (80, 32), (16, 64), (48, 128), (208, 96), (1040, 256)]


def _packed(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows + cols), dtype=torch.int32)
    return values, torch._convert_weight_to_int4pack_for_cpu(values, 1)


def _spans(rows: int) -> list[tuple[int, int]]:
    """Every aligned start with the next aligned stops and the last row."""
    return [(start, stop) for start in range(0, rows, SPAN_ALIGNMENT)
            for stop in sorted({min(rows, start + SPAN_ALIGNMENT), min(rows, start + 2 * SPAN_ALIGNMENT), rows})]


@pytest.mark.parametrize("rows, cols", _LAYOUT_SHAPES)
def test_int4_rows_reads_torchs_cpu_layout(rows, cols):
    """Rows read back from `_convert_weight_to_int4pack_for_cpu` are the integers put in, in full
    blocks of 64 and in a shorter last block (laid out differently)."""
    values, packed = _packed(rows, cols)
    ids = torch.randint(0, rows, (37,), generator=torch.Generator().manual_seed(rows))
    ids[:2] = torch.tensor([rows - 1, 0])
    assert torch.equal(int4_rows(packed, ids, rows, cols), values[ids].long())


@pytest.mark.parametrize("rows, cols", _LAYOUT_SHAPES)
def test_int4_row_spans_read_torchs_cpu_layout(rows, cols):
    values, packed = _packed(rows, cols)
    for start, stop in _spans(rows):
        span = int4_row_span_float(packed, start, stop, rows, cols)
        assert span.dtype == torch.float32 and torch.equal(span, values[start:stop].float()), (start, stop)


def test_int4_row_spans_are_whole_blocks():
    _, packed = _packed(208, 32)
    for start, stop in [(16, 80), (0, 80), (64, 96), (128, 128), (192, 224)]:
        with pytest.raises(ValueError, match="whole blocks"):
            int4_row_span_float(packed, start, stop, 208, 32)


_READS_EVERY_LAYOUT = """
import torch
from mpq.kernels.cpu_int4_layout import int4_row_layout, int4_row_span_float, int4_rows

layout = int4_row_layout()
for rows, cols in {shapes}:
    values = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
    assert torch.equal(int4_rows(packed, torch.arange(rows), rows, cols), values.long()), (rows, cols)
    for start, stop in {spans}[rows]:
        assert torch.equal(int4_row_span_float(packed, start, stop, rows, cols), values[start:stop].float()), (rows, start, stop)
print(torch.backends.cpu.get_cpu_capability(), layout.block, layout.split)
"""


_CAPABILITIES = ("default", "avx2", "avx512")  # torch's x86 builds, narrowest first


@pytest.mark.parametrize("capability, block, split", [("avx512", 64, True), ("avx2", 32, True), ("default", 32, False)])
def test_int4_rows_reads_the_layout_of_each_cpu_capability(capability, block, split):
    """torch packs int4 weights differently by the vector width it runs with (blocks of 64 rows
    under AVX512, 32 under AVX2, no lane split without vectors). ATEN_CPU_CAPABILITY makes it run
    a narrower build than the one it picked, so one machine checks every layout up to its own (a
    wider one than torch picked may not run on this CPU at all)."""
    own = torch.backends.cpu.get_cpu_capability().lower()
    if own not in _CAPABILITIES or _CAPABILITIES.index(capability) > _CAPABILITIES.index(own):
        pytest.skip(f"torch runs the {own} build on this CPU, not {capability} or wider")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    spans = {rows: _spans(rows) for rows, _ in _LAYOUT_SHAPES}
    script = _READS_EVERY_LAYOUT.format(shapes=_LAYOUT_SHAPES, spans=spans)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [capability.upper(), str(block), str(split)]
