"""W4A16's bit work: packed nibbles into 16-bit floats, and the activations laid out to meet them.

Decode must not spend more issue slots per weight byte than the memory takes to deliver it
(benchmarks/kernels_compile.py counts them), so nibbles become floats by bit tricks instead of
conversion instructions: a nibble q under a float's mantissa, with the exponent of 2^10 (fp16) or
2^7 (bf16), is the float B + q; B and the zero point come off a sum of products at decode, and
off two weights an instruction in prefill's word tiles (byte_floats on the single-row path,
pair_floats and nibble_floats on the tensor-core paths, nibbles_minus_zero on the prefill byte
path, which subtracts in fp32). 16-bit activations are read as int32 pairs that
line up with the packed bytes (x_pairs, load_x_words, load_x_halves), and each K step's words and
activations are relabelled into the order the tensor cores' operands want (operand_order), which
differs by Triton generation (triton_w4a16_configs.operand_k_width).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def byte_pair(words, b, exponents):
    """Byte b of each word (its nibbles q0, q1: inputs 8j + 2b, 8j + 2b + 1) as one register of two
    16-bit floats, B + q0 in the low half and B + q1 in the high: times 0x1001 copies the byte 12
    bits up, so q1 lands in bits 16..19 while q0 stays in 0..3, and the mask drops the rest."""
    byte = (words >> (8 * b)) & 0xFF
    return ((byte * 0x1001) & 0x000F000F) | exponents


@triton.jit
def stacked(t, STACK: tl.constexpr):
    """[STACK * R, C] -> [STACK, R, C]: rows of the STACK steps apart, for a batched dot."""
    return tl.reshape(t, (STACK, t.shape[0] // STACK, t.shape[1]))


@triton.jit
def activation_rows(x_ptr, offs_m, stride_xm, X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr):
    """The start of each row of x as 16-bit values (x arrives as int32 pairs) or fp32 ones."""
    if X_PAIRS:
        rows = x_ptr.to(tl.pointer_type(X_DTYPE)) + offs_m * (2 * stride_xm)
    else:
        rows = x_ptr + offs_m * stride_xm
    return rows


@triton.jit
def pair_constants(N, X_DTYPE: tl.constexpr):
    """pair_floats' mask and exponent bits, and B. As registers the compiler cannot see are constant
    (N >> 31 is 0), as in single_row: as immediates, ptxas materialised the mask again before each
    use (IMAD.MOV)."""
    unknown_zero = N >> 31
    if X_DTYPE == tl.float16:
        exponents = unknown_zero + 0x64006400
        base = 1024.0
    else:
        exponents = unknown_zero + 0x43004300
        base = 128.0
    return unknown_zero + 0x000F000F, exponents, base


@triton.jit
def x_quarters(x, K_WIDTH: tl.constexpr):
    """A step's activations [R, BLOCK_K] as the four dots take them, [R, BLOCK_K / 4] each: in the
    words' operand order, x[:, 8j + 4h + 2a + b] goes to quarter 2a + b at column 2j + h, the input
    of nibble 2a + b (h = 0) or 2a + b + 4 (h = 1) of word j."""
    rows: tl.constexpr = x.shape[0]
    j: tl.constexpr = x.shape[1] // 8
    x = operand_order(tl.reshape(x, (rows, j, 8)), K_WIDTH)
    x_b0, x_b1 = tl.split(tl.reshape(x, (rows, j, 2, 2, 2)))
    x_0, x_2 = tl.split(x_b0)
    x_1, x_3 = tl.split(x_b1)
    return tl.reshape(x_0, (rows, 2 * j)), tl.reshape(x_1, (rows, 2 * j)), tl.reshape(x_2, (rows, 2 * j)), \
        tl.reshape(x_3, (rows, 2 * j))


@triton.jit
def operand_order(t, K_WIDTH: tl.constexpr):
    """A step's words [N, J, 1] (or their activations [M, J, 8]) relabelled along J so that the words
    each thread loads are, once unpacked, its tensor-core operand registers: a relabelling Triton
    does in registers, with no data moved.

    A dot's operand gives the four threads of a column a share of each 16-deep slice of K: with
    K_WIDTH = 2 (Triton 3.8 and later) thread a holds the pairs a and a + 4 of a slice, with 4 (3.4
    to 3.6) the pairs 2a and 2a + 1. As they lie, a thread loads four adjacent words (16 bytes) of a
    column, so its unpacked pairs went through shared memory to reach their threads (with 3.6 at
    16 x 256 x 128: 16 STS.128, 32 LDS.64 and 8 BAR a step, and ~50 register moves). Here the loaded
    word a * J/4 + b becomes pair index 4b + a (K_WIDTH 2: J/4 words a thread), or word 4a + 2c + d
    pair index 8c + 2a + d (K_WIDTH 4), which is where the operand layout wants them; the dot sums
    over K in any order as long as the activations are relabelled alike, which this does to them too.
    7.36 -> 5.72 instructions per weight byte there with 3.6, 5.98 -> 5.31 with 3.9 (the other order
    helps neither: benchmarks/kernels_compile.py). K steps of 64 (J = 8) keep the order as loaded:
    there a thread loads 4 words where the operand gives it 2, and neither order removes the trip
    (with 3.9, K_WIDTH 2 cost 0.2 instructions a byte more). K_WIDTH = 0 keeps it too."""
    rows: tl.constexpr = t.shape[0]
    j: tl.constexpr = t.shape[1]
    w: tl.constexpr = t.shape[2]
    if j < 16:
        return t
    elif K_WIDTH == 2:
        return tl.reshape(tl.permute(tl.reshape(t, (rows, 4, j // 4, w)), (0, 2, 1, 3)), (rows, j, w))
    elif K_WIDTH == 4:
        return tl.reshape(tl.permute(tl.reshape(t, (rows, 4, j // 8, 2, w)), (0, 2, 1, 3, 4)), (rows, j, w))
    else:
        return t


@triton.jit
def pair_floats(words, i: tl.constexpr, nibble_mask, exponents, X_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Nibbles i and i + 4 of each word [N, J] (a row of words per output column, as they lie in
    memory) as 16-bit floats B + q, [N, 2J] with column 2j + h holding nibble i + 4h of word j: one
    AND-OR per word makes both, and the rest only relabels. Joining the halves along a last axis
    keeps each register's pair together in Triton 3.6 too; from a [J, N] tile, joined and permuted,
    3.6 moved the halves between threads (about 200 SHFL and SEL a step at 128 wide: 9.1
    instructions per weight byte against 7.7; the same 6.4 in 3.9)."""
    floats = ((words >> (4 * i)) & nibble_mask) | exponents  # >> is arithmetic: the mask drops the sign bits
    half = tl.float16 if X_DTYPE == tl.float16 else tl.bfloat16
    pairs = tl.join(floats.to(tl.int16), (floats >> 16).to(tl.int16)).to(half, bitcast=True)  # [N, J, 2]
    return tl.reshape(pairs, (words.shape[0], 2 * words.shape[1])).to(DOT_DTYPE)


@triton.jit
def byte_floats(shifted, exp256, exp16):
    """The nibbles of the byte in bits 15..22 of `shifted` as floats 256 + q (low) and 16 + q
    (high): each nibble lands in the mantissa where that float's spacing is 1."""
    low = ((shifted & 0x78000) | exp256).to(tl.float32, bitcast=True)
    high = ((shifted & 0x780000) | exp16).to(tl.float32, bitcast=True)
    return low, high


@triton.jit
def load_x_words(x_ptr, word_index, X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr):
    """x[8j + i] (i = 0 .. 7) in fp32 for the weight words j, each word's eight in one load: 16 bytes
    a word of 16-bit x (int32 pairs; bf16 widens by bit moves alone), 32 of fp32. A load a pair (four
    loads of [J] values four words apart) could not be vectorised, and Triton 3.6 lays out a load of
    fewer values than threads as its use wants: 16 4-byte loads a step a thread, or 16 4-byte copies
    under PIPELINE, where these are 4 loads of 16 bytes (kernels_compile.py, K steps of 128, Triton
    3.6: 208 -> 193 instructions a step at 32 columns, 300 -> 288 at 64, under PIPELINE 301 -> 239 at
    32; 3.9: 205 -> 193, 300 -> 287)."""
    J: tl.constexpr = word_index.shape[0]
    if X_PAIRS:
        quads = tl.load(x_ptr + 4 * word_index[:, None] + tl.arange(0, 4)[None, :])  # [J, 4]: pair p, x 2p and 2p + 1
        pairs_02, pairs_13 = tl.split(tl.reshape(quads, (J, 2, 2)))
        pair_0, pair_2 = tl.split(pairs_02)
        pair_1, pair_3 = tl.split(pairs_13)
        x0, x1 = pair_halves(pair_0, X_DTYPE)
        x2, x3 = pair_halves(pair_1, X_DTYPE)
        x4, x5 = pair_halves(pair_2, X_DTYPE)
        x6, x7 = pair_halves(pair_3, X_DTYPE)
    else:
        eights = tl.load(x_ptr + 8 * word_index[:, None] + tl.arange(0, 8)[None, :]).to(tl.float32)  # [J, 8]
        even, odd = tl.split(tl.reshape(eights, (J, 4, 2)))  # x 8j + 2i and 8j + 2i + 1
        x_04, x_26 = tl.split(tl.reshape(even, (J, 2, 2)))
        x_15, x_37 = tl.split(tl.reshape(odd, (J, 2, 2)))
        x0, x4 = tl.split(x_04)
        x2, x6 = tl.split(x_26)
        x1, x5 = tl.split(x_15)
        x3, x7 = tl.split(x_37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def pair_halves(pairs, X_DTYPE: tl.constexpr):
    """The two 16-bit activations of int32 pairs, the even (low half) and the odd, in fp32."""
    if X_DTYPE == tl.bfloat16:
        even = (pairs << 16).to(tl.float32, bitcast=True)
        odd = (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        even = (pairs & 0xFFFF).to(tl.uint16).to(X_DTYPE, bitcast=True).to(tl.float32)
        odd = (pairs >> 16).to(tl.uint16).to(X_DTYPE, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def nibbles_minus_zero(packed, zero):
    """q - z in fp32 for the low and high nibble of each byte, without an int-to-float conversion
    (a reduced-rate instruction, one per weight): OR-ing the low nibble q into the mantissa of 2^23
    makes the float 2^23 + q, and one subtraction of 2^23 + z leaves q - z exactly. The high nibble
    stays in place (2^23 + 16 q), saving the shift; a fused multiply-add by 1/16 takes 2^19 + z off
    2^19 + q. The exponent is OR-ed in once per byte and each mask keeps it, so every logic
    instruction has one constant: with two (mask, then exponent) ptxas reloaded a register per nibble."""
    biased = packed.to(tl.int32) | 0x4B000000
    w_lo = (biased & 0x4B00000F).to(tl.float32, bitcast=True) - (zero + 8388608.0)[None, :]
    w_hi = (biased & 0x4B0000F0).to(tl.float32, bitcast=True) * 0.0625 - (zero + 524288.0)[None, :]
    return w_lo, w_hi


@triton.jit
def nibble_floats(packed, X_DTYPE: tl.constexpr):
    """The low and high nibble q of each byte as the 16-bit float B + q, and B, in the dtype the
    tensor cores take for these activations (fp16 for fp16, bf16 otherwise: dot_dtype): the nibble
    OR-ed into the mantissa of B, the power of two at which that float's spacing is 1 (bf16: 128,
    fp16: 1024). No conversion instruction; the 16-bit logic runs two values per 32-bit instruction."""
    wide = packed.to(tl.int16)  # zero-extended: the high nibble shifts down with nothing above it
    if X_DTYPE == tl.float16:
        w_lo = ((wide | 0x6400) & 0x640F).to(tl.float16, bitcast=True)
        w_hi = ((wide >> 4) | 0x6400).to(tl.float16, bitcast=True)
        base = 1024.0
    else:
        w_lo = ((wide | 0x4300) & 0x430F).to(tl.bfloat16, bitcast=True)
        w_hi = ((wide >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        base = 128.0
    return w_lo, w_hi, base


@triton.jit
def load_x_halves(x_ptr, offs_m, mask_m, stride_xm, pair_index, X_PAIRS: tl.constexpr, X_DTYPE: tl.constexpr):
    """x[:, 2j] and x[:, 2j + 1] for the packed byte indices j. 16-bit activations arrive as int32
    pairs (x_pairs), so one 4-byte load per byte of weights brings both, in the weights' layout;
    fp32 activations are read as two strided halves."""
    if X_PAIRS:
        pairs = tl.load(x_ptr + offs_m[:, None] * stride_xm + pair_index[None, :], mask=mask_m[:, None], other=0)
        x_even = (pairs & 0xFFFF).to(tl.uint16).to(X_DTYPE, bitcast=True)
        x_odd = (pairs >> 16).to(tl.uint16).to(X_DTYPE, bitcast=True)
    else:
        row = x_ptr + offs_m[:, None] * stride_xm + 2 * pair_index[None, :]
        x_even = tl.load(row, mask=mask_m[:, None], other=0.0)
        x_odd = tl.load(row + 1, mask=mask_m[:, None], other=0.0)
    return x_even, x_odd


def x_pairs(x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The activation argument and its constexprs: a 16-bit x as int32 pairs (a view; a copy
    only when its storage starts at an odd element), an fp32 x as it is."""
    if x.element_size() != 2:
        return x, {"X_PAIRS": False, "X_DTYPE": tl.float32}
    if x.storage_offset() % 2:
        x = x.clone()
    return x.view(torch.int32), {"X_PAIRS": True, "X_DTYPE": tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16}
