"""Weight formats: one small frozen spec per format, registered by name, that knows its exact bytes.

A format name fully determines the spec ("fp16", "int8", "int4-g128", "int4-g64-sym", "int4-pc",
"int4-pc+hot512"), so a plan stores names only and is rebuilt from them through `get_format`, never
from arbitrary data.

"+hotK" is for embedding tables only: a token's row is read only when the token occurs, and text is
Zipfian (a few hundred tokens make up most of any text), so
keeping those K rows at int8 beside the int4 table buys most of an int8 table's fidelity for a few
percent of its extra bytes. Which K rows is a calibration fact (mpq.hot_rows), stored with the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INT4_GROUP_SIZES = (32, 64, 128, 256)
SCALE_BYTES = 2  # scales (and float-stored zero points) are bf16: the dtype torch's CPU kernels take
HOT_ID_BYTES = 4  # a hot row's token id, int32


@dataclass(frozen=True)
class FormatSpec:
    """How one linear layer's weight is stored.

    bits: 16 (kept in the model's 16-bit dtype), 8 or 4.
    group_size: quantisation group along the input dimension; None means one scale per output
    channel (int8, "int4-pc") or no quantisation (fp16).
    symmetric: no zero point (int8 always; int4 when selected).
    hot_rows: embedding tables only: this many rows (the calibration text's most frequent tokens)
    also held at int8, read instead of their int4 rows.
    """

    name: str
    bits: int
    group_size: int | None
    symmetric: bool
    hot_rows: int = 0

    @property
    def embedding_only(self) -> bool:
        return self.hot_rows > 0

    @property
    def base(self) -> "FormatSpec":
        """The format of the whole table (itself where there are no hot rows)."""
        return self if not self.hot_rows else get_format(self.name.partition("+")[0])

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def granularity(self) -> str:
        if not self.quantized:
            return "none"
        return "per-channel" if self.group_size is None else f"group-{self.group_size}"

    def supports(self, out_features: int, in_features: int) -> bool:
        """Whether a weight of this shape can take this format."""
        if self.bits == 4:
            return in_features % 2 == 0 and in_features % self.group_along(in_features) == 0
        return True

    def fits(self, out_features: int, in_features: int, is_table: bool) -> bool:
        """Whether a layer of this shape, a lookup table or a matmul, can take this format (hot rows
        only on a table)."""
        return self.supports(out_features, in_features) and (is_table or not self.embedding_only)

    def group_along(self, in_features: int) -> int:
        """Input columns per scale in a layer of `in_features` inputs (all of them when per-channel)."""
        return self.group_size or in_features

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Exact bytes of the stored weight: packed integers + scales + zero points (no bias)."""
        n, k = out_features, in_features
        if self.hot_rows:
            return self.base.weight_bytes(n, k) + min(self.hot_rows, n) * (k + SCALE_BYTES + HOT_ID_BYTES)
        if self.bits == 16:
            return 2 * n * k
        if self.bits == 8:
            return n * k + SCALE_BYTES * n
        groups = n * (k // self.group_along(k))
        per_group = SCALE_BYTES if self.symmetric else 2 * SCALE_BYTES
        return n * k // 2 + per_group * groups

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 8 * self.weight_bytes(out_features, in_features) / (out_features * in_features)

    def card(self) -> dict:
        """The quantisation-card fields of this format."""
        return {
            "name": self.name,
            "bits": self.bits,
            "granularity": self.granularity,
            "symmetric": self.symmetric if self.quantized else None,
            "scale_dtype": "bfloat16" if self.quantized else None,
            "zero_point": None if not self.quantized or self.symmetric else "per group, integer, stored bf16",
            "hot_rows": (f"the {self.hot_rows} rows of the calibration text's most frequent tokens also at int8 "
                         f"(per-row scale), read instead of their int4 rows") if self.hot_rows else None,
        }


FP16 = FormatSpec("fp16", 16, None, True)
INT8 = FormatSpec("int8", 8, None, True)
_INT4_NAME = re.compile(r"^int4-(?:g(\d+)|pc)(-sym)?$")
_HOT = re.compile(r"^(int4-[a-z0-9-]+)\+hot(\d+)$")


def get_format(name: str) -> FormatSpec:
    """The spec for a canonical format name; raises ValueError naming the valid ones."""
    if name == "fp16":
        return FP16
    if name == "int8":
        return INT8
    hot = _HOT.match(name)
    if hot and hot.group(2) == str(int(hot.group(2))) and int(hot.group(2)) > 0 and _INT4_NAME.match(hot.group(1)):
        base = get_format(hot.group(1))
        return FormatSpec(name, 4, base.group_size, base.symmetric, int(hot.group(2)))
    match = _INT4_NAME.match(name)
    if match and (match.group(1) is None or int(match.group(1)) in INT4_GROUP_SIZES):
        return FormatSpec(name, 4, None if match.group(1) is None else int(match.group(1)), match.group(2) is not None)
    raise ValueError(
        f"unknown format {name!r}: use fp16, int8, int4-gG or int4-gG-sym with G in {INT4_GROUP_SIZES}, "
        f"or int4-pc / int4-pc-sym (one scale per output channel); for embedding tables any int4 format "
        f"+hotK (e.g. int4-pc+hot512: the K most frequent tokens' rows also at int8)"
    )


def parse_formats(text: str, group_size: int = 128, symmetric_int4: bool = False) -> list[FormatSpec]:
    """Parse a CLI list such as "fp16,int8,int4" (bare int4 takes --group-size and --int4-sym)."""
    formats = []
    for raw in (part.strip() for part in text.split(",")):
        if raw == "int4":
            raw = f"int4-g{group_size}" + ("-sym" if symmetric_int4 else "")
        fmt = get_format(raw)
        if fmt not in formats:
            formats.append(fmt)
    if not formats:
        raise ValueError("--formats is empty: give at least one of fp16,int8,int4")
    return sorted(formats, key=lambda f: (-f.bits, f.name))
