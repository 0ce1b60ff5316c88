"""Decoding with a causal LM's KV cache across transformers' rename of `past_key_values` to `cache`.

transformers 5.24 renamed the forward argument and the output field (`cache`); the old names
still work there with a warning and are due to go in 5.40, while releases before 5.24 know only
the old ones. mpq supports both, so it asks the model's class which name its forward takes.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


def cache_argument(model: nn.Module) -> str:
    """The name under which `model`'s forward takes a KV cache: `cache` or `past_key_values`."""
    return _cache_argument_of(type(model))


@functools.cache
def _cache_argument_of(model_class: type) -> str:
    # once per class: reading a signature takes ~17 us, which timed decode steps would include
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output) -> object:
    """The KV cache a forward with use_cache=True returned, under either name."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


def forward_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: object | None = None,
                       encoder_outputs: object | None = None):
    """model(input_ids, use_cache=True), continuing `cache` when given; the output and its cache.
    With `encoder_outputs` (an encoder-decoder model's, from encode) the ids are the decoder's, and
    the encoder does not run again."""
    kwargs = {cache_argument(model): cache} if cache is not None else {}
    if encoder_outputs is None:
        kwargs["input_ids"] = input_ids
    else:
        kwargs.update(decoder_input_ids=input_ids, encoder_outputs=encoder_outputs)
    output = model(use_cache=True, **kwargs)
    return output, returned_cache(output)


def encode(model: nn.Module, input_ids: torch.Tensor) -> object:
    """An encoder-decoder model's encoder pass over the source `input_ids` (what forward_with_cache's
    `encoder_outputs` takes): run once per source, as generation does."""
    return model.get_encoder()(input_ids=input_ids)
