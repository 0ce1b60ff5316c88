"""Every Triton kernel against the plain torch reference, under TRITON_INTERPRET=1 on the CPU
(conftest sets it when there is no GPU), on random inputs and odd shapes."""

import pytest
import torch

from mpq.formats import get_format
from mpq.kernels.reference import linear_reference
from mpq.quantize import quantize_weight

pytest.importorskip("triton")

# Pinned configs cover each code path of each kernel: M = 1 multiply-and-sum with and without
# split-K (atomics into fp32, or one store in the activation dtype), split-K with tl.dot
# (M <= 16), and the tiled GEMM without and with split-K.
PATHS = {
    "gemv-m1": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2},
    "gemv-m1-nosplit": {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1},
    "gemv-splitk": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 4},
    "gemm": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1},
    "gemm-splitk": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2},
    "gemm-turned": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "TRANSPOSED": True},  # W x^T
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(fmt_name: str, n: int, k: int, m: int, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    fmt = get_format(fmt_name)
    tensors = {key: t.to(DEVICE) for key, t in quantize_weight(torch.randn(n, k), fmt).items()}
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    bias = torch.randn(n, dtype=dtype, device=DEVICE)
    return fmt, tensors, x, bias


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fmt_name", ["int4-g32", "int4-g64-sym", "int4-g128", "int4-pc"])
@pytest.mark.parametrize("n,k,m", [(33, 256, 1), (48, 384, 3), (17, 128, 17), (64, 256, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_matches_reference(path, fmt_name, n, k, m, dtype):
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, bias = _inputs(fmt_name, n, k, m, dtype, seed=n + k + m)
    config = dict(PATHS[path])
    if config["BLOCK_M"] == 1 and m != 1:
        config["BLOCK_M"] = 16  # the M = 1 path serves single rows only
    got = w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(k), bias, config=config)
    expected = linear_reference(x, t, fmt, bias)
    assert got.shape == (m, n) and got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-2


@pytest.mark.parametrize("ahead", ["PREFETCH", "PIPELINE"])
@pytest.mark.parametrize("fmt_name", ["int4-g32", "int4-g64-sym", "int4-pc"])
@pytest.mark.parametrize("n,k,split", [(33, 256, 2), (48, 384, 1), (40, 64, 4)])
def test_w4a16_single_row_loading_a_step_ahead_matches_reference(ahead, fmt_name, n, k, split):
    """PREFETCH: each pass multiplies the words the pass before loaded; PIPELINE: Triton's pipeline
    loads them (on a GPU; the interpreter runs the loop as written). Programs with no step at all
    (K = 64 split 4 ways in steps of 32: two of them), with a few, and one with all twelve (K = 384)."""
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, tensors, x, bias = _inputs(fmt_name, n, k, 1, torch.bfloat16, seed=n + k + split)
    config = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split, ahead: True}
    y = w4a16_linear(x, tensors["qweight"], tensors["scales"], tensors.get("zeros"), fmt.group_along(k), bias, config=config)
    expected = linear_reference(x, tensors, fmt, bias)
    assert rel_err(y, expected) < 1e-2


@pytest.mark.parametrize("ahead", [None, "PREFETCH", "PIPELINE"])
@pytest.mark.parametrize("fmt_name,block_k,n,k,split,dtype", [
    ("int4-g128", 256, 33, 768, 2, torch.bfloat16), ("int4-g128-sym", 512, 17, 1024, 1, torch.float16),
    ("int4-g64", 256, 40, 512, 3, torch.float32), ("int4-g32", 128, 9, 384, 4, torch.bfloat16)])
def test_w4a16_single_row_long_steps_match_reference(ahead, fmt_name, block_k, n, k, split, dtype):
    """single_row's long steps (long_steps: K steps of 2 to 4 whole groups, each word scaled by its own
    group's scale and zero point) in the layout a Triton layer holds (scale and zero point one word,
    column-major): odd N, all three activation dtypes, symmetric, programs without a step (3 steps over
    4 programs), loading ahead and pipelined."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w4a16_scales import ZEROS_PAIRED, zeros_layout
    from mpq.kernels.triton_w4a16_configs import long_steps
    from mpq.qlinear import triton_layout

    fmt, t, x, bias = _inputs(fmt_name, n, k, 1, dtype, seed=n + k + block_k)
    laid = triton_layout(t, fmt)
    assert zeros_layout(laid["scales"], laid.get("zeros")) == (0 if fmt.symmetric else ZEROS_PAIRED)
    config = {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": split, **({ahead: True} if ahead else {})}
    assert long_steps(config, fmt.group_along(k))
    got = w4a16_linear(x, laid["qweight"], laid["scales"], laid.get("zeros"), fmt.group_along(k), bias, config=config)
    assert got.shape == (1, n) and got.dtype == dtype
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2


def test_w4a16_long_steps_are_whole_groups_that_divide_k():
    """A pinned K step over several groups must be whole groups (a word's group is then its step's
    group plus its index over the group's words) and divide K (no mask a word, which would split the
    16-byte loads); only the single-row path takes one. The tuner offers them only where they fit."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w4a16_configs import long_steps, tuner_space

    fmt, t, x, _ = _inputs("int4-g128", 16, 640, 1, torch.bfloat16, seed=3)
    single = {"BLOCK_M": 1, "BLOCK_N": 16, "SPLIT_K": 1}
    with pytest.raises(ValueError, match="must divide K=640"):
        w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), 128, config={**single, "BLOCK_K": 256})
    fmt, t, x, _ = _inputs("int4-g64", 16, 768, 1, torch.bfloat16, seed=3)
    with pytest.raises(ValueError, match="must divide the group size 64"):
        w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), 64, config={**single, "BLOCK_K": 32 * 3})
    with pytest.raises(ValueError, match="must divide the group size 64"):
        w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), 64, config={**single, "BLOCK_M": 16, "BLOCK_K": 128})
    steps = lambda group, k: sorted({c["BLOCK_K"] for c in tuner_space(1, group, k) if long_steps(c, group)})
    assert steps(128, 4096) == [256, 512] and steps(128, 11008) == [256] and steps(64, 4096) == [256]
    assert steps(32, 4096) == [] and steps(96, 4096) == [] and steps(128, 384) == []
    assert not any(long_steps(c, 128) for m in (2, 16, 64) for c in tuner_space(m, 128, 4096))


@pytest.mark.parametrize("fmt_name,block_k", [("int4-g64-sym", 64), ("int4-g128", 128), ("int4-g128", 64), ("int4-pc", 128)])
@pytest.mark.parametrize("n,k,m,split", [(33, 256, 1, 1), (48, 384, 3, 2), (17, 128, 16, 3), (40, 512, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_w4a16_tensor_core_decode_reads_words(fmt_name, block_k, n, k, m, split, dtype):
    """word_dots (K steps of 64 and more at M <= 16): four dots per step over nibble pairs (i, i + 4)
    of each int32 word, the activations split into that order. Odd N, M = 1, 3, 5 and 16, splits
    that leave some programs without a step (K = 128 over 3), all three activation dtypes."""
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, bias = _inputs(fmt_name, n, k, m, dtype, seed=n + k + m + block_k)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": split}
    got = w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(k), bias, config=config)
    expected = linear_reference(x, t, fmt, bias)
    assert got.shape == (m, n) and got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-2


@pytest.mark.parametrize("k_width", [0, 2, 4])
@pytest.mark.parametrize("fmt_name,n,k,m,split", [("int4-g128", 33, 256, 1, 1), ("int4-g128-sym", 40, 512, 16, 3),
                                                  ("int4-pc", 17, 384, 5, 2)])
def test_w4a16_word_dots_in_each_operand_order(k_width, fmt_name, n, k, m, split):
    """operand_order relabels each K step of 128's words and activations alike for the tensor cores'
    operand layout of either Triton generation (K_WIDTH 2: 3.8 on, 4: up to 3.7; 0: as loaded, what
    the launcher passed before): the sums stay the reference's, whichever order a launch pins."""
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, bias = _inputs(fmt_name, n, k, m, torch.bfloat16, seed=n + k + m + k_width)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": split, "K_WIDTH": k_width}
    got = w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(k), bias, config=config)
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2


@pytest.mark.parametrize("k_width", [0, 2, 4])
@pytest.mark.parametrize("fmt_name,n,k,m,block_m,split,stack,dtype", [
    ("int4-g128", 33, 256, 1, 8, 1, 1, torch.bfloat16), ("int4-g128-sym", 40, 512, 8, 8, 3, 1, torch.float16),
    ("int4-pc", 17, 384, 5, 8, 2, 1, torch.float32), ("int4-g128", 9, 384, 16, 16, 2, 1, torch.bfloat16),
    ("int4-g128", 33, 640, 1, 8, 1, 4, torch.bfloat16), ("int4-g128-sym", 24, 1152, 7, 8, 2, 4, torch.float16),
    ("int4-g64", 17, 384, 3, 8, 1, 2, torch.bfloat16)])
def test_w4a16_word_dots_turned_round(k_width, fmt_name, n, k, m, block_m, split, stack, dtype):
    """TRANSPOSED runs word_dots as W x^T (turned_word_dots: the weights the dots' first operand,
    the rows of x their columns, the tile turned back on return): the reference's sums in either
    operand order, for M = 1 and 5 in 8-row tiles, a full 8, and 16 rows; fp32 activations enter the
    dots as bf16; and with STACK K steps side by side, where K's last pass holds fewer steps than
    STACK (5 steps of 128 in 4s; 9 in 4s split over 2 programs; K steps of 64 in 2s)."""
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, bias = _inputs(fmt_name, n, k, m, dtype, seed=n + k + m + k_width)
    config = {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 128 if fmt.group_along(k) % 128 == 0 else 64,
              "SPLIT_K": split, "K_WIDTH": k_width, "TRANSPOSED": True, "STACK": stack}
    got = w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(k), bias, config=config)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2


@pytest.mark.parametrize("k_width", [0, 2, 4])
@pytest.mark.parametrize("fmt_name,n,k,m,steps,split,dtype", [
    ("int4-g128", 33, 512, 1, 2, 1, torch.bfloat16), ("int4-g128-sym", 40, 1024, 5, 2, 3, torch.float16),
    ("int4-g128", 17, 1024, 8, 4, 1, torch.float32), ("int4-g128", 9, 768, 3, 3, 2, torch.bfloat16)])
def test_w4a16_turned_round_takes_several_k_steps_a_pass(k_width, fmt_name, n, k, m, steps, split, dtype):
    """STEPS consecutive K steps a pass on one warp turned round (turned_step, each as a pass of one
    step does it), in the layout a Triton layer holds: the reference's sums in each operand order, odd
    N, M = 1, 3, 5, 8, programs without a pass (2 passes over 3 programs, 1 over 2)."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.qlinear import triton_layout

    fmt, t, x, bias = _inputs(fmt_name, n, k, m, dtype, seed=n + k + m + steps)
    laid = triton_layout(t, fmt)
    config = {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": split, "K_WIDTH": k_width, "TRANSPOSED": True,
              "STACK": 1, "STEPS": steps}
    got = w4a16_linear(x, laid["qweight"], laid["scales"], laid.get("zeros"), 128, bias, config=config)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2


@pytest.mark.parametrize("fmt_name,n,k,m,block_n,split,dtype", [
    ("int4-g128", 33, 512, 2, 16, 3, torch.bfloat16), ("int4-g128-sym", 40, 1024, 16, 32, 1, torch.float16),
    ("int4-g128", 17, 768, 5, 16, 2, torch.float32)])
def test_w4a16_word_dots_take_two_k_steps_a_pass(fmt_name, n, k, m, block_n, split, dtype):
    """word_dots' 16-row decode tiles with STEPS = 2 (two consecutive K steps a pass), in the layout a
    Triton layer holds: the reference's sums; odd N, M = 2, 5, 16, all three activation dtypes, and
    programs with no pass (2 passes over 3 programs), one (3 over 2) and all four."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.qlinear import triton_layout

    fmt, t, x, bias = _inputs(fmt_name, n, k, m, dtype, seed=n + k + m)
    laid = triton_layout(t, fmt)
    config = {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split, "STEPS": 2}
    got = w4a16_linear(x, laid["qweight"], laid["scales"], laid.get("zeros"), 128, bias, config=config)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2


def test_w4a16_steps_a_pass_are_refused_where_they_would_run_past_k_or_off_their_path():
    """STEPS x BLOCK_K must divide K (no mask along K) and only the tensor-core decode tiles of int32
    words take them (word_dots, or turned round on one warp); the tuner offers 2 steps a pass where 256
    divides K: turned round at M <= 8 where this Triton takes one-warp tiles, 16-row tiles from M = 9
    (from M = 2 where no tile turned round serves)."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w4a16_configs import TURNED_STACKS, tuner_space

    fmt, t, x, _ = _inputs("int4-g128", 16, 640, 3, torch.bfloat16, seed=5)
    turned = {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1, "TRANSPOSED": True, "STACK": 1, "STEPS": 2}
    for config in (turned, {**turned, "TRANSPOSED": False, "BLOCK_M": 16}):  # 2 x 128 does not divide 640
        with pytest.raises(ValueError, match="STEPS=2"):
            w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), 128, config=config)
    fmt, t, x, _ = _inputs("int4-g128", 16, 1024, 3, torch.bfloat16, seed=5)
    off_path = ({**turned, "STACK": 4, "num_warps": 4}, {**turned, "TRANSPOSED": False, "BLOCK_M": 1},
                {**turned, "TRANSPOSED": False, "BLOCK_M": 16, "WORD_DOTS": False}, {**turned, "TRANSPOSED": False, "BLOCK_M": 32})
    for config in off_path:
        with pytest.raises(ValueError, match="STEPS=2"):
            w4a16_linear(x[:1] if config["BLOCK_M"] == 1 else x, t["qweight"], t["scales"], t.get("zeros"), 128, config=config)
    stepping = lambda m, k, turned: [c for c in tuner_space(m, 128, k) if c.get("STEPS", 1) > 1 and bool(c.get("TRANSPOSED")) == turned]
    assert all(len(stepping(m, 4096, True)) == (4 if 1 in TURNED_STACKS and m <= 8 else 0) for m in (1, 4, 8, 16))
    assert all(c["BLOCK_N"] == 64 for c in stepping(1, 4096, True))  # 128 wide it spills (kernels_compile.py)
    # (from M = 9 also on two warps: triton_common.few_warp_tiles)
    # (16-row tiles up to 8 rows only where no tile turned round serves: turned_serves)
    assert all(len(stepping(m, 4096, False)) == (8 if m > 8 or m > 1 and not TURNED_STACKS else 0) + (5 if m > 8 else 0)
               for m in (1, 4, 8, 16))
    assert not stepping(4, 640, True) and not stepping(16, 640, False) and not stepping(64, 4096, False)
    assert len(stepping(16, 11008, False)) == 13


SCALE_LAYOUT_PATHS = {
    "single row": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2},
    "single row, loading ahead": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3, "PREFETCH": True},
    "single row, pipelined": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3, "PIPELINE": True},
    "word_dots": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 2},
    "turned round": {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1, "TRANSPOSED": True, "STACK": 2},
    "byte path": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2},
    "byte path, K steps of 128": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 2, "WORD_DOTS": False},
    "word tiles": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1},
    "prefill bytes": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2, "WORD_DOTS": False},
    "prefill turned round": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2, "TRANSPOSED": True},
}


@pytest.mark.parametrize("path", list(SCALE_LAYOUT_PATHS))
@pytest.mark.parametrize("fmt_name,layout", [("int4-g128", "pairs"), ("int4-g128", "apart"), ("int4-g128-sym", "apart")])
def test_w4a16_reads_scales_and_zeros_in_the_layers_layouts(path, fmt_name, layout):
    """A Triton layer keeps its scales and zeros [N, G] column-major (mpq.qlinear.scales_by_column),
    bf16 zero points each right after its scale (scale_zero_pairs: strides (2, 2N), read as one int32
    a column, ZEROS_PAIRED), other zeros apart (strides (1, N)); every path of the kernel, and the
    dense route's dequantisation, reads each layout: odd N, several groups, the reference's result.
    Zeros in another layout than the scales are refused (one pair of strides serves both)."""
    from mpq.kernels.triton_dequant import dequantize_int4
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w4a16_scales import ZEROS_PAIRED, zeros_layout
    from mpq.qlinear import scales_by_column

    config = SCALE_LAYOUT_PATHS[path]
    m = {1: 1, 8: 5, 16: 3, 32: 33}[config["BLOCK_M"]]
    fmt, t, x, bias = _inputs(fmt_name, 33, 512, m, torch.bfloat16, seed=7)
    if layout == "pairs":
        laid = scales_by_column(t)
        assert laid["scales"].stride() == (2, 66) and laid["zeros"].data_ptr() == laid["scales"].data_ptr() + 2
        assert zeros_layout(laid["scales"], laid["zeros"]) == ZEROS_PAIRED
    else:
        laid = {**t, **{name: t[name].t().contiguous().t() for name in ("scales", "zeros") if name in t}}
        assert laid["scales"].stride() == (1, 33) and zeros_layout(laid["scales"], laid.get("zeros")) == ("zeros" in t)
    assert torch.equal(laid["scales"], t["scales"]) and ("zeros" not in t or torch.equal(laid["zeros"], t["zeros"]))
    got = w4a16_linear(x, laid["qweight"], laid["scales"], laid.get("zeros"), 128, bias, config=config)
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2
    weight = dequantize_int4(laid["qweight"], laid["scales"], laid.get("zeros"), 128, torch.float32)
    assert torch.equal(weight, dequantize_int4(t["qweight"], t["scales"], t.get("zeros"), 128, torch.float32))
    if "zeros" in t:
        with pytest.raises(ValueError, match="share a layout"):
            w4a16_linear(x, t["qweight"], laid["scales"], t["zeros"], 128, bias, config=config)


def test_triton_int4_layers_keep_scales_column_major_and_zeros_beside_them():
    import copy

    from mpq.qlinear import QuantizedLinear

    linear = torch.nn.Linear(256, 40).to(torch.bfloat16)
    layer, tensors = QuantizedLinear.from_module(linear, "int4-g64", backend="triton")
    assert layer.scales.stride() == layer.zeros.stride() == (2, 80)
    assert layer.zeros.data_ptr() == layer.scales.data_ptr() + 2  # one [G, N, 2] tensor: a scale, then its zero point
    assert tensors["scales"].is_contiguous() and torch.equal(layer.scales, tensors["scales"])
    assert torch.equal(layer.zeros, tensors["zeros"])
    moved = layer.to(DEVICE)  # moving keeps the layout (a move to another device lays the copies out again)
    assert moved.scales.stride() == (2, 80) and moved.zeros.data_ptr() == moved.scales.data_ptr() + 2
    elsewhere = copy.deepcopy(layer).to("meta")
    assert elsewhere.scales.stride() == elsewhere.zeros.stride() == (2, 80) and elsewhere.scales.device.type == "meta"
    symmetric, _ = QuantizedLinear.from_module(linear, "int4-g64-sym", backend="triton")
    assert symmetric.scales.stride() == (1, 40)


def test_w4a16_decode_space_turns_round_up_to_8_rows():
    """The tuner times 8-row TRANSPOSED tiles (a warp a K step, K steps of 128) at M <= 8, not
    above, only where a group holds a K step of 128, and only the STACKs this Triton compiles well:
    none before 3.6 (its tl.dot refuses 8 columns), 1 on 3.6, 1 and 4 from 3.7."""
    from mpq.kernels.triton_w4a16_configs import TURNED_STACKS, tuner_space, turned_stacks

    assert [turned_stacks(v) for v in ("3.4.0", "3.5.1", "3.6.0", "3.7.1", "3.9.0", "4.0.0+git")] == \
        [(), (), (1,), (1, 4), (1, 4), (1, 4)]

    def turned(m: int, group: int) -> list[dict]:
        return [c for c in tuner_space(m, group, 4096) if c.get("TRANSPOSED")]

    assert {c["STACK"] for c in turned(1, 128)} == set(TURNED_STACKS) and TURNED_STACKS
    assert all(len(turned(m, 128)) == len(turned(1, 128)) for m in (2, 4, 8)) and not turned(16, 128) and not turned(1, 64)
    assert all(c["BLOCK_M"] == 8 and c["BLOCK_K"] == 128 and c["num_warps"] == c["STACK"] for c in turned(1, 128))


def test_w4a16_decode_space_leaves_16_row_tiles_to_the_tiles_turned_round_up_to_8_rows(monkeypatch):
    """Up to 8 rows, where the 8-row tiles turned round are offered (K steps of 128, a Triton that
    compiles them), the tuner times no 16-row tile: every other decode config stays, and from 9 rows,
    for groups under 128 or a Triton without the turned tiles, the space is decode_space whole."""
    from mpq.kernels import triton_w4a16_configs
    from mpq.kernels.triton_w4a16_configs import decode_space, tuner_space, turned_serves

    rows = lambda configs: {c["BLOCK_M"] for c in configs}
    for m in (1, 2, 4, 8):
        whole, tuned = decode_space(m, 128, 4096), tuner_space(m, 128, 4096)
        assert turned_serves(m, [64, 128]) and rows(tuned) == ({1, 8} if m == 1 else {8}) and 16 in rows(whole)
        assert tuned == [c for c in whole if c["BLOCK_M"] != 16] and len(whole) - len(tuned) == (24 if m == 1 else 36)
    for m, group in ((9, 128), (16, 128), (1, 64), (4, 64), (4, 32)):
        assert not turned_serves(m, triton_w4a16_configs.k_steps(group))
        assert tuner_space(m, group, 4096) == decode_space(m, group, 4096) and 16 in rows(tuner_space(m, group, 4096))
    monkeypatch.setattr(triton_w4a16_configs, "TURNED_STACKS", ())  # Triton 3.4 and 3.5: no tile turned round
    assert tuner_space(4, 128, 4096) == decode_space(4, 128, 4096) and rows(tuner_space(4, 128, 4096)) == {16}
    assert rows(tuner_space(1, 128, 4096)) == {1, 16}

def test_decode_spaces_hold_16_row_tiles_on_one_or_two_warps():
    """The tuner times 16-row tiles on one warp (32-64 columns) and on two (128), split 1-16: INT8 at
    every decode M, INT4 (K steps of 128) above 8 rows, where no 8-row tile turned round serves, and
    two K steps a pass on two warps where 256 divides K; each runs as pinned and matches the reference."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w4a16_configs import tuner_space
    from mpq.kernels.triton_w8a16 import tuner_space as w8_candidates, w8a16_linear
    from mpq.qlinear import triton_layout

    def few(configs: list[dict]) -> list[dict]:
        return [c for c in configs if c["num_warps"] < 4 and not c.get("TRANSPOSED")]

    for m in (1, 4, 16):
        tiles = few(w8_candidates(m))
        assert len(tiles) == 20 and all(c["BLOCK_M"] == 16 and c["num_warps"] == (2 if c["BLOCK_N"] == 128 else 1)
                                        for c in tiles)
        assert {c["SPLIT_K"] for c in tiles} == {1, 2, 4, 8, 16} and {c["BLOCK_K"] for c in tiles} == {128, 256}
    assert not few(w8_candidates(64))
    assert [len(few(tuner_space(m, 128, k))) for m, k in ((1, 4096), (8, 4096), (9, 4096), (16, 4096), (16, 640))] == \
        [0, 0, 15, 15, 10]
    assert not few(tuner_space(16, 64, 4096)) and not few(tuner_space(64, 128, 4096))
    assert {(c["BLOCK_N"], c["num_warps"], c.get("STEPS", 1)) for c in few(tuner_space(16, 128, 4096))} == \
        {(64, 1, 1), (128, 2, 1), (128, 2, 2)}

    fmt, t, x, bias = _inputs("int4-g128", 136, 512, 11, torch.bfloat16, seed=11)
    laid = triton_layout(t, fmt)
    for config in ({**few(tuner_space(16, 128, 4096))[0], "BLOCK_N": 32, "SPLIT_K": 3},
                   {**few(tuner_space(16, 128, 4096))[-1], "BLOCK_N": 16, "SPLIT_K": 1}):
        got = w4a16_linear(x, laid["qweight"], laid["scales"], laid.get("zeros"), 128, bias, config=config)
        assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2, config
    fmt8, t8, x8, bias8 = _inputs("int8", 70, 320, 1, torch.float16, seed=12)
    config = {**few(w8_candidates(1))[0], "BLOCK_N": 16, "SPLIT_K": 2}
    assert rel_err(w8a16_linear(x8, t8["qweight"], t8["scales"], bias8, config=config),
                   linear_reference(x8, t8, fmt8, bias8)) < 1e-2


def test_split_k_sums_meet_in_the_kernel_and_leave_their_buffers_zeroed():
    """Under split-K the last program of each tile stores the sum and zeroes what it used
    (kernels/split_sums.py): the next call, and a larger one that grows the buffers, start clean."""
    from mpq.kernels import split_sums
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w8a16 import w8a16_linear

    split_sums._BUFFERS.clear()
    split_sums._OUTGROWN.clear()
    fmt, t, x, bias = _inputs("int4-g128", 40, 512, 5, torch.bfloat16, seed=3)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 3}
    calls = [w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 128, bias, config=config) for _ in range(2)]
    assert torch.equal(calls[0], calls[1]) and calls[0].dtype == torch.bfloat16
    assert rel_err(calls[0], linear_reference(x, t, fmt, bias)) < 1e-2
    ((sums, counts),) = split_sums._BUFFERS.values()
    assert sums.numel() == 8 * 40 and counts.numel() == 3  # sized for M's bucket (8): 3 tiles of 16 columns
    assert not sums.any() and not counts.any()
    fmt8, t8, x8, bias8 = _inputs("int8", 70, 256, 9, torch.float16, seed=4)
    got = w8a16_linear(x8, t8["qweight"], t8["scales"], bias8, config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4})
    assert rel_err(got, linear_reference(x8, t8, fmt8, bias8)) < 1e-2
    ((sums, counts),) = split_sums._BUFFERS.values()
    assert sums.numel() == 16 * 70 and counts.numel() == 3 and not sums.any() and not counts.any()
    assert len(split_sums._OUTGROWN) == 1  # the first pair, kept for any graph that launches on it


def test_split_buffers_made_during_a_graph_capture_are_the_graphs_alone(monkeypatch):
    """A capture reuses the kept buffers where they are big enough; where not, it gets buffers of its
    own (zeroed by a memset the graph records), which are not kept: kept, they would hold garbage
    for any other caller until that graph's first replay."""
    from mpq.kernels import split_sums

    class CapturingCuda:  # a tensor's device and is_cuda, as split_buffers reads them
        device = torch.device("cpu")
        is_cuda = True

    split_sums._BUFFERS.clear()
    kept = split_sums.split_buffers(torch.zeros(1), 64, 4)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert split_sums.split_buffers(CapturingCuda(), 64, 4) == kept
    sums, counts = split_sums.split_buffers(CapturingCuda(), 128, 4)
    assert sums.numel() == 128 and not sums.any() and not counts.any()
    assert split_sums._BUFFERS[torch.device("cpu")] == kept


def test_dependent_launch_is_asked_for_only_where_it_can_run(monkeypatch):
    """PDL (MPQ_PDL=1, or dependent_launch in code) reaches a launch as the kernel's PDL constexpr
    and Triton's launch_pdl only where wanted, on a capable device (Hopper on, a Triton with grid
    dependency control; never the interpreter), for one layer (not a grouped launch) of a kernel that
    takes it; the block restores what was wanted before it."""
    from mpq.kernels import triton_common
    from mpq.kernels.triton_dense_grouped import _dense_grouped_kernel
    from mpq.kernels.triton_w4a16 import _w4a16_kernel
    from mpq.kernels.triton_w8a16 import _w8a16_kernel

    x = torch.randn(1, 256).to(torch.bfloat16)
    out = torch.empty(1, 40, dtype=torch.bfloat16)
    config = {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}

    def keywords(kernel, grouped: bool = False) -> dict:
        return triton_common._grid_and_arguments(kernel, x, 40, (), (), {"GROUPED": grouped}, config, None, out)[2]

    assert triton_common.takes_pdl(_w4a16_kernel) and triton_common.takes_pdl(_w8a16_kernel)
    assert not triton_common.takes_pdl(_dense_grouped_kernel)
    assert not triton_common.pdl_capable(x.device)  # the CPU, the interpreter
    with triton_common.dependent_launch():
        assert "PDL" not in keywords(_w4a16_kernel) and "launch_pdl" not in keywords(_w4a16_kernel)
    monkeypatch.setattr(triton_common, "pdl_capable", lambda device: True)
    monkeypatch.setattr(triton_common, "_PDL_WANTED", False)  # as without MPQ_PDL=1
    assert "PDL" not in keywords(_w4a16_kernel)
    with triton_common.dependent_launch():
        for kernel in (_w4a16_kernel, _w8a16_kernel):
            assert keywords(kernel)["PDL"] is True and keywords(kernel)["launch_pdl"] is True
            assert "PDL" not in keywords(kernel, grouped=True)
        assert "PDL" not in keywords(_dense_grouped_kernel)
        with triton_common.dependent_launch(False):
            assert "PDL" not in keywords(_w8a16_kernel)
        assert keywords(_w8a16_kernel)["PDL"] is True
    assert "PDL" not in keywords(_w8a16_kernel)


def test_operand_order_follows_the_triton_generation():
    """The launcher's K_WIDTH: 4 up to Triton 3.7, 2 from 3.8 (kernels_compile.py compiled both ways)."""
    from mpq.kernels.triton_w4a16_configs import K_WIDTH, operand_k_width

    assert [operand_k_width(v) for v in ("3.4.0", "3.6.0", "3.7.1", "3.8.0", "3.9.0", "4.0.0+git")] == [4, 4, 4, 2, 2, 2]
    assert K_WIDTH in (2, 4)


@pytest.mark.parametrize("fmt_name", ["int4-g64", "int4-g128-sym"])
def test_w4a16_tensor_core_decode_byte_path_at_wide_k_steps(fmt_name):
    """WORD_DOTS=False keeps the byte path (nibble_floats) at K steps of 64 and 128, which
    gpu_decode_space.py times against word_dots; groups of 32 always take it."""
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, bias = _inputs(fmt_name, 40, 256, 3, torch.bfloat16, seed=5)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2, "WORD_DOTS": False}
    got = w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(256), bias, config=config)
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2


PREFILL_PATHS = {"word tiles": {}, "byte path": {"WORD_DOTS": False}, "turned round": {"TRANSPOSED": True}}


@pytest.mark.parametrize("path", list(PREFILL_PATHS))
@pytest.mark.parametrize("fmt_name,n,k,m,block_k,split,dtype", [
    ("int4-g128", 33, 256, 17, 128, 1, torch.bfloat16), ("int4-g64-sym", 40, 384, 33, 64, 2, torch.float16),
    ("int4-pc", 17, 384, 20, 128, 1, torch.float32), ("int4-g128", 24, 640, 50, 64, 3, torch.bfloat16)])
def test_w4a16_prefill_tiles_from_k_steps_of_64(path, fmt_name, n, k, m, block_k, split, dtype):
    """Prefill tiles (M > 16) at K steps of 64 and 128 take word_dots' word tiles (its pairs, each weight
    dequantised before four dots a step), with WORD_DOTS=False the byte path they replaced, or turned
    round (TRANSPOSED: turned_tiles, out^T = W x^T), which the tuner times beside them: odd N, M = 17
    to 50 over 32-row tiles, splits that leave a program one step or none, symmetric and per-channel
    groups, all three activation dtypes."""
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, bias = _inputs(fmt_name, n, k, m, dtype, seed=n + k + m)
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": split, **PREFILL_PATHS[path]}
    got = w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(k), bias, config=config)
    assert got.shape == (m, n) and got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2


@pytest.mark.parametrize("dtype,base", [(torch.bfloat16, 128.0), (torch.float16, 1024.0)])
def test_word_tiles_16_bit_dequantisation_rounds_the_reference_weight_once(dtype, base):
    """The word tiles' arithmetic on a GPU, in torch's 16-bit ops (each rounds its exact result to
    nearest even, as the GPU's do): (B + q) - (B + z) is q - z exactly, and times the scale in the
    activation dtype it is (q - z) * s computed in fp32 and rounded once, the reference's weight,
    for every q and z and scales over many binades (within fp16's normal range for fp16, into
    which a bf16 scale converts exactly). The interpreter computes these lines in fp32 instead."""
    q = torch.arange(16.0).repeat_interleave(16)
    z = torch.arange(16.0).repeat(16)
    torch.manual_seed(0)
    scales = (torch.rand(64) * 2 - 1) * torch.pow(2.0, torch.randint(-13, 6, (64,)).float())
    scales = scales.to(torch.bfloat16).float()
    for s in scales:
        got = ((base + q).to(dtype) - (base + z).to(dtype)) * s.to(dtype)
        assert torch.equal(got, ((q - z) * s).to(dtype))


@pytest.mark.parametrize("fmt_name,n,k", [("int4-g32", 33, 384), ("int4-g64-sym", 17, 256), ("int4-g128", 40, 384),
                                           ("int4-pc", 9, 96), ("int8", 33, 250), ("int8", 5, 130)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantisation_kernel_is_the_reference_weight_rounded_once(fmt_name, n, k, dtype):
    """Prefill's dense route writes (q - z) * s computed in fp32 and rounded once: the reference's
    float32 weight in the activation dtype, bit for bit (odd N, K not a multiple of the INT8 step)."""
    from mpq.kernels.triton_dequant import dequantize_int4, dequantize_int8
    from mpq.quantize import dequantize_weight

    fmt, t, _, _ = _inputs(fmt_name, n, k, 1, dtype, seed=n * k)
    if fmt.bits == 8:
        got = dequantize_int8(t["qweight"], t["scales"], dtype)
    else:
        got = dequantize_int4(t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(k), dtype)
    assert got.shape == (n, k) and got.dtype == dtype
    weight = dequantize_weight(t, fmt)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter casts fp32 to bf16 by dropping the low half (a GPU rounds to nearest even)
        weight = (weight.view(torch.int32) & -65536).view(torch.float32)
    assert torch.equal(got, weight.to(dtype))


@pytest.mark.parametrize("fmt_name", ["int4-g128", "int4-g64-sym", "int8"])
@pytest.mark.parametrize("m", [17, 40])
def test_dense_route_matches_reference_and_refuses_calls_it_cannot_take(fmt_name, m):
    """The config {"DENSE": 1} (dequantise, then F.linear) pinned for a prefill call; decode-sized
    and fp32 calls cannot take it and say so."""
    from mpq.kernels.triton_common import DENSE
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w8a16 import w8a16_linear

    fmt, t, x, bias = _inputs(fmt_name, 33, 256, m, torch.bfloat16, seed=m)

    def call(x, bias):
        if fmt.bits == 8:
            return w8a16_linear(x, t["qweight"], t["scales"], bias, config=DENSE)
        return w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), fmt.group_along(256), bias, config=DENSE)

    got = call(x, bias)
    assert got.dtype == torch.bfloat16 and rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2
    for refused in (x[:16], x.float()):
        with pytest.raises(ValueError, match="dense route"):
            call(refused, None)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("n,k,m", [(33, 250, 1), (48, 96, 3), (17, 130, 17), (64, 512, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a16_matches_reference(path, n, k, m, dtype):
    from mpq.kernels.triton_w8a16 import w8a16_linear

    fmt, t, x, bias = _inputs("int8", n, k, m, dtype, seed=n * k + m)
    config = dict(PATHS[path])
    if config["BLOCK_M"] == 1 and m != 1:
        config["BLOCK_M"] = 16
    got = w8a16_linear(x, t["qweight"], t["scales"], bias, config=config)
    expected = linear_reference(x, t, fmt, bias)
    assert got.shape == (m, n) and got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-2


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("m", [1, 3])
def test_w4a16_reads_fp32_and_odd_offset_activations(path, m):
    """16-bit activations are read as int32 pairs; fp32 ones as two strided halves, and a 16-bit x
    whose storage starts at an odd element is copied first (a pairs view would be misaligned)."""
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, bias = _inputs("int4-g64", 40, 256, m, torch.float32, seed=11 + m)
    config = dict(PATHS[path])
    if config["BLOCK_M"] == 1 and m != 1:
        config["BLOCK_M"] = 16
    got = w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64, bias, config=config)
    assert got.dtype == torch.float32 and rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2
    shifted = torch.randn(m * 256 + 1, dtype=torch.bfloat16, device=DEVICE)[1:].view(m, 256)
    assert shifted.storage_offset() == 1
    got = w4a16_linear(shifted, t["qweight"], t["scales"], t["zeros"], 64, bias.bfloat16(), config=config)
    assert rel_err(got, linear_reference(shifted, t, fmt, bias.bfloat16())) < 1e-2


@pytest.mark.parametrize("m", [1, 4, 16, 40])
def test_default_launch_picks_a_regime_and_is_correct(m):
    """Without a pinned config the launcher chooses by M (timed per shape on a GPU, fixed under the interpreter)."""
    from mpq.kernels.triton_w4a16 import w4a16_linear
    from mpq.kernels.triton_w8a16 import w8a16_linear

    fmt, t, x, bias = _inputs("int4-g64", 64, 256, m, torch.bfloat16, seed=m)
    got = w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64, bias)
    assert rel_err(got, linear_reference(x, t, fmt, bias)) < 1e-2
    fmt, t, x, bias = _inputs("int8", 64, 200, m, torch.float16, seed=m)
    assert rel_err(w8a16_linear(x, t["qweight"], t["scales"], bias), linear_reference(x, t, fmt, bias)) < 1e-2


def test_launcher_rejects_mismatched_shapes():
    from mpq.kernels.triton_w4a16 import w4a16_linear

    fmt, t, x, _ = _inputs("int4-g64", 32, 256, 2, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="expected x of shape"):
        w4a16_linear(x[:, :128], t["qweight"], t["scales"], t["zeros"], 64)
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 128)
    with pytest.raises(ValueError, match="BLOCK_K=128 must divide the group size 64"):
        w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64, config={**PATHS["gemm"], "BLOCK_K": 128})
    # the single-row path reads qweight rows as int32 words: a view two bytes into a buffer cannot be one
    shifted = torch.empty(t["qweight"].numel() + 2, dtype=torch.uint8, device=DEVICE)[2:].view_as(t["qweight"])
    shifted.copy_(t["qweight"])
    with pytest.raises(ValueError, match=r"int32 words.*address % 4 = 2"):
        w4a16_linear(x, shifted, t["scales"], t["zeros"], 64)
    with pytest.raises(ValueError, match="whole int32 words"):
        w4a16_linear(x[:1], t["qweight"], t["scales"], t["zeros"], 64, config={**PATHS["gemv-m1"], "BLOCK_K": 4})


def test_custom_ops_pass_opcheck_and_compile():
    """torch.ops.mpq.* are well-formed custom ops (schema, fake tensors) and torch.compile traces them."""
    from mpq.kernels import ops

    fmt, t, x, bias = _inputs("int4-g64", 48, 128, 3, torch.bfloat16, seed=7)
    torch.library.opcheck(ops.w4a16_linear, (x, t["qweight"], t["scales"], t["zeros"], 64, bias),
                          test_utils=("test_schema", "test_faketensor"))
    fmt8, t8, x8, bias8 = _inputs("int8", 48, 96, 3, torch.float16, seed=8)
    torch.library.opcheck(ops.w8a16_linear, (x8, t8["qweight"], t8["scales"], bias8),
                          test_utils=("test_schema", "test_faketensor"))

    def layer(x):
        return ops.w4a16_linear(x, t["qweight"], t["scales"], t["zeros"], 64, bias).relu()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("fmt_name", ["int4-g64", "int8"])
def test_eager_layers_launch_directly_and_traced_ones_record_the_custom_op(fmt_name, monkeypatch):
    """An eager call skips torch.ops.mpq.* (its host cost); make_fx, torch.export and a call that wants
    gradients go through it, so the graph holds the op and backward refuses instead of returning nothing."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from mpq.kernels import ops
    from mpq.qlinear import QuantizedLinear

    torch.manual_seed(3)
    linear = torch.nn.Linear(128, 40).to(torch.bfloat16)
    layer, tensors = QuantizedLinear.from_module(linear, fmt_name, backend="triton")
    layer = layer.to(DEVICE)
    op_name = "w8a16_linear" if fmt_name == "int8" else "w4a16_linear"
    through_op = []
    real_op = getattr(ops, op_name)
    monkeypatch.setattr(ops, op_name, lambda *args: through_op.append(1) or real_op(*args))
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=DEVICE)
    expected = linear_reference(x, {k: v.to(DEVICE) for k, v in tensors.items()}, get_format(fmt_name), layer.bias)
    with torch.no_grad():
        assert rel_err(layer(x), expected) < 1e-2 and through_op == []
    graph = make_fx(layer)(x)
    assert f"mpq.{op_name}" in str(graph.graph) and len(through_op) == 1
    exported = torch.export.export(layer, (x,))
    assert any(f"mpq.{op_name}" in str(node.target) for node in exported.graph.nodes)
    x.requires_grad_(True)
    y = layer(x)
    assert len(through_op) == 3 and rel_err(y.detach(), expected) < 1e-2
    with pytest.raises(RuntimeError, match="[Aa]utograd"):
        y.sum().backward()
