"""Decoding through the KV cache under either of transformers' names for it (past_key_values, cache)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import tiny_llama
from mpq.kv_cache import cache_argument, forward_with_cache


@torch.no_grad()
def test_cached_decode_matches_the_full_forward():
    model = tiny_llama()
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids, use_cache=False).logits
    out, cache = forward_with_cache(model, ids[:, :9])
    steps = [out.logits[:, -1]]
    for i in range(9, 12):
        out, cache = forward_with_cache(model, ids[:, i:i + 1], cache)
        steps.append(out.logits[:, -1])
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:12], atol=1e-5, rtol=1e-4)
    assert cache_argument(model) in ("cache", "past_key_values")


class RenamedCacheModel(nn.Module):
    """transformers >= 5.24's spelling: forward takes `cache` and returns it under that key."""

    def forward(self, input_ids: torch.Tensor, cache: list | None = None, use_cache: bool = False) -> dict:
        seen = (cache or []) + input_ids.tolist()[0]
        return {"logits": torch.tensor([[float(len(seen))]]), "cache": seen}


class OldCacheModel(nn.Module):
    """transformers < 5.24's spelling: `past_key_values` in and out."""

    def forward(self, input_ids: torch.Tensor, past_key_values: list | None = None, use_cache: bool = False) -> dict:
        seen = (past_key_values or []) + input_ids.tolist()[0]
        return {"logits": torch.tensor([[float(len(seen))]]), "past_key_values": seen}


def test_either_name_is_passed_and_read_back():
    for model, name in ((RenamedCacheModel(), "cache"), (OldCacheModel(), "past_key_values")):
        assert cache_argument(model) == name
        _, cache = forward_with_cache(model, torch.tensor([[5, 6]]))
        out, cache = forward_with_cache(model, torch.tensor([[7]]), cache)
        assert cache == [5, 6, 7] and out["logits"].item() == 3
