"""Content hashes that key cached measurements: same model + data + formats -> same key."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def tensor_digest(tensor: torch.Tensor, hasher) -> None:
    t = tensor.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    hasher.update(str((tuple(t.shape), str(tensor.dtype))).encode())
    hasher.update(t.numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        hasher.update(name.encode())
        tensor_digest(tensor, hasher)
    return hasher.hexdigest()


def data_fingerprint(*parts: object) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor_digest(part, hasher)
        else:
            hasher.update(json.dumps(part, sort_keys=True, default=str).encode())
    return hasher.hexdigest()
