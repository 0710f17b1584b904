"""Planning: which rewrite each conv/dense layer gets, and fitting it (codebooks and tables, butterfly
factors, low-rank factors), from calibration data. No module is changed here.

``Planner.plan(mod)`` returns one ``rewrite.Plan`` per layer ``graph.find_layers`` lists, in program order,
each with its decision record (method, or the reason it stays exact), its cost accounting and, for a PQ
layer, the table-readout kernel it gets on the target. ``LUTify`` rewrites the module with them;
``PriorityMask`` plans every candidate once and measures them.
"""

from __future__ import annotations

import logging

import numpy as np

from tvm_lut import butterfly as bf
from tvm_lut import calibrate, graph, pq
from tvm_lut import lowrank as lr
from tvm_lut.errors import CalibrationError, OptionError
from tvm_lut.options import LayerOptions, coerce

from .rewrite import Plan, account, lookup_kernel, rewrite

log = logging.getLogger("tvm_lut")


class Planner:
    """Decide and fit every layer's rewrite; the options are ``LUTify``'s (see its docstring).

    ``mask`` is a priority-mask decision (layer name -> ``"pq"``/``"exact"``) with its scores in
    ``priority``; ``fitted`` holds already fitted ``pq.PQLayer`` by name, used as they are."""

    def __init__(self, calibration=None, *, k: int = pq.DEFAULT_K, v: int | None = None, distance: str = "l2",
                 layers: dict | None = None, all_layers: bool = False, codebooks: dict | None = None,
                 seed: int = 0, max_calibration_rows: int = 16384, target="x86", schedule: bool = True,
                 sequential: bool = False, fitted: dict | None = None, method: str = "pq",
                 factors: dict | None = None, rank="evbmf", form: str | None = None, butterfly_budget: float = 0.2,
                 lookup: str = "auto", progress: bool = True, priority: dict | None = None):
        if lookup not in ("auto", "shuffle", "gather"):
            raise OptionError(f"lookup={lookup!r}; choose 'auto', 'shuffle' or 'gather'")
        self.calibration = calibration
        self.defaults = LayerOptions(k=k, v=v, distance=distance, method=method, budget=butterfly_budget,
                                     rank=tuple(rank) if isinstance(rank, list) else rank, form=form)
        self.lookup = lookup
        self.method = method
        self.factors = dict(factors or {})
        self.layer_options = {n: coerce(n, o) for n, o in (layers or {}).items()}
        self.all_layers = all_layers
        self.codebooks = dict(codebooks or {})
        self.seed = seed
        self.max_rows = max_calibration_rows
        self.target = target
        self.schedule = schedule
        self.sequential = sequential
        self.progress = progress
        self.priority = dict(priority or {})
        self._mask: dict[str, str] = dict(self.priority.get("decision", {}))
        self._prefit: dict[str, pq.PQLayer] = dict(fitted or {})

    def plan(self, mod) -> list[Plan]:
        """One fitted ``Plan`` per layer of ``mod["main"]``, in program order."""
        found = graph.find_layers(mod)
        names = {l.name for l in found}
        unknown = sorted(set(self.layer_options) - names) + sorted(set(self.codebooks) - names)
        if unknown:
            raise OptionError(f"unknown layer name(s) {unknown}; the model's layers are: {sorted(names)}")
        unknown_f = sorted(set(self.factors) - names)
        if unknown_f:
            raise OptionError(f"factors for unknown layer name(s) {unknown_f}; the model's layers are: {sorted(names)}")
        plans = [self._plan(l) for l in found]
        for p in plans:
            if p.method in ("butterfly", "lowrank"):
                self._fit_structured(p)
        todo = [p for p in plans if p.record["method"] == "pq"]
        need_calib = [p for p in todo if p.layer.name not in self.codebooks and p.layer.name not in self._prefit]
        inputs = None
        if need_calib:
            if self.calibration is None:
                raise CalibrationError("LUTify needs calibration data (or codebooks=) to learn codebooks for "
                                       + ", ".join(p.layer.name for p in need_calib))
            inputs = calibrate.normalize_inputs(self.calibration, graph.input_signature(mod["main"]))
        if self.sequential:
            self._fit_sequential(mod, found, todo, inputs)
        else:
            rows = {}
            if need_calib:
                rows = calibrate.collect(mod, [p.layer for p in need_calib], inputs, target=self.target,
                                         max_rows=self.max_rows, seed=self.seed, progress=self.progress)
            for p in todo:
                self._fit(p, rows.get(p.layer.name))
        for p in plans:
            account(p)
            if p.record["method"] == "pq":
                p.record["kernel"] = self.lookup_kernel(p)
        return plans

    def lookup_kernel(self, p: Plan, target=None) -> str:
        """``"shuffle-<isa>"``, ``"gather"`` or ``"cam"`` for a PQ layer on ``target`` (default: the
        planner's); see ``lookup``."""
        return lookup_kernel(self.target if target is None else target, self.lookup, p.pq_layer.k, p.layer.rows,
                             p.layer.kind, p.pq_layer.distance, p.layer.name)

    def _plan(self, layer: graph.Layer) -> Plan:
        opts = self.layer_options.get(layer.name, LayerOptions())
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
            cb, distance = _codebook_entry(layer.name, self.codebooks[layer.name], distance)
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
        method = opts.method or ("butterfly" if layer.name in self.factors else None) or self.method
        if method in ("butterfly", "lowrank"):
            for key in ("k", "v", "c", "distance"):
                rec.pop(key, None)
            rec["method"] = method
            if method == "butterfly":
                rec["budget"] = opts.budget or self.defaults.budget
            else:
                rank = opts.rank or self.defaults.rank
                rec["rank_rule"] = list(rank) if isinstance(rank, tuple) else rank
                rec["form"] = opts.form or self.defaults.form
            return Plan(layer, rec)
        if opts.method == "exact" or method == "exact":
            rec["reason"] = "requested"
        elif mask == "exact":
            why = self.priority["scores"].get(layer.name, {}).get("why", "")
            rec["reason"] = f"priority mask: {why}" if why else "priority mask"
        elif mask == "pq":
            rec["method"] = "pq"
        elif layer.m <= k and not self.all_layers and opts.method != "pq" and not learned:
            rec["reason"] = (f"narrow layer (M={layer.m} <= K={k}): encoding costs K*D={k * layer.d} "
                             f"multiplies per row vs D*M={layer.d * layer.m} exact; force with all_layers")
        else:
            rec["method"] = "pq"
        if rec["method"] == "exact":
            log.info("layer %s stays exact: %s", layer.name, rec["reason"])
        return Plan(layer, rec)

    def _fit_structured(self, p: Plan) -> None:
        """Butterfly chain (trained factors or ALS) or low-rank factors for plan ``p``; a layer the
        rewrite cannot serve (no chain within budget, a rank that saves nothing) goes back to exact."""
        r, layer = p.record, p.layer
        w_md = layer.weight.T.astype(np.float64)  # (M, D), conv columns (c, kh, kw)
        if r["method"] == "butterfly" and layer.name in self.factors:
            # given by the user: a mismatch is an error (raised here), never silently an exact layer
            p.chain, p.factors = _trained_chain(layer, self.factors[layer.name])
            r["fit_error"] = float(np.linalg.norm(w_md - bf.product(p.chain, p.factors)) / (np.linalg.norm(w_md) or 1.0))
            r.update(chain=p.chain.describe(), params=p.chain.params, wasted_params=p.chain.wasted_params)
            return
        try:
            if r["method"] == "butterfly":
                p.chain = bf.chain_for(layer.d, layer.m, r["budget"])
                p.factors, r["fit_error"] = bf.als_fit(w_md, p.chain, sweeps=4, seed=self.seed)
                r.update(chain=p.chain.describe(), params=p.chain.params, wasted_params=p.chain.wasted_params)
            else:
                kh, kw = layer.conv["kernel_hw"] if layer.kind == "conv2d" else (1, 1)
                w = w_md if layer.kind == "dense" else w_md.reshape(layer.m, -1, kh, kw)
                rank = r["rank_rule"]
                if isinstance(rank, list):  # [r_in, r_out]: Tucker-2 at these ranks
                    p.lowrank = lr.factorize_tucker2(w, rank[1], rank[0])
                else:
                    p.lowrank = lr.factorize(w, rank, r["form"])
                stride_area = 1 if layer.kind == "dense" else layer.conv["strides"][0] * layer.conv["strides"][1]
                lr_mul = p.lowrank.mul_per_pixel(layer.d // (kh * kw), layer.m, stride_area)
                r.update(form=p.lowrank.form, ranks=list(p.lowrank.ranks), params=p.lowrank.params,
                         fit_error=lr.relative_error(w, p.lowrank))
                if lr_mul >= layer.d * layer.m:
                    raise OptionError(f"rank {list(p.lowrank.ranks)} ({p.lowrank.form}) removes no multiplies "
                                      f"({lr_mul} vs {layer.d * layer.m} per output pixel)")
        except OptionError as e:
            log.warning("layer %s stays exact: %s", layer.name, e)
            r["reason"] = f"{r['method']}: {e}"
            r["method"] = "exact"
            p.chain = p.factors = p.lowrank = None

    def _fit(self, p: Plan, rows: np.ndarray | None, targets: np.ndarray | None = None) -> None:
        r, name = p.record, p.layer.name
        if name in self._prefit:  # fitted by the PriorityMask run of LUTify(budget=...)
            p.pq_layer = self._prefit[name]
            return
        if name in self.codebooks:
            cents, _ = _codebook_entry(name, self.codebooks[name], r["distance"])
            p.pq_layer = _from_codebooks(p.layer, cents, r["distance"])
            return
        if len(rows) < r["k"]:
            raise CalibrationError(f"layer {name!r}: K={r['k']} centroids need at least {r['k']} "
                                   f"calibration vectors, got {len(rows)}")
        p.pq_layer = pq.fit_layer(rows, p.layer.weight, p.layer.bias, k=r["k"], v=r["v"],
                                  distance=r["distance"], seed=self.seed, targets=targets)

    def _fit_sequential(self, mod, found: list, todo: list[Plan], inputs) -> None:
        """Fit layers in program order, each on its inputs in the model with earlier layers converted.

        Codebooks are learned on those (already approximate) inputs; tables are then fitted to the exact
        model's output of the layer for the same rows, so each layer also corrects the error upstream.
        """
        from tqdm import tqdm

        learn = [p for p in todo if p.layer.name not in self.codebooks]
        exact = calibrate.collect(mod, [p.layer for p in learn], inputs, target=self.target,
                                  max_rows=self.max_rows, seed=self.seed, progress=False) if learn else {}
        done: list[Plan] = []
        bar = tqdm(todo, desc="learning codebooks", unit="layer", disable=None if self.progress else True, leave=False)
        for p in bar:
            rows = targets = None
            if p.layer.name not in self.codebooks:
                cur = rewrite(mod, done, self.schedule) if done else mod
                # converted layers vanish from the graph; the others keep their program order
                remaining = [l for l in found if not any(l is d.layer for d in done)]
                now = graph.find_layers(cur)[remaining.index(p.layer)]
                rows = calibrate.collect(cur, [now], inputs, target=self.target, max_rows=self.max_rows,
                                         seed=self.seed, progress=False, keys=[p.layer.name])[p.layer.name]
                targets = exact[p.layer.name].astype(np.float64) @ p.layer.weight.astype(np.float64)
            self._fit(p, rows, targets)
            done.append(p)


def _trained_chain(layer: graph.Layer, entry) -> tuple[bf.Chain, list[np.ndarray]]:
    """A ``factors=`` entry checked against the layer, with the per-output scale the compiler folded
    into the layer (batch norm, ``multiply``) moved into the last factor's rows."""
    try:
        chain = bf.Chain.from_json(entry["chain"])
        values = [np.asarray(v, np.float32) for v in entry["values"]]
    except (KeyError, TypeError, ValueError) as e:
        raise OptionError(f"factors[{layer.name!r}] must be {{'chain': ..., 'values': [...]}}: {e}") from None
    if (chain.d_in, chain.d_out) != (layer.d, layer.m):
        raise OptionError(f"factors[{layer.name!r}]: chain {chain.d_in} -> {chain.d_out} does not match the layer "
                          f"({layer.d} -> {layer.m})")
    if len(values) != len(chain.factors) or any(v.shape != f.shape for v, f in zip(values, chain.factors)):
        raise OptionError(f"factors[{layer.name!r}]: value shapes {[v.shape for v in values]} do not match the chain "
                          f"{[f.shape for f in chain.factors]}")
    prod = bf.product(chain, values)  # (M, D)
    target = layer.weight.T.astype(np.float64)
    norm2 = (prod ** 2).sum(1)
    scale = np.where(norm2 > 0, (prod * target).sum(1) / np.maximum(norm2, 1e-300), 1.0)
    if np.linalg.norm(prod * scale[:, None] - target) > 1e-3 * (np.linalg.norm(target) or 1.0):
        raise OptionError(f"factors[{layer.name!r}] do not reproduce the layer's weight (up to a per-output scale): "
                          "were they trained for this model?")
    last, f = values[-1].copy(), chain.factors[-1]
    rows, _cols = bf.support(f)
    full = np.ones(f.p)
    full[: layer.m] = scale
    values[-1] = (last.reshape(-1) * full[rows]).reshape(f.shape).astype(np.float32)
    return chain, values


def _codebook_entry(name: str, entry, default_distance: str) -> tuple[np.ndarray, str]:
    """A ``codebooks=`` value: a (C, K, V) array, or ``{"centroids": array, "distance": str}`` as returned
    by ``tvm_lut.lutnn.learned_codebooks`` -> (centroids, distance)."""
    distance = default_distance
    if isinstance(entry, dict):
        if "centroids" not in entry:
            raise OptionError(f"codebooks[{name!r}] is a dict without 'centroids'")
        distance = str(entry.get("distance", default_distance))
        entry = entry["centroids"]
    cb = np.asarray(entry, dtype=np.float32)
    if cb.ndim != 3:
        raise OptionError(f"codebooks[{name!r}] has shape {cb.shape}, expected (C, K, V)")
    if distance not in pq.DISTANCES:
        raise OptionError(f"codebooks[{name!r}]: unknown distance {distance!r}")
    if not np.isfinite(cb).all():
        raise OptionError(f"codebooks[{name!r}] contains NaN or Inf")
    return cb, distance


def _from_codebooks(layer: graph.Layer, centroids: np.ndarray, distance: str) -> pq.PQLayer:
    c, _k, v = centroids.shape
    if c * v < layer.d or (c - 1) * v >= layer.d:
        raise OptionError(f"codebooks for {layer.name!r} have C={c}, V={v}, which does not cover D={layer.d}")
    tables_q, scale = pq.quantize_tables(pq.build_tables(centroids, pq.pad_columns(layer.weight.T, c * v).T))
    return pq.PQLayer(centroids, tables_q, scale, layer.bias, distance, layer.d)
