"""A Plan: which format each quantisable layer takes. Plain data, saved as versioned JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpq.errors import MpqError
from mpq.formats import FormatSpec, get_format

PLAN_VERSION = 1


@dataclass
class Plan:
    formats: dict[str, str]  # layer name -> format name
    model: str = ""
    version: int = PLAN_VERSION
    meta: dict = field(default_factory=dict)

    def specs(self) -> dict[str, FormatSpec]:
        return {layer: get_format(name) for layer, name in self.formats.items()}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.formats.values():
            out[name] = out.get(name, 0) + 1
        return out

    def to_json(self) -> dict:
        return {"version": self.version, "model": self.model, "formats": dict(self.formats), "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION or not isinstance(data.get("formats"), dict):
            raise MpqError(f"not an mpq plan of version {PLAN_VERSION}: expected {{'version': 1, 'formats': {{layer: format}}}}")
        try:
            for name in data["formats"].values():
                get_format(name)
        except ValueError as exc:
            raise MpqError(f"plan names an unknown format: {exc}") from exc
        return cls(formats=dict(data["formats"]), model=data.get("model", ""), meta=data.get("meta", {}))
