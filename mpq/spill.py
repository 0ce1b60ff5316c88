"""A compile's large intermediate tensors, kept in files and mapped back instead of held in memory.

Beside the model, a compile holds tensors it made itself and reads again and again: every
(layer, format)'s quantised tensors (mpq.apply.QuantizedWeightCache, about 1.5 bytes per parameter
with INT8 and INT4), the reference log-probabilities of the calibration tokens (tokens x vocabulary
x 4 bytes: 2 GB at 4,096 tokens of a 128k vocabulary), and the float32 twin's copies of what lies
outside its blocks (an 8B model's embeddings and head: 4 GB). Held in anonymous memory, they need
about as much RAM again as a 16-bit model.

Inside `spilling(parent)`, `kept(value)` writes each large CPU tensor of `value` to a file in a
folder under `parent` and returns the same numbers as a private, copy-on-write mapping of it
(torch.from_file). The file is unlinked at once: the mapping keeps its pages, and nothing is left
behind if the process dies. Mapped pages are the page cache's, which the kernel may drop under
pressure and read again from disk, so they need not fit in RAM beside the model and the passes'
working memory (benchmarks/spill_memory.py). Numbers are unchanged, bit for bit. Outside
`spilling`, `kept` returns its argument.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from typing import Iterator, TypeVar

import torch
from torch.utils._pytree import tree_map

log = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # smaller tensors stay in memory: a file and a mapping each cost more than they save

T = TypeVar("T")


class TensorSpill:
    """Writes tensors to files in a folder it makes under `parent` when the first comes, and maps
    them back (see the module's notes)."""

    def __init__(self, parent: Path, min_bytes: int = MIN_BYTES) -> None:
        self.parent = parent
        self.folder: Path | None = None
        self.min_bytes = min_bytes
        self.bytes_kept = 0  # bytes written to files and mapped back so far
        self.failed: str | None = None  # why spilling stopped (a full disk): later tensors stay in memory
        self._names = count()

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if (self.failed is not None or tensor.device.type != "cpu" or tensor.nbytes < self.min_bytes
                or tensor.requires_grad or getattr(tensor, "_mpq_spilled", False) or not self.parent.is_dir()):
            return tensor  # (a compile makes its output folder after loading and tracing)
        path = None
        try:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix=".mpq-spill-", dir=self.parent))
            path = self.folder / f"{next(self._names)}.bin"
            with open(path, "wb") as handle:
                handle.write(memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()))
            raw = torch.from_file(str(path), shared=False, size=tensor.nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:
            self.failed = str(exc)
            log.warning("cannot keep tensors in files under %s (%s): the rest of the compile holds them in memory",
                        self.parent, exc)
            return tensor
        finally:
            if path is not None:
                try:
                    path.unlink(missing_ok=True)  # the mapping keeps the pages
                except OSError:  # a system that will not unlink a mapped file: the folder goes at the end
                    pass
        mapped = raw.view(tensor.dtype).view(tensor.shape)
        mapped._mpq_spilled = True  # kept again (a calibrated tensor handed to the weight cache): not rewritten
        self.bytes_kept += tensor.nbytes
        return mapped


_active: TensorSpill | None = None


@contextmanager
def spilling(parent: Path | str, min_bytes: int = MIN_BYTES) -> Iterator[TensorSpill]:
    """Within it, `kept` maps large tensors from files in a new folder under `parent`, made when the
    first one comes (so `parent` may not exist yet when it begins) and removed at the end; each file
    is unlinked as soon as it is mapped."""
    global _active
    previous = _active
    spill = _active = TensorSpill(Path(parent), min_bytes)
    try:
        yield spill
    finally:
        _active = previous
        if spill.folder is not None:
            shutil.rmtree(spill.folder, ignore_errors=True)


def kept(value: T) -> T:
    """`value` (a tensor, or a list, tuple or dict of them) with its large CPU tensors mapped from
    files while `spilling` is active; else `value` itself."""
    spill = _active
    if spill is None:
        return value
    return tree_map(lambda leaf: spill.keep(leaf) if isinstance(leaf, torch.Tensor) else leaf, value)


def spilled_bytes() -> int:
    """Bytes the active spill has written to files and mapped back so far, freed ones included (0
    outside `spilling`)."""
    return 0 if _active is None else _active.bytes_kept

