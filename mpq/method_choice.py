"""`--method auto`: for each quantised format, the method whose uniform config scores best held out.

Which method rounds a format best depends on the model: GPTQ wins at INT4 on both demos, but at
INT8 it is better than round-to-nearest on all-MiniLM and worse on the demo LM, where its error
compensation fits the calibration tokens (it halves the calibration KL of RTN's INT8 there, yet
loses on held-out text). Calibration divergence cannot see that overfitting, so each quantised
format gets the method (rtn or gptq) under which the model with every layer in that format has
the better quality on the held-out validation half, the data compile already selects configs
on (reports use the test half). AWQ is left out: it stores extra bytes per layer, so it does
not compete at equal size. The result is an ordinary per-format method string
("int8=rtn,int4-g128=gptq"), so everything downstream (cache, card, checkpoints) is as if the
user had written it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from mpq.apply import QuantizedWeightCache
from mpq.formats import FormatSpec
from mpq.methods import AUTO, Quantizer, calibrated_tensors, make_quantizer, method_of, method_quantizer
from mpq.search import uniform_plan
from mpq.trace import LayerInfo

AUTO_CANDIDATES = ("rtn", "gptq")  # ties go to the first: rtn needs no calibration data to reproduce


@dataclass
class MethodChoice:
    method: str  # what every later stage uses, e.g. "int8=rtn,int4-g128=gptq"
    quantizer: Quantizer
    heldout_loss: dict[str, dict[str, float]] | None = None  # auto only: format -> method -> uniform config's loss

    def to_json(self) -> dict | None:
        return None if self.heldout_loss is None else {"chosen": self.method, "heldout_loss": self.heldout_loss}


def choose_method(method: str, model: nn.Module, layers: list[LayerInfo], groups: list[list[str]],
                  formats: list[FormatSpec], task, costs: dict[str, dict[str, int]],
                  heldout_loss: Callable[[dict[str, str], QuantizedWeightCache], float],
                  progress: bool = False) -> MethodChoice:
    """`method` as given, or for "auto" the per-format choice described above. `heldout_loss(plan,
    cache)` (lower is better) judges a plan whose tensors come from `cache`; `costs` are the layers'
    bytes per format (uniform_plan keeps a layer that cannot take a format in its largest)."""
    if method != AUTO:
        return MethodChoice(method, method_quantizer(method, model, layers, groups, formats, task, progress))
    quantised = [fmt for fmt in formats if fmt.quantized]
    if not quantised:
        return MethodChoice("rtn", make_quantizer("rtn", model))
    gptq = make_quantizer("gptq", model, calibrated_tensors("gptq", model, layers, groups, quantised, task, progress))
    caches = {"rtn": QuantizedWeightCache(model), "gptq": QuantizedWeightCache(model, gptq)}
    measured: dict[str, dict[str, float]] = {}
    for fmt in quantised:
        plan = uniform_plan(costs, fmt.name)
        measured[fmt.name] = {name: heldout_loss(plan, caches[name]) for name in AUTO_CANDIDATES}
    chosen = ",".join(f"{fmt}={min(AUTO_CANDIDATES, key=values.get)}" for fmt, values in measured.items())
    for fmt in quantised:  # the losing method's tensors are not needed again
        for name, cache in caches.items():
            if name != method_of(chosen, fmt):
                cache.forget(fmt.name)
    return MethodChoice(chosen, lambda layer, fmt: caches[method_of(chosen, fmt)].get(layer, fmt), measured)

