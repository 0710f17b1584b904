"""Per-layer options of the LUTify pass, addressed by layer name: the method (``pq``, ``butterfly``,
``lowrank`` or ``exact``) and its settings (K, V, distance for PQ; budget for butterfly chains; rank and
form for low rank).

In Python: ``LUTify(layers={"features.3": {"k": 8, "v": 2}, "fc": "exact", "conv2": {"method": "lowrank",
"rank": "evbmf"}})``.
On the command line: ``--layer features.3:k=8,v=2 --layer fc:exact --layer conv2:method=lowrank,rank=evbmf``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm_lut.errors import OptionError
from tvm_lut.math.pq import DISTANCES

BUILT_IN_METHODS = ("pq", "butterfly", "lowrank", "exact")  # the planner checks names against the registry
FIELDS = ("method", "k", "v", "distance", "budget", "rank", "form")


@dataclass(frozen=True)
class LayerOptions:
    method: str | None = None  # None: decided by the pass (pq unless unprofitable/unsupported)
    k: int | None = None
    v: int | None = None
    distance: str | None = None
    budget: float | None = None  # butterfly: parameter budget (count, or fraction < 1 of the dense layer)
    rank: object = None  # lowrank: int, [r_in, r_out] (tucker2), "evbmf" or "energy=0.95"
    form: str | None = None  # lowrank: "pair" | "tucker2" (default: fewer multiplies)

    def __post_init__(self):
        if self.method is not None and not (isinstance(self.method, str) and self.method):
            raise OptionError(f"method {self.method!r} must be a method name (pq, butterfly, lowrank, int8, exact or "
                              "one registered with relay_passes.registry)")
        if self.k is not None and not (2 <= self.k <= 256):
            raise OptionError(f"K={self.k} out of range: 2..256 centroids per codebook (int8 tables, int32 codes)")
        if self.v is not None and self.v < 1:
            raise OptionError(f"V={self.v} out of range: the subvector length must be >= 1")
        if self.distance is not None and self.distance not in DISTANCES:
            raise OptionError(f"unknown distance {self.distance!r}; choose one of {', '.join(DISTANCES)}")
        if self.budget is not None and not self.budget > 0:
            raise OptionError(f"butterfly budget {self.budget} must be a parameter count or a fraction in (0, 1)")
        if self.form is not None and self.form not in ("pair", "tucker2"):
            raise OptionError(f"unknown low-rank form {self.form!r}; choose pair or tucker2")
        if self.rank is not None:
            r = self.rank
            ok = (isinstance(r, int) and r >= 1) or r == "evbmf" or (isinstance(r, str) and r.startswith("energy=")) \
                or (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and x >= 1 for x in r))
            if not ok:
                raise OptionError(f"rank {r!r}: use an integer, [r_in, r_out], 'evbmf' or 'energy=0.95'")


def coerce(name: str, value) -> LayerOptions:
    """A user value (``"exact"``, a dict, or LayerOptions) for layer ``name`` -> LayerOptions."""
    if isinstance(value, LayerOptions):
        return value
    if isinstance(value, str):
        return LayerOptions(method=value)
    if isinstance(value, dict):
        unknown = set(value) - set(FIELDS)
        if unknown:
            raise OptionError(f"layer {name!r}: unknown option(s) {sorted(unknown)}; use {', '.join(FIELDS)}")
        vals = {}
        for k, v in value.items():
            if k in ("k", "v"):
                v = int(v)
            elif k == "budget":
                v = float(v)
            elif k == "rank" and isinstance(v, (list, tuple)):
                v = tuple(int(x) for x in v)
            elif k == "rank" and not isinstance(v, str):
                v = int(v)
            vals[k] = v
        try:
            return LayerOptions(**vals)
        except OptionError as e:
            raise OptionError(f"layer {name!r}: {e}") from None
    raise OptionError(f"layer {name!r}: options must be a method name ({', '.join(BUILT_IN_METHODS)}...) or a dict, "
                      f"got {value!r}")


def parse_cli(specs: list[str]) -> dict[str, LayerOptions]:
    """``["features.3:k=8,v=2", "fc:exact"]`` -> {name: LayerOptions}."""
    out = {}
    for spec in specs:
        name, sep, rest = spec.rpartition(":")
        if not sep or not name:
            raise OptionError(f"--layer {spec!r}: expected NAME:exact or NAME:k=16,v=4,distance=l2 "
                              "(or method=lowrank,rank=evbmf / method=butterfly,budget=0.2)")
        if rest and "=" not in rest and "," not in rest:  # NAME:METHOD (checked against the registry by LUTify)
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
            elif key == "budget":
                try:
                    fields[key] = float(val)
                except ValueError:
                    raise OptionError(f"--layer {spec!r}: budget must be a number, got {val!r}") from None
            elif key == "rank" and val.isdigit():
                fields[key] = int(val)
            else:
                fields[key] = val
        out[name] = coerce(name, fields)
    return out
