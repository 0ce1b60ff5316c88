"""Which rows of an embedding table a "+hotK" format (mpq.formats) also keeps at int8: those of the
K tokens most frequent in the calibration text, as the task tokenizes it.

A lookup reads one row per token, so a row's error costs in proportion to how often its token
occurs; text is Zipfian, so a few hundred rows carry most lookups.
The ids are a calibration fact like GPTQ's Hessians: chosen once, stored with the table.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

import torch

from mpq.errors import MpqError
from mpq.formats import FormatSpec


def count_tokens(sequences: Iterable[Iterable[int]]) -> Counter:
    counts: Counter = Counter()
    for ids in sequences:
        counts.update(int(i) for i in ids)
    return counts


def hot_row_ids(counts: Mapping[int, int], rows: int, k: int) -> torch.Tensor:
    """The min(k, rows) row ids to hold at int8, sorted: most frequent first (ties to the lower id);
    where the text has fewer distinct tokens than that, the lowest unused ids fill in (a format's
    bytes do not depend on the calibration text)."""
    k = min(k, rows)
    seen = sorted((token for token in counts if 0 <= token < rows), key=lambda t: (-counts[t], t))[:k]
    chosen = set(seen)
    filler = (row for row in range(rows) if row not in chosen)
    while len(seen) < k:
        seen.append(next(filler))
    return torch.tensor(sorted(seen), dtype=torch.int32)


def token_counts_for(task, formats: Iterable[FormatSpec]) -> Counter | None:
    """The calibration token counts when a format needs them (has hot rows), else None."""
    if not any(fmt.hot_rows for fmt in formats):
        return None
    if getattr(task, "calib", None) is None:
        raise MpqError("a +hot format needs calibration text to count tokens in: give --calib or drop the +hot format")
    return task.token_counts
