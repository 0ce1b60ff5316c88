"""The launch configs the tuner chose, kept across processes: $MPQ_CACHE_DIR/triton-tuning.json.

A shape's first call compiles and times every candidate config (kernels/triton_tuning.py): a few
seconds each on a GPU host, for every layer shape, format and M bucket a model has, so without a
store every process that loads a config paid it again before its first tokens came out. An entry
is keyed by the GPU's name, the Triton version and a digest of the kernels' source as well as the
shape, so a new GPU, a Triton upgrade or an edited kernel is timed afresh; an entry that is not
among the shape's current candidates is ignored. Delete the file to time everything again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Hashable
from pathlib import Path

log = logging.getLogger(__name__)
FILENAME = "triton-tuning.json"


def store_path() -> Path:
    from mpq.io import cache_root

    return cache_root() / FILENAME


@functools.cache
def kernels_digest() -> str:
    """A digest of the kernels' source (every triton_*.py here, so a kernel added later counts too):
    what the stored choices were timed on."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("triton_*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _device_name(device) -> str:
    import torch

    if isinstance(device, torch.device) and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return str(device)


def entry_key(key: Hashable) -> str:
    """The stored form of a tuner key: (kernel, regime, M bucket, N, K, ..., dtype, device) with the
    device as the GPU's name (identical GPUs share their choices), plus Triton and the kernels."""
    from importlib.metadata import version

    parts = list(key) if isinstance(key, tuple) else [key]
    if parts:
        parts[-1] = _device_name(parts[-1])
    return " ".join(map(str, parts)) + f" | triton {version('triton')} | kernels {kernels_digest()}"


def _read() -> dict[str, dict]:
    path = store_path()
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # a damaged store only costs the timing again
        log.warning("%s is unreadable (%s): launch configs are timed again", path, error)
        return {}
    return stored if isinstance(stored, dict) else {}


def recall(key: Hashable, candidates: list[dict]) -> dict | None:
    """The stored choice for `key`, if it is one of `candidates` (the one returned is that candidate)."""
    stored = _read().get(entry_key(key))
    return next((candidate for candidate in candidates if candidate == stored), None)


def remember(key: Hashable, config: dict) -> None:
    """Store the choice for `key` beside the others (another process's entries are kept)."""
    from mpq.io import write_json_atomic

    try:
        write_json_atomic(store_path(), {**_read(), entry_key(key): config})
    except OSError as error:  # a read-only cache folder: the choice lives for this process only
        log.warning("could not store the launch config for %s in %s: %s", key, store_path(), error)
