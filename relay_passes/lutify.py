"""LUTify: rewrite conv2d/dense layers of a Relax module into product-quantization table lookups,
butterfly factor chains or low-rank pairs (``method=``, per layer through ``layers=``).

Each convertible layer (see ``tvm_lut.graph``) becomes, with ``method="pq"`` (the default)::

    im2col (conv only) -> encode (nearest centroid per subspace) -> accumulate (int8 table rows,
    int32 sums) -> astype float32 * scale (+ bias) -> reshape/permute back to the layer's layout

with codebooks and tables as module constants, and its bias/batch-norm epilogue folded in. Codebooks
are learned by k-means on the layer's real inputs, collected by running the model on calibration data
(``tvm_lut.calibrate``); learned codebooks can be passed in instead (``codebooks=``).

With ``method="butterfly"`` (DeBut)::

    im2col (conv only) -> one grouped-matmul kernel per factor of the chain -> slice (padding) + bias
    -> back to the layer's layout

with the chain from ``butterfly.chain_for`` (``budget``, default 20% of the dense parameters) and the
factors from ALS on the layer's weight, or trained ones (``factors=``, ``structured_nn``). With
``method="lowrank"``: two matmuls (dense), a KxK + 1x1 conv pair or a 1x1 -> KxK -> 1x1 Tucker-2 triple
(convs, keeping stride, padding and dilation), ranks by EVBMF unless given (``rank=``).

Layers stay exact, with the reason recorded, when the rewrite cannot apply (grouped conv, dynamic
shape, non-float32) or, unless ``all_layers=True``, when it would not pay: the L2/cosine encoder spends
K*D multiplies per row against D*M for the exact layer, so a layer with M <= K gains nothing.

Order: apply on the imported module, before ``tvm_lut.build`` (which legalizes the remaining ops).
The per-layer decisions are kept in the module attribute ``"tvm_lut.layers"`` (JSON) and on the pass
object (``.layers``) for reports.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tir_schedules import kernels, shuffle, tuning, x86
from tvm_lut import butterfly as bf
from tvm_lut import calibrate, cost, graph, pq
from tvm_lut import lowrank as lr
from tvm_lut.errors import CalibrationError, OptionError
from tvm_lut.options import LayerOptions, coerce
from tvm_lut.profile import KernelCall, kernel_calls_between
from tvm_lut.targets import host_for, is_cam, resolve_target

log = logging.getLogger("tvm_lut")

LAYERS_ATTR = "tvm_lut.layers"
MASK_ATTR = "tvm_lut.priority_mask"  # written by PriorityMask (relay_passes.priority_mask)


@dataclass
class _Plan:
    layer: graph.Layer
    record: dict
    pq_layer: pq.PQLayer | None = None
    chain: bf.Chain | None = None  # butterfly
    factors: list | None = None  # butterfly factor values, each (nb, r, s, t)
    lowrank: lr.LowRank | None = None

    @property
    def method(self) -> str:
        return self.record["method"]


def lookup_kernel(target, lookup: str, k: int, rows: int, kind: str, distance: str, name: str = "") -> str:
    """The table-readout kernel a PQ layer gets: ``"cam"``, ``"gather"`` or ``"shuffle-<isa>"``.

    ``lookup`` is LUTify's option (``auto``/``shuffle``/``gather``), ``rows`` the layer's rows per call
    (batch x output pixels), ``kind`` ``"conv2d"`` or ``"dense"``. The decision depends on the target's
    instruction sets (``shuffle.isa_for``): tests derive their expectations from this function, so they
    hold on every ISA level.
    """
    if is_cam(target):
        return "cam"  # encode and readout on the CAM simulator (tvm_lut.cam)
    if lookup == "gather":
        return "gather"
    isa = shuffle.isa_for(resolve_target(target))
    if lookup == "shuffle":
        if isa is None or k != 16:
            raise OptionError(f"lookup='shuffle' for layer {name!r} needs K=16 (got K={k}) and a target "
                              f"with byte shuffles (SSSE3/AVX2/AVX-512BW, or NEON tbl); got {target!r}")
        return f"shuffle-{isa.name}"
    # the shuffle kernel computes a whole row block (isa.lanes rows) per pass: too few rows waste it.
    # A conv still gains from it with one 16-row encoder tile: the encoder reads the input in place
    # (no im2col kernel) and the lookup streams its tables once instead of gathering table rows
    # (measured: 512->512 3x3 on a 4x4 map, 0.161 vs 0.251 ms with hot tables, more when cold). A
    # dense layer keeps the gather below half a block (batch 1 Linear 512->256: 0.004 vs 0.020 ms).
    if isa is None or k != 16:
        return "gather"
    if rows < (min(16, isa.lanes // 2) if kind == "conv2d" else isa.lanes // 2):
        return "gather"
    if distance == "l1":
        # PECAN-D stays multiplier-free end to end only on the gather path: the shuffle kernel's
        # output addressing compiles to an imul per tile (tests/test_multiplier_free.py)
        return "gather"
    return f"shuffle-{isa.name}"


@tvm.transform.module_pass(opt_level=0, name="LUTify")
class LUTify:
    """Replace conv2d/dense layers by PQ table lookups (LUT-NN / TabConv style).

    Parameters
    ----------
    calibration : array, tensor, list of batches, or mapping input name -> array
        Inputs of the model to learn codebooks from (a few hundred samples are typical).
    k, v, distance : defaults for every layer: centroids per codebook (16), subvector length
        (9 for 3x3 convs, 4 otherwise) and encoder distance (``"l2"``, ``"cosine"``, ``"l1"``).
    layers : per-layer options by name, e.g. ``{"features.3": {"k": 8}, "fc": "exact"}``.
    all_layers : also convert layers where lookup is not expected to pay (M <= K).
    codebooks : learned centroids by layer name, each a (C, K, V) array or ``{"centroids", "distance"}``
        (``tvm_lut.lutnn.learned_codebooks``); those layers skip k-means and table refinement (tables are
        P.W of the model's weights, as in training) and are converted even when narrow.
    target : what the kernels are chosen and scheduled for: ``"x86"`` (default, this host), ``"arm"``
        (AArch64: NEON ``tbl`` shuffle lookups) or ``"cam"`` (each PQ layer's encode and table readout call
        the CAM simulator, ``tvm_lut.cam``), or a TVM target; see ``tvm_lut.targets``. Calibration always
        runs on this host.
    schedule : apply the hand schedules (``False`` leaves kernels for MetaSchedule).
    sequential : calibrate each layer on the inputs it sees once the layers before it are already
        lookups (one calibration run per layer; corrects compounding error). ``False`` calibrates all
        layers in one run of the exact model.
    method : the rewrite for every candidate layer: ``"pq"`` (default), ``"butterfly"``, ``"lowrank"`` or
        ``"exact"``; ``layers`` overrides it per layer (``{"fc": {"method": "lowrank", "rank": 8}}``).
    rank, form, butterfly_budget : defaults for low-rank layers (``"evbmf"``, an int, ``[r_in, r_out]`` or
        ``"energy=0.95"``; ``"pair"``/``"tucker2"``, default the cheaper) and butterfly layers (parameter
        budget: a count, or a fraction of the dense layer, default 0.2).
    factors : trained butterfly chains by layer name, ``{"chain": Chain.to_json(), "values": [...]}``
        (``structured_nn.structured_options``); used instead of ALS on the layer's weight.
    fitted : already fitted ``pq.PQLayer`` by layer name (e.g. ``PriorityMask.fitted``), used as they are.
    lookup : the table-readout kernel of PQ layers: ``"auto"`` (default: byte shuffles when the target
        has them, K=16, the distance is not L1 (kept multiplier-free on the gather path) and the layer has at
        least half a shuffle's worth of rows, or 16 for a convolution, else gathers),
        ``"shuffle"`` (``tir_schedules.shuffle``: codes packed two per byte, ``pshufb``; convolutions get
        the encoder fused with im2col) or ``"gather"`` (``kernels.accumulate``, any K). Each layer's record
        says which it got (``kernel``).
    database : a MetaSchedule database directory (``tvm-lut tune --db``): lookup kernels tuned there are
        used instead of their hand schedules (``tuned`` lists them); others keep the hand schedule.
    budget : ``"max-drop=2.0"``, ``"max-disagree=1"`` or ``"min-removed=0.6"``: run ``PriorityMask`` first to
        choose which layers stay exact (``labels``, or a ``labels`` entry in ``calibration``, for max-drop;
        max-disagree measures top-1 agreement with the exact model and needs none). Without
        it, a mask left on the module by an earlier ``PriorityMask`` pass is obeyed.
    """

    def __init__(
        self,
        calibration=None,
        *,
        k: int = pq.DEFAULT_K,
        v: int | None = None,
        distance: str = "l2",
        layers: dict | None = None,
        all_layers: bool = False,
        codebooks: dict | None = None,
        seed: int = 0,
        max_calibration_rows: int = 16384,
        target="x86",
        schedule: bool = True,
        sequential: bool = False,
        budget=None,
        labels=None,
        fitted: dict | None = None,
        method: str = "pq",
        factors: dict | None = None,
        rank="evbmf",
        form: str | None = None,
        butterfly_budget: float = 0.2,
        lookup: str = "auto",
        database: str | None = None,
        progress: bool = True,
    ):
        self.calibration = calibration
        self.defaults = LayerOptions(k=k, v=v, distance=distance, method=method, budget=butterfly_budget,
                                     rank=tuple(rank) if isinstance(rank, list) else rank, form=form)
        if budget is not None and method != "pq":
            raise OptionError(f"budget={budget!r} chooses which layers become PQ lookups; it needs method='pq' "
                              f"(got method={method!r})")
        if lookup not in ("auto", "shuffle", "gather"):
            raise OptionError(f"lookup={lookup!r}; choose 'auto', 'shuffle' or 'gather'")
        self.lookup = lookup
        self.database = database
        self.tuned: list[str] = []  # kernels taken from the tuning database
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
        self.budget = budget
        self.labels = labels
        self.priority: dict = {}  # the PriorityMask result this pass obeyed (empty without one)
        self._mask: dict[str, str] = {}
        self._prefit: dict[str, pq.PQLayer] = dict(fitted or {})
        self._plans: list[_Plan] = []
        self.layers: list[dict] = []  # per-layer decision records (also in the module attribute)
        self.pq_layers: dict[str, pq.PQLayer] = {}  # fitted codebooks/tables by layer name
        self._rewritten: tuple | None = None  # (source module, plans) of the last run, for retarget
        # layer name -> the kernels its rewrite runs in the module of the last run (None: other ops too);
        # ``profile.measure_layers`` times them in the model's own build instead of compiling them again
        self.kernel_calls: dict[str, list[KernelCall] | None] = {}

    # -- planning ------------------------------------------------------------------------------

    def _plan(self, layer: graph.Layer) -> _Plan:
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
            return _Plan(layer, rec)
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
            return _Plan(layer, rec)
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
        return _Plan(layer, rec)

    def _fit_structured(self, p: _Plan) -> None:
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

    # -- the pass ------------------------------------------------------------------------------

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.budget is not None:
            from .priority_mask import PriorityMask

            opts = dict(k=self.defaults.k, v=self.defaults.v, distance=self.defaults.distance,
                        layers=self.layer_options, codebooks=self.codebooks, max_calibration_rows=self.max_rows)
            pm = PriorityMask(self.calibration, self.budget, labels=self.labels, seed=self.seed,
                              target=host_for(self.target), progress=self.progress, **opts)
            mod = pm(mod)
            self._prefit.update(pm.pq_layers)
        if mod.attrs is not None and MASK_ATTR in mod.attrs:
            self.priority = json.loads(str(mod.attrs[MASK_ATTR]))
            self._mask = dict(self.priority["decision"])
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
        structured = [p for p in plans if p.method in ("butterfly", "lowrank")]
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
            _account(p)
            if p.record["method"] == "pq":
                p.record["kernel"] = self._lookup_kernel(p)
        self._plans = plans
        self.layers = [p.record for p in plans]
        self.pq_layers = {p.layer.name: p.pq_layer for p in todo}
        rewrite = todo + structured
        self._rewritten = (mod, rewrite)
        self.kernel_calls = {}
        out = (_rewrite(mod, rewrite, self.schedule, self.database, self.target, self.tuned, self.kernel_calls)
               if rewrite else mod)
        return out.with_attr(LAYERS_ATTR, json.dumps(self.layers))

    def retarget(self, target) -> tvm.IRModule:
        """The model this pass last produced (same codebooks, tables and codes), with its kernels chosen and
        hand-scheduled for another target: a cross-compiled (``arm``) build's accuracy is measured on the
        host build of it. Layer records are left as they were for the pass's own target."""
        if self._rewritten is None:
            raise RuntimeError("LUTify.retarget: run the pass on a module first")
        mod, rewrite = self._rewritten
        if not rewrite:
            return mod.with_attr(LAYERS_ATTR, json.dumps(self.layers))
        own_target, kernels_before = self.target, [p.record.get("kernel") for p in rewrite]
        self.target = resolve_target(target)
        try:
            for p in rewrite:
                if p.record["method"] == "pq":
                    p.record["kernel"] = self._lookup_kernel(p)
            out = _rewrite(mod, rewrite, True, None, self.target)
        finally:
            self.target = own_target
            for p, k in zip(rewrite, kernels_before):
                if k is not None:
                    p.record["kernel"] = k
        return out.with_attr(LAYERS_ATTR, json.dumps(self.layers))

    def _lookup_kernel(self, p: _Plan) -> str:
        """``"shuffle-<isa>"`` or ``"gather"`` for a PQ layer (see ``lookup``)."""
        return lookup_kernel(self.target, self.lookup, p.pq_layer.k, p.layer.rows, p.layer.kind,
                             p.pq_layer.distance, p.layer.name)

    def _fit(self, p: _Plan, rows: np.ndarray | None, targets: np.ndarray | None = None) -> None:
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

    def _fit_sequential(self, mod, found: list, todo: list[_Plan], inputs) -> None:
        """Fit layers in program order, each on its inputs in the model with earlier layers converted.

        Codebooks are learned on those (already approximate) inputs; tables are then fitted to the exact
        model's output of the layer for the same rows, so each layer also corrects the error upstream.
        """
        from tqdm import tqdm

        learn = [p for p in todo if p.layer.name not in self.codebooks]
        exact = calibrate.collect(mod, [p.layer for p in learn], inputs, target=self.target,
                                  max_rows=self.max_rows, seed=self.seed, progress=False) if learn else {}
        done: list[_Plan] = []
        bar = tqdm(todo, desc="learning codebooks", unit="layer", disable=None if self.progress else True, leave=False)
        for p in bar:
            rows = targets = None
            if p.layer.name not in self.codebooks:
                cur = _rewrite(mod, done, self.schedule) if done else mod
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


def _account(p: _Plan) -> None:
    """Fill the record's op counts and byte sizes (per input sample)."""
    r, layer = p.record, p.layer
    if layer.weight is None or "d" not in r:
        return
    rows = layer.rows_per_sample
    r["rows"] = layer.rows  # rows of one compiled batch (the kernels' N)
    has_bias = layer.bias is not None
    r["exact_ops"] = cost.exact_ops(rows, layer.d, layer.m, has_bias)
    r["weight_bytes"] = cost.weight_bytes(layer.d, layer.m, has_bias)
    r["exact_params"] = layer.d * layer.m + (layer.m if has_bias else 0)
    if r["method"] == "butterfly":
        r["lut_ops"] = cost.butterfly_ops(rows, [f.p for f in p.chain.factors], p.chain.params, layer.m, has_bias)
        r["factor_bytes"] = cost.param_bytes(p.chain.params, layer.m, has_bias)
    elif r["method"] == "lowrank":
        f, m, d = p.lowrank, layer.m, layer.d
        if layer.kind == "dense" or f.form == "pair":
            stages = [(rows, d, f.ranks[0]), (rows, f.ranks[0], m)]
        else:
            kh, kw = f.kernel_hw
            c = d // (kh * kw)
            in_pixels = int(np.prod(layer.input_shape[2:]))
            stages = [(in_pixels, c, f.ranks[0]), (rows, f.ranks[0] * kh * kw, f.ranks[1]), (rows, f.ranks[1], m)]
        r["lut_ops"] = cost.matmul_chain_ops(stages, m, rows, has_bias)
        r["factor_bytes"] = cost.param_bytes(f.params, m, has_bias)
    if r["method"] == "pq":
        r["lut_ops"] = cost.lut_ops(rows, r["c"], r["k"], r["v"], r["m"], r["distance"], r["has_bias"])
        r["table_bytes"] = cost.table_bytes(r["c"], r["k"], r["m"], r["has_bias"])
        r["codebook_bytes"] = cost.codebook_bytes(r["c"], r["k"], r["v"], r["distance"])


# ----------------------------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------------------------


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name).strip("_") or "layer"


_KERNELS: dict[tuple, tirx.PrimFunc] = {}  # hand-scheduled kernels built in this process, by shape and target


def _built_kernel(key: tuple, make, schedule: bool) -> tirx.PrimFunc:
    """A kernel built (TVMScript parse + hand schedule: ~0.2 s each) once per process: the priority mask
    rewrites the same layers once per evaluated prefix, and each rewrite used to rebuild every kernel."""
    func = _KERNELS.get(key)
    if func is None:
        func = make()
        if schedule:
            func = x86.schedule(func)
        if len(_KERNELS) >= 4096:
            _KERNELS.clear()
        _KERNELS[key] = func
    return func


@mutator
class _LookupRewriter(PyExprMutator):
    def __init__(self, mod, plans: list[_Plan], schedule: bool, database: str | None = None, target=None,
                 switch: relax.Var | None = None):
        super().__init__(mod)
        self.switch = switch  # switchable: both paths kept, ``switch[i]`` picks plan i's lookup output
        self.pending: dict = {}  # switchable: exact output var -> (lookup output, plan index)
        self.index = {p.layer.call_var: i for i, p in enumerate(plans)}
        self.database = database
        self.target = target
        self.tuned: list[str] = []
        self.by_call = {p.layer.call_var: p for p in plans}
        self.drop = [] if switch is not None else [v for p in plans for v in [p.layer.call_var, *p.layer.folded_vars]]
        self.schedule = schedule
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.calls: dict[str, list[KernelCall] | None] = {}  # layer name -> its kernels, as emitted

    def _kernel(self, key: tuple, name: str, make) -> relax.GlobalVar:
        return self._kernel_func(key, name, make)[0]

    def _kernel_func(self, key: tuple, name: str, make) -> tuple[relax.GlobalVar, tirx.PrimFunc]:
        """Build (once per shape) a kernel: tuned from the database when it has it, else hand-scheduled
        (or left unscheduled for MetaSchedule with ``schedule=False``)."""
        got = self.kernels.get(key)
        if got is None:
            func = None
            tuned = None
            if self.database:
                func = make()
            if self.database and tuning.tunable(func):
                tuned = tuning.apply_database(func, self.target, self.database)
                if tuned is not None:
                    self.tuned.append(name)
            if tuned is not None:
                func = tuned
            else:
                func = _built_kernel((key, name, self.schedule, str(self.target)), make, self.schedule)
            got = (self.builder_.add_func(func, name), func)
            self.kernels[key] = got
        return got

    def visit_var_binding_(self, binding):
        plan = self.by_call.get(binding.var)
        if plan is not None and self.switch is not None:
            x = self.visit_expr(plan.layer.input_expr)
            y = self._emit_lookup(plan, x, as_output=False)
            self.calls[plan.layer.name] = kernel_calls_between(self.builder_.lookup_binding, x, y)
            self.pending[plan.layer.output_var] = (y, self.index[binding.var])
        elif plan is not None:
            x = self.visit_expr(plan.layer.input_expr)
            out_var = plan.layer.output_var
            y = self._emit_lookup(plan, x, as_output=not isinstance(out_var, relax.DataflowVar))
            self.calls[plan.layer.name] = kernel_calls_between(self.builder_.lookup_binding, x, y)
            self.set_var_remap(out_var, y)
            return
        if any(binding.var.same_as(v) for v in self.drop):
            return
        super().visit_var_binding_(binding)
        if binding.var in self.pending:
            y, i = self.pending.pop(binding.var)
            bb = self.builder_
            flag = bb.emit(relax.op.take(self.switch, relax.const(i, "int64"), axis=0, mode="clip"))
            pick = relax.op.where(flag, y, self.visit_expr(binding.var))
            pick = bb.emit(pick) if isinstance(binding.var, relax.DataflowVar) else bb.emit_output(pick)
            self.set_var_remap(binding.var, pick)

    def _emit_lookup(self, plan: _Plan, x, as_output: bool):
        if plan.method == "butterfly":
            return self._emit_butterfly(plan, x, as_output)
        if plan.method == "lowrank":
            return self._emit_lowrank(plan, x, as_output)
        if plan.record.get("kernel", "gather").startswith("shuffle"):
            return self._emit_shuffle(plan, x, as_output)
        if plan.record.get("kernel") == "cam":
            return self._emit_cam(plan, x, as_output)
        layer, q = plan.layer, plan.pq_layer
        bb, tag = self.builder_, _ident(layer.name)
        c, k, v, m = q.num_codebooks, q.k, q.v, q.m
        x2 = self._rows(plan, x, c * v)
        rows = layer.rows
        cents, offsets = q.encoder_operands()
        # the encoder emits table row offsets ((c*K + code) * M), so the accumulate only loads and adds
        enc = self._kernel(("encode", rows, c, k, v, q.distance, m), f"lut_encode_{tag}",
                           lambda: kernels.encode(rows, c, k, v, q.distance, row_stride=m))
        enc_args = [x2, relax.const(np.ascontiguousarray(cents.transpose(0, 2, 1))), relax.const(offsets)]
        codes = bb.emit(relax.call_tir(enc, enc_args, relax.TensorType((rows, c), "int32")))
        acc_gv = self._kernel(("acc", rows, c, k, m), f"lut_accumulate_{tag}",
                              lambda: kernels.accumulate(rows, c, k, m, row_offsets=True))
        acc = bb.emit(relax.call_tir(acc_gv, [codes, relax.const(q.tables.reshape(-1))],
                                     relax.TensorType((rows, m), "int32")))
        # epilogue: dequantise (+bias) in one elementwise kernel (one fused multiply-add per output, as
        # the shuffle kernel and ``pq.dequantize``), then back to the layer's output layout
        y = bb.emit_te(_dequantize, acc, relax.const(q.scale.astype(np.float32)),
                       relax.const((q.bias if q.bias is not None else np.zeros(m)).astype(np.float32)),
                       primfunc_name_hint=f"lut_dequantize_{tag}")
        return self._epilogue(layer, y, [], None, as_output)

    def _emit_cam(self, plan: _Plan, x, as_output: bool):
        """``--target cam``: the layer's nearest-centroid search and table readout become calls of the CAM
        simulator (``tvm_lut.cam``, resolved by name at run time); im2col and the dequantising epilogue stay
        on the host, as in the gather path."""
        from tvm_lut import cam

        layer, q, bb = plan.layer, plan.pq_layer, self.builder_
        c, m, rows = q.num_codebooks, q.m, layer.rows
        x2 = self._rows(plan, x, c * q.v)
        cents, offsets = q.encoder_operands()
        name = tvm.ir.StringImm(layer.name)
        addr = bb.emit(relax.call_dps_packed(
            cam.SEARCH_FUNC, [x2, relax.const(np.ascontiguousarray(cents.transpose(0, 2, 1))), relax.const(offsets),
                              tvm.ir.StringImm(q.distance), relax.prim_value(m), name],
            relax.TensorType((rows, c), "int32")))
        acc = bb.emit(relax.call_dps_packed(cam.READOUT_FUNC, [addr, relax.const(q.tables.reshape(-1)),
                                                               relax.prim_value(m), name],
                                            relax.TensorType((rows, m), "int32")))
        y = bb.emit_te(_dequantize, acc, relax.const(q.scale.astype(np.float32)),
                       relax.const((q.bias if q.bias is not None else np.zeros(m)).astype(np.float32)),
                       primfunc_name_hint=f"lut_dequantize_{_ident(layer.name)}")
        return self._epilogue(layer, y, [], None, as_output)

    def _emit_shuffle(self, plan: _Plan, x, as_output: bool):
        """Packed-code encoder (fused with im2col for a conv) -> shuffle lookup with the scale and bias
        in its epilogue, writing (M, rows) for a conv (NCHW at batch 1; at batch B > 1 (B, M, OH*OW) where no
        stored vector spans two images) and (rows, M) for a dense layer.

        L1 (PECAN-D) convs keep the separate im2col kernel: the fused patch addressing divides by
        constants, which LLVM compiles to integer multiplies, and the L1 encoder must have none."""
        layer, q, bb = plan.layer, plan.pq_layer, self.builder_
        tag, rows = _ident(layer.name), layer.rows
        isa = next(i for i in shuffle.ISAS if plan.record["kernel"] == f"shuffle-{i.name}")
        c, k, v, m = q.num_codebooks, q.k, q.v, q.m
        rows_major = layer.kind != "conv2d"  # a dense layer's (rows, M); a conv's (M, rows) is NCHW already
        lanes = shuffle.block_rows(isa, rows, m if rows_major else None)
        # the grouped kernel transposes 4 outputs at a time in registers; the nibble kernel stores from a tile
        pairs, mb = shuffle.padded_pairs(c), shuffle.tile_for(isa, rows_major)
        cents, offsets = q.encoder_operands()
        if layer.kind == "conv2d" and q.distance != "l1":
            cv = layer.conv
            conv = kernels.ConvInput(tuple(layer.input_shape), tuple(cv["kernel_hw"]), tuple(cv["strides"]),
                                     tuple(cv["padding"]), tuple(cv["dilation"]))
            src = x
        else:
            conv, src = None, self._rows(plan, x, c * v)
        cents = np.ascontiguousarray(cents.transpose(0, 2, 1))
        if conv is None and isa.name != "neon":  # a dense row-major input: 16 (AVX2: 8) codebooks of a row per vector
            # (the row-lanes encoder gathers 16 rows per subvector element; on a Zen 3 (AVX2) this one encoded
            # D=256 1.4-2.4x faster. AArch64 keeps the row-lanes encoder, the one checked under emulation there)
            # with 16 vector registers (AVX2): 8 codebooks per step (one ymm per score), float argmin indices
            narrow = isa.registers < 32
            cl = kernels.CODEBOOK_LANES_16_REGISTERS if narrow else kernels.CODEBOOK_LANES
            enc = self._kernel(("encode-codebook-lanes", rows, c, k, v, q.distance, lanes, isa.grouped, pairs, cl),
                               f"lut_encode_{tag}",
                               lambda: kernels.encode_codebook_lanes(rows, c, k, v, q.distance, lanes,
                                                                     grouped=isa.grouped, pairs=pairs,
                                                                     codebook_lanes=cl, float_indices=narrow))
            cents, offsets = kernels.codebook_lane_operands(cents, offsets, lanes=cl)
        else:
            # with 16 vector registers (AVX2) the 16x16 score buffer spills: scores fused into the argmin
            fused = isa.registers < 32
            enc = self._kernel(("encode-packed", rows, c, k, v, q.distance, lanes, isa.grouped, conv, fused),
                               f"lut_encode_{tag}",
                               lambda: kernels.encode(rows, c, k, v, q.distance, pack_lanes=lanes, pairs=pairs,
                                                      conv=conv, grouped=isa.grouped, fused_scores=fused))
        packed = bb.emit(relax.call_tir(enc, [src, relax.const(cents), relax.const(offsets)],
                                        relax.TensorType(shuffle.packed_shape(rows, c, lanes, isa.grouped), "uint8")))
        # a conv at batch B > 1: the lookup writes (B, M, OH*OW), i.e. NCHW, with no transpose after it
        # (no vector the lookup stores may span two images: 16 rows in the grouped kernel, half a row block in
        # the nibble kernel; else it writes (M, B*OH*OW) and a transpose follows)
        images = layer.output_shape[0] if layer.kind == "conv2d" else 1
        if not (images > 1 and (rows // images) % (16 if isa.grouped else lanes // 2) == 0):
            images = 1
        look, look_func = self._kernel_func(("shuffle", rows, c, m, lanes, isa.grouped, rows_major, images),
                                            f"lut_lookup_{tag}",
                                            lambda: shuffle.lookup(rows, c, m, lanes, mb, isa.intrinsic,
                                                                   rows_major=rows_major, images=images))
        mb = shuffle.tile_of(look_func)  # a tuned kernel may use another register tile: tables follow it
        bias = q.bias if q.bias is not None else np.zeros(m, np.float32)
        y = bb.emit(relax.call_tir(look, [packed, relax.const(shuffle.pack_tables(q.tables, mb, isa.grouped)),
                                         relax.const(q.scale.astype(np.float32)),
                                         relax.const(bias.astype(np.float32))],
                                   relax.TensorType(shuffle.output_shape(rows, m, rows_major, images), "float32")))
        steps = []
        if layer.kind == "conv2d":
            n_, _, oh, ow = layer.output_shape
            if n_ == 1 or images > 1:
                steps.append(lambda y: relax.op.reshape(y, (n_, m, oh, ow)))
            else:
                steps.append(lambda y: relax.op.reshape(y, (m, n_, oh, ow)))
                steps.append(lambda y: relax.op.permute_dims(y, [1, 0, 2, 3]))
        elif len(layer.output_shape) != 2:
            steps.append(lambda y: relax.op.reshape(y, layer.output_shape))
        return self._epilogue(layer, y, steps, None, as_output, rows_layout=False)

    def _rows(self, plan: _Plan, x, width: int):
        """The layer's (rows, width) input matrix: im2col for a conv, a reshape for dense; zero columns
        beyond D (subspace or butterfly padding)."""
        layer, bb = plan.layer, self.builder_
        rows = layer.rows
        if layer.kind == "conv2d":
            cv = layer.conv
            n_, ch, h, w = layer.input_shape
            gv = self._kernel(("im2col", tuple(layer.input_shape), tuple(cv["kernel_hw"]), tuple(cv["strides"]),
                               tuple(cv["padding"]), tuple(cv["dilation"]), width), f"lut_im2col_{_ident(layer.name)}",
                              lambda: kernels.im2col(n_, ch, h, w, cv["kernel_hw"], cv["strides"], cv["padding"],
                                                     cv["dilation"], width))
            return bb.emit(relax.call_tir(gv, [x], relax.TensorType((rows, width), "float32")))
        x2 = x if len(layer.input_shape) == 2 else bb.emit(relax.op.reshape(x, (rows, layer.d)))
        if width != layer.d:
            x2 = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, width - layer.d]))
        return x2

    def _epilogue(self, layer: graph.Layer, y, steps: list, bias, as_output: bool, rows_layout: bool = True):
        """``steps`` then ``+ bias``, then (``rows_layout``: y is (rows, M)) back to the layer's layout."""
        steps = list(steps)
        m = layer.m
        if bias is not None:
            bshape = (1, m, 1, 1) if (layer.kind == "conv2d" and not rows_layout) else (m,)
            steps.append(lambda y: relax.op.add(y, relax.const(bias.reshape(bshape))))
        if rows_layout and layer.kind == "conv2d":
            n_, _, oh, ow = layer.output_shape
            steps.append(lambda y: relax.op.reshape(y, (n_, oh, ow, m)))
            steps.append(lambda y: relax.op.permute_dims(y, [0, 3, 1, 2]))
        elif rows_layout and len(layer.output_shape) != 2:
            steps.append(lambda y: relax.op.reshape(y, layer.output_shape))
        if not steps:
            return self.builder_.emit_output(y) if as_output else y
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            y = self.builder_.emit_output(step(y)) if (last and as_output) else self.builder_.emit(step(y))
        return y

    def _emit_butterfly(self, plan: _Plan, x, as_output: bool):
        """im2col/reshape -> one grouped-matmul kernel per factor -> slice padded outputs -> bias."""
        layer, chain, bb = plan.layer, plan.chain, self.builder_
        rows, tag = layer.rows, _ident(layer.name)
        y = self._rows(plan, x, chain.in_pad)
        for i, (f, vals) in enumerate(zip(chain.factors, plan.factors)):
            gv = self._kernel(("butterfly", rows, f.blocks, f.r, f.s, f.t), f"debut_factor_{tag}_{i}",
                              lambda f=f: kernels.butterfly_factor(rows, f.blocks, f.r, f.s, f.t))
            w = np.ascontiguousarray(np.asarray(vals, np.float32).transpose(0, 2, 1, 3))  # (nb, s, r, t)
            y = bb.emit(relax.call_tir(gv, [y, relax.const(w)], relax.TensorType((rows, f.p), "float32")))
        steps = []
        if chain.out_pad != layer.m:
            steps.append(lambda y: relax.op.strided_slice(y, axes=[1], begin=[0], end=[layer.m]))
        return self._epilogue(layer, y, steps, layer.bias, as_output)

    def _emit_lowrank(self, plan: _Plan, x, as_output: bool):
        """Two matmuls (dense); KxK + 1x1 or 1x1 + KxK + 1x1 convs with the layer's attributes (conv)."""
        layer, f, bb = plan.layer, plan.lowrank, self.builder_
        if layer.kind == "dense":
            x2 = x if len(layer.input_shape) == 2 else bb.emit(relax.op.reshape(x, (layer.rows, layer.d)))
            h = bb.emit(relax.op.matmul(x2, relax.const(np.ascontiguousarray(f.first.reshape(f.first.shape[0], -1).T))))
            return self._epilogue(layer, h, [lambda y: relax.op.matmul(y, relax.const(np.ascontiguousarray(f.last.T)))],
                                  layer.bias, as_output)
        cv = layer.conv

        def conv(inp, w, spatial: bool):
            if spatial:
                return relax.op.nn.conv2d(inp, relax.const(np.ascontiguousarray(w, np.float32)), strides=cv["strides"],
                                          padding=cv["padding"], dilation=cv["dilation"])
            return relax.op.nn.conv2d(inp, relax.const(np.ascontiguousarray(w, np.float32)))

        last = f.last[:, :, None, None]
        if f.form == "pair":
            h = bb.emit(conv(x, f.first, True))
        else:
            h = bb.emit(conv(bb.emit(conv(x, f.first[:, :, None, None], False)), f.core, True))
        return self._epilogue(layer, h, [lambda y: conv(y, last, False)], layer.bias, as_output, rows_layout=False)


def _dequantize(acc, scale, bias):
    """TE: float(acc[n, m]) * scale[m] + bias[m] (reference ``pq.dequantize``)."""
    from tvm import te

    return te.compute(acc.shape, lambda i, j: acc[i, j].astype("float32") * scale[j] + bias[j], name="dequantize")


SWITCH_PARAM = "tvm_lut.switch"


def switchable(mod: tvm.IRModule, plans: list[_Plan]) -> tvm.IRModule:
    """``mod`` with every plan's lookup *and* exact path, and a last weight parameter ``tvm_lut.switch``
    (bool, one per plan, in ``plans`` order; all False: the exact model) that picks each layer's output.

    Set at run time, the switch evaluates any subset of converted layers with one compile: what the
    priority mask needs for each layer alone and each prefix of its ranking. A selected layer's output is
    the lookup kernels' output bit for bit (``where`` selects, it does not blend)."""
    func = mod["main"]
    switch = relax.Var(SWITCH_PARAM, relax.TensorType((len(plans),), "bool"))
    values = list(func.attrs["params"]) if func.attrs is not None and "params" in func.attrs else None
    func = relax.Function(list(func.params) + [switch], func.body, func.ret_ty, func.is_pure, func.attrs)
    if values is not None:
        func = func.with_attr("params", values + [tvm.runtime.tensor(np.zeros(len(plans), bool))])
    base = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    base["main"] = func
    return _rewrite(base, plans, True, switch=switch)


def _rewrite(mod: tvm.IRModule, plans: list[_Plan], schedule: bool, database: str | None = None, target=None,
             tuned: list | None = None, calls: dict | None = None, switch: relax.Var | None = None) -> tvm.IRModule:
    func = mod["main"]
    m = _LookupRewriter(mod, plans, schedule, database, target, switch)
    new_main = m.visit_expr(func)
    m.builder_.update_func(m.builder_.get().get_global_var("main"), new_main)
    if tuned is not None:
        tuned.extend(m.tuned)
    if calls is not None:
        calls.update(m.calls)
    out = m.builder_.get()
    out = relax.transform.DeadCodeElimination(["main"])(out)
    return _drop_unused_params(out)


def _drop_unused_params(mod: tvm.IRModule) -> tvm.IRModule:
    """Remove weight parameters no longer used (the converted layers' weights) and their values."""
    func = mod["main"]
    n_in = graph.num_inputs(func)
    used = {v for v in relax.analysis.free_vars(func.body)}
    values = list(func.attrs["params"]) if func.attrs is not None and "params" in func.attrs else None
    keep, keep_vals = list(func.params[:n_in]), []
    for i, p in enumerate(func.params[n_in:]):
        if any(p.same_as(u) for u in used):
            keep.append(p)
            if values is not None:
                keep_vals.append(values[i])
    if len(keep) == len(func.params):
        return mod
    new = relax.Function(keep, func.body, func.ret_ty, func.is_pure, func.attrs)
    if values is not None:
        new = new.with_attr("params", keep_vals)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = new
    return out
