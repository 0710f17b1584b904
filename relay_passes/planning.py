"""Planning: which rewrite each conv/dense layer gets, and fitting it (codebooks and tables, butterfly
factors, low-rank factors), from calibration data. No module is changed here.

``Planner.plan(mod)`` returns one ``rewrite.Plan`` per layer ``graph.find_layers`` lists, in program order,
each with its decision record (method, or the reason it stays exact), its cost accounting and, for a PQ
layer, the table-readout kernel it gets on the target. ``LUTify`` rewrites the module with them;
``PriorityMask`` plans every candidate once and measures them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field

import numpy as np

from tvm_lut import targets
from tvm_lut.errors import CalibrationError, OptionError
from tvm_lut.frontend import graph
from tvm_lut.math import distances, pq
from tvm_lut.options import LayerOptions, coerce
from tvm_lut.runtime import calibrate

from . import methods  # noqa: F401  (registers the built-in methods)
from . import registry
from .methods.pq import codebook_entry
from .registry import KeepExact
from .rewrite import Plan, account, rewrite

log = logging.getLogger("tvm_lut")


EXACT_ARITHMETIC = ("fp32", "int8")  # how layers that stay exact run (``LUTify(exact=)``)


def check_exact(exact: str) -> None:
    """An ``OptionError`` naming the choices unless ``exact`` is one of ``EXACT_ARITHMETIC``."""
    if exact not in EXACT_ARITHMETIC:
        raise OptionError(f"exact={exact!r}; choose " + " or ".join(repr(a) for a in EXACT_ARITHMETIC))


@dataclass(frozen=True)
class LUTifyOptions:
    """Every option of a LUTify run, validated once when made (see ``LUTify``'s docstring for each).

    ``LUTify(k=8, v=4, ...)`` builds one; ``LUTify(options=LUTifyOptions(...))`` takes one as it is, and
    ``dataclasses.replace(options, target="arm")`` derives another."""

    k: int = pq.DEFAULT_K
    v: int | None = None
    distance: str = "l2"
    layers: dict = field(default_factory=dict)  # layer name -> LayerOptions (coerced from names or dicts)
    all_layers: bool = False
    codebooks: dict = field(default_factory=dict)
    seed: int = 0
    max_calibration_rows: int = 16384
    target: object = "x86"
    schedule: bool = True
    sequential: bool = False
    fitted: dict = field(default_factory=dict)
    method: str = "pq"
    factors: dict = field(default_factory=dict)
    rank: object = "evbmf"
    form: str | None = None
    butterfly_budget: float = 0.2
    lookup: str = "auto"
    encoder: str = "int8"
    progress: bool = True
    budget: object = None
    labels: object = None
    mask_rank: str = "multiplies"
    exact: str = "fp32"
    database: str | None = None

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        put("layers", {n: coerce(n, o) for n, o in dict(self.layers or {}).items()})
        for name in ("codebooks", "fitted", "factors"):
            put(name, dict(getattr(self, name) or {}))
        if isinstance(self.rank, list):
            put("rank", tuple(self.rank))
        if self.lookup not in ("auto", "shuffle", "gather"):
            raise OptionError(f"lookup={self.lookup!r}; choose 'auto', 'shuffle' or 'gather'")
        if self.encoder not in ("fp32", "int8"):
            raise OptionError(f"encoder={self.encoder!r}; choose 'fp32' or 'int8'")
        distances.get(self.distance)
        LayerOptions(k=self.k, v=self.v, budget=self.butterfly_budget, rank=self.rank, form=self.form)
        for n, o in [(None, LayerOptions(method=self.method)), *self.layers.items()]:
            if o.method is not None and o.method != "exact":
                try:
                    registry.get(o.method)
                except OptionError as e:
                    raise OptionError(f"layer {n!r}: {e}" if n else str(e)) from None
        check_exact(self.exact)
        if self.mask_rank not in ("latency", "multiplies"):
            raise OptionError(f"mask_rank={self.mask_rank!r}; choose 'latency' or 'multiplies'")
        if self.budget is not None and self.method != "pq":
            raise OptionError(f"budget={self.budget!r} chooses which layers become PQ lookups; it needs "
                              f"method='pq' (got method={self.method!r})")


class Planner:
    """Decide and fit every layer's rewrite under ``options`` (a ``LUTifyOptions``).

    ``priority`` is a priority-mask result (its ``decision``: layer name -> ``"pq"``/``"exact"``, and
    per-layer ``scores``); ``options.fitted`` holds already fitted ``pq.PQLayer`` by name, used as they are."""

    def __init__(self, calibration=None, options: LUTifyOptions | None = None, *, priority: dict | None = None,
                 **kwargs):
        o = options if options is not None else LUTifyOptions(**kwargs)
        if options is not None and kwargs:
            o = dataclasses.replace(options, **kwargs)
        self.options = o
        self.calibration = calibration
        self.defaults = LayerOptions(k=o.k, v=o.v, distance=o.distance, method=o.method, budget=o.butterfly_budget,
                                     rank=o.rank, form=o.form)
        # what the methods read (``RewriteMethod.fit``): the others are read from ``options``
        self.factors, self.codebooks, self.seed, self.target = o.factors, o.codebooks, o.seed, o.target
        self.priority = dict(priority or {})
        self._mask: dict[str, str] = dict(self.priority.get("decision", {}))
        self.fitted: dict[str, pq.PQLayer] = dict(o.fitted)

    def plan(self, mod) -> list[Plan]:
        """One fitted ``Plan`` per layer of ``mod["main"]``, in program order."""
        found = graph.find_layers(mod)
        names = {l.name for l in found}
        unknown = sorted(set(self.options.layers) - names) + sorted(set(self.codebooks) - names)
        if unknown:
            raise OptionError(f"unknown layer name(s) {unknown}; the model's layers are: {sorted(names)}")
        unknown_f = sorted(set(self.factors) - names)
        if unknown_f:
            raise OptionError(f"factors for unknown layer name(s) {unknown_f}; the model's layers are: {sorted(names)}")
        plans = [self._plan(l) for l in found]
        for p in plans:
            if p.method != "exact" and not registry.get(p.method).calibrated:
                self._fit(p)
        todo = [p for p in plans if p.method != "exact" and registry.get(p.method).calibrated]
        need_calib = [p for p in todo if registry.get(p.method).needs_rows(p, self)]
        inputs = None
        if need_calib:
            if self.calibration is None:
                raise CalibrationError("LUTify needs calibration data (or codebooks=) to learn codebooks for "
                                       + ", ".join(p.layer.name for p in need_calib))
            inputs = calibrate.normalize_inputs(self.calibration, graph.input_signature(mod["main"]))
        if self.options.sequential:
            self._fit_sequential(mod, found, todo, inputs)
        else:
            rows = {}
            if need_calib:
                rows = calibrate.collect(mod, [p.layer for p in need_calib], inputs, target=self.target,
                                         max_rows=self.options.max_calibration_rows, seed=self.seed,
                                         progress=self.options.progress)
            self._fit_all(todo, rows)
        for p in plans:
            account(p)
        return plans

    def _fit_all(self, todo: list[Plan], rows: dict) -> None:
        """Fit the layers on threads, one per core: a fit is numpy (k-means, matrix products, a ridge
        solve) that releases the GIL, so a ResNet-18-class model's hundreds of clusterings use both cores
        of a 2-core box. Each fit is seeded on its own: the result does not depend on the order; the first
        error in program order is raised."""
        from concurrent.futures import ThreadPoolExecutor

        from tvm_lut.runtime.build import default_threads

        workers = min(len(todo), default_threads())
        if workers <= 1:
            for p in todo:
                self._fit(p, rows.get(p.layer.name))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="lutify-fit") as pool:
            futures = [pool.submit(self._fit, p, rows.get(p.layer.name)) for p in todo]
            for f in futures:
                f.result()

    def _fit(self, p: Plan, rows=None, targets=None) -> None:
        """The layer's method fits it; ``KeepExact`` from the method keeps the layer exact, with the reason."""
        try:
            registry.get(p.method).fit(p, self, rows, targets)
        except KeepExact as e:
            log.warning("layer %s stays exact: %s", p.layer.name, e)
            p.record["reason"] = f"{p.method}: {e}"
            p.record["method"] = "exact"
            p.chain = p.factors = p.lowrank = p.pq_layer = p.state = None

    def lookup_kernel(self, p: Plan, target=None) -> str:
        """``"shuffle-<isa>"``, ``"gather"`` or ``"cam"`` for a PQ layer on ``target`` (default: the
        planner's); see ``lookup``."""
        tgt = targets.resolve(self.target if target is None else target)
        return tgt.lookup_kernel(self.options.lookup, p.pq_layer.k, p.layer.rows, p.layer.kind, p.pq_layer.distance,
                                 p.layer.name)

    def _plan(self, layer: graph.Layer) -> Plan:
        opts = self.options.layers.get(layer.name, LayerOptions())
        rec = {
            "name": layer.name,
            "kind": layer.kind,
            "weight_param": layer.weight_param,
            "input_shape": list(layer.input_shape),
            "output_shape": list(layer.output_shape),
            "method": "exact",
            "reason": "",
        }
        if layer.unsupported:
            rec["reason"] = layer.unsupported
            log.warning("layer %s stays exact: %s", layer.name, layer.unsupported)
            return Plan(layer, rec)
        kh = layer.conv["kernel_hw"] if layer.conv else None
        k = opts.k or self.defaults.k
        v = opts.v or self.defaults.v or pq.default_subvector_len(layer.kind, kh)
        distance = opts.distance or self.defaults.distance
        learned = layer.name in self.codebooks
        if learned:
            cb, distance = codebook_entry(layer.name, self.codebooks[layer.name], distance)
            k, v = int(cb.shape[1]), int(cb.shape[2])
            if layer.d and (cb.shape[0] * v < layer.d or (cb.shape[0] - 1) * v >= layer.d):
                raise OptionError(f"codebooks for {layer.name!r} have C={cb.shape[0]}, V={v}, which does not "
                                  f"cover D={layer.d}")
        c = pq.num_subspaces(layer.d, v)
        rec.update(
            d=layer.d, m=layer.m, k=k, v=v, c=c, distance=distance, has_bias=layer.bias is not None,
            rows_per_sample=layer.rows_per_sample, conv=None if layer.conv is None else {
                key: list(val) if isinstance(val, tuple) else val for key, val in layer.conv.items()},
        )
        mask = self._mask.get(layer.name)
        if self.priority and layer.name in self.priority.get("scores", {}):
            rec["priority"] = self.priority["scores"][layer.name]
        method = opts.method or ("butterfly" if layer.name in self.factors else None) or self.options.method
        if method not in ("pq", "exact"):  # a method with options of its own (butterfly, lowrank, ...)
            for key in ("k", "v", "c", "distance"):
                rec.pop(key, None)
            rec["method"] = method
            plan = Plan(layer, rec)
            registry.get(method).configure(plan, opts, self)
            return plan
        if opts.method == "exact" or method == "exact":
            rec["reason"] = "requested"
        elif mask == "exact":
            why = self.priority["scores"].get(layer.name, {}).get("why", "")
            rec["reason"] = f"priority mask: {why}" if why else "priority mask"
        elif mask == "pq":
            rec["method"] = "pq"
        elif layer.m <= k and not self.options.all_layers and opts.method != "pq" and not learned:
            rec["reason"] = (f"narrow layer (M={layer.m} <= K={k}): encoding costs K*D={k * layer.d} "
                             f"multiplies per row vs D*M={layer.d * layer.m} exact; force with all_layers")
        else:
            rec["method"] = "pq"
        if rec["method"] == "exact" and self.options.exact == "int8":
            return self._int8(layer, rec)
        if rec["method"] == "exact":
            log.info("layer %s stays exact: %s", layer.name, rec["reason"])
        return Plan(layer, rec)

    def _int8(self, layer: graph.Layer, rec: dict) -> Plan:
        """A layer that stays exact, with ``exact="int8"``: the ``int8`` method when it applies to the layer
        on the target (its fit may still keep it in fp32, with the reason), else fp32 with the reason."""
        plan = Plan(layer, rec)
        why = registry.get("int8").refusal(plan, self.target)
        if why is not None:
            rec["reason"] = f"{rec['reason']}; fp32, not int8: {why}"
            log.info("layer %s stays exact: %s", layer.name, rec["reason"])
            return plan
        for key in ("k", "v", "c", "distance"):
            rec.pop(key, None)
        rec.update(method="int8", exact_reason=rec.pop("reason"))
        return plan

    def _fit_sequential(self, mod, found: list, todo: list[Plan], inputs) -> None:
        """Fit layers in program order, each on its inputs in the model with earlier layers converted.

        Codebooks are learned on those (already approximate) inputs; tables are then fitted to the exact
        model's output of the layer for the same rows, so each layer also corrects the error upstream.
        """
        from tqdm import tqdm

        learn = [p for p in todo if registry.get(p.method).needs_rows(p, self)]
        exact = calibrate.collect(mod, [p.layer for p in learn], inputs, target=self.target,
                                  max_rows=self.options.max_calibration_rows, seed=self.seed,
                                  progress=False) if learn else {}
        done: list[Plan] = []
        bar = tqdm(todo, desc="learning codebooks", unit="layer", disable=None if self.options.progress else True,
                   leave=False)
        for p in bar:
            rows = targets = None
            if registry.get(p.method).needs_rows(p, self):
                cur = rewrite(mod, done, self.options.schedule) if done else mod
                # converted layers vanish from the graph; the others keep their program order
                remaining = [l for l in found if not any(l is d.layer for d in done)]
                now = graph.find_layers(cur)[remaining.index(p.layer)]
                rows = calibrate.collect(cur, [now], inputs, target=self.target,
                                         max_rows=self.options.max_calibration_rows,
                                         seed=self.seed, progress=False, keys=[p.layer.name])[p.layer.name]
                targets = exact[p.layer.name].astype(np.float64) @ p.layer.weight.astype(np.float64)
            self._fit(p, rows, targets)
            done.append(p)
