"""Per-layer options of the LUTify pass: K, V, distance, or exact, addressed by layer name.

In Python: ``LUTify(layers={"features.3": {"k": 8, "v": 2}, "fc": "exact"})``.
On the command line: ``--layer features.3:k=8,v=2 --layer fc:exact``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import OptionError
from .pq import DISTANCES

METHODS = ("pq", "exact")


@dataclass(frozen=True)
class LayerOptions:
    method: str | None = None  # None: decided by the pass (pq unless unprofitable/unsupported)
    k: int | None = None
    v: int | None = None
    distance: str | None = None

    def __post_init__(self):
        if self.method is not None and self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.k is not None and not (2 <= self.k <= 256):
            raise OptionError(f"K={self.k} out of range: 2..256 centroids per codebook (int8 tables, int32 codes)")
        if self.v is not None and self.v < 1:
            raise OptionError(f"V={self.v} out of range: the subvector length must be >= 1")
        if self.distance is not None and self.distance not in DISTANCES:
            raise OptionError(f"unknown distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")


def coerce(name: str, value) -> LayerOptions:
    """A user value (``"exact"``, a dict, or LayerOptions) for layer ``name`` -> LayerOptions."""
    if isinstance(value, LayerOptions):
        return value
    if isinstance(value, str):
        return LayerOptions(method=value)
    if isinstance(value, dict):
        unknown = set(value) - {"method", "k", "v", "distance"}
        if unknown:
            raise OptionError(f"layer {name!r}: unknown option(s) {sorted(unknown)}; use k, v, distance or method")
        return LayerOptions(**{k: (int(v) if k in ("k", "v") else v) for k, v in value.items()})
    raise OptionError(f"layer {name!r}: options must be 'exact', 'pq' or a dict, got {value!r}")


def parse_cli(specs: list[str]) -> dict[str, LayerOptions]:
    """``["features.3:k=8,v=2", "fc:exact"]`` -> {name: LayerOptions}."""
    out = {}
    for spec in specs:
        name, sep, rest = spec.rpartition(":")
        if not sep or not name:
            raise OptionError(f"--layer {spec!r}: expected NAME:exact or NAME:k=16,v=4,distance=l2")
        if rest in METHODS:
            out[name] = LayerOptions(method=rest)
            continue
        fields = {}
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            if not eq:
                raise OptionError(f"--layer {spec!r}: {item!r} is not KEY=VALUE")
            if key in ("k", "v"):
                try:
                    fields[key] = int(val)
                except ValueError:
                    raise OptionError(f"--layer {spec!r}: {key} must be an integer, got {val!r}") from None
            else:
                fields[key] = val
        out[name] = coerce(name, fields)
    return out
