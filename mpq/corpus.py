"""The text corpus mpq ships for its demos: Python's documentation (English) and stdlib (code).

Documents are cut into chunks at blank lines and each chunk is assigned to a split by a hash of
its document name and position, so train / calib / heldout never overlap and never change.
"""

from __future__ import annotations

import gzip
import json
import zlib
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "demo" / "data"
KINDS = ("text", "code")
SPLITS = ("train", "calib", "heldout")
CHUNK_CHARS = 1500


def _split_of(doc_name: str, chunk_index: int) -> str:
    bucket = zlib.crc32(f"{doc_name}:{chunk_index}".encode()) % 20
    if bucket < 2:
        return "heldout"  # 10%
    if bucket < 4:
        return "calib"  # 10%
    return "train"


def _chunks(text: str) -> list[str]:
    chunks: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= CHUNK_CHARS:
            chunks.append(current)
            current = ""
    if current.strip():
        chunks.append(current)
    return chunks


@lru_cache(maxsize=None)
def corpus_chunks(kind: str, split: str) -> tuple[str, ...]:
    """All chunks of one corpus kind ('text' or 'code') that fall in one split."""
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"unknown corpus {kind!r}/{split!r}; kinds are {KINDS}, splits {SPLITS}")
    out = []
    with gzip.open(DATA_DIR / f"corpus_{kind}.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)
            for index, chunk in enumerate(_chunks(doc["text"])):
                if _split_of(doc["name"], index) == split:
                    out.append(chunk)
    return tuple(out)


def mixed_chunks(split: str) -> list[str]:
    """Text and code chunks of one split, interleaved so any prefix holds both kinds."""
    text, code = corpus_chunks("text", split), corpus_chunks("code", split)
    out: list[str] = []
    for i in range(max(len(text), len(code))):
        out.extend(chunk[i] for chunk in (text, code) if i < len(chunk))
    return out
