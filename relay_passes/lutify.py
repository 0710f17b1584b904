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

The pass is thin: ``planning.Planner`` decides and fits each layer, ``rewrite.rewrite`` replaces them;
with ``budget=`` a ``PriorityMask`` chooses the layers first.
"""

from __future__ import annotations

import dataclasses
import json

import tvm

from tvm_lut import pq
from tvm_lut.errors import OptionError
from tvm_lut.targets import host_for, resolve_target

from .planning import Planner
from .priority_mask import PriorityMask
from .rewrite import LAYERS_ATTR, MASK_ATTR, KernelCall, Plan, rewrite

__all__ = ["LAYERS_ATTR", "MASK_ATTR", "LUTify"]


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
        if budget is not None and method != "pq":
            raise OptionError(f"budget={budget!r} chooses which layers become PQ lookups; it needs method='pq' "
                              f"(got method={method!r})")
        self.options = dict(k=k, v=v, distance=distance, layers=layers, all_layers=all_layers, codebooks=codebooks,
                            seed=seed, max_calibration_rows=max_calibration_rows, target=target, schedule=schedule,
                            sequential=sequential, fitted=fitted, method=method, factors=factors, rank=rank,
                            form=form, butterfly_budget=butterfly_budget, lookup=lookup, progress=progress)
        Planner(calibration, **self.options)  # validates the options now, not at the first module
        self.calibration = calibration
        self.target = target
        self.schedule = schedule
        self.budget = budget
        self.labels = labels
        self.database = database
        # results of the last run (also in the module attribute ``tvm.lut.layers``)
        self.priority: dict = {}  # the PriorityMask result this pass obeyed (empty without one)
        self.plans: list[Plan] = []  # every layer's fitted plan, in program order
        self.layers: list[dict] = []  # per-layer decision records
        self.pq_layers: dict[str, pq.PQLayer] = {}  # fitted codebooks/tables by layer name
        self.tuned: list[str] = []  # kernels taken from the tuning database
        # layer name -> the kernels its rewrite runs in the module of the last run (None: other ops too);
        # ``profile.measure_layers`` times them in the model's own build instead of compiling them again
        self.kernel_calls: dict[str, list[KernelCall] | None] = {}
        self._source: tvm.IRModule | None = None  # the module of the last run, for retarget

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        fitted = dict(self.options["fitted"] or {})
        if self.budget is not None:
            o = self.options
            pm = PriorityMask(self.calibration, self.budget, labels=self.labels, seed=o["seed"],
                              target=host_for(self.target), progress=o["progress"], k=o["k"], v=o["v"],
                              distance=o["distance"], layers=o["layers"], codebooks=o["codebooks"],
                              max_calibration_rows=o["max_calibration_rows"])
            mod = pm(mod)
            fitted.update(pm.pq_layers)
        self.priority = json.loads(str(mod.attrs[MASK_ATTR])) if mod.attrs is not None and MASK_ATTR in mod.attrs \
            else {}
        planner = Planner(self.calibration, **{**self.options, "fitted": fitted}, priority=self.priority)
        plans = planner.plan(mod)
        self.plans = plans
        self.layers = [p.record for p in plans]
        self.pq_layers = {p.layer.name: p.pq_layer for p in plans if p.method == "pq"}
        self._source = mod
        self.kernel_calls, self.tuned = {}, []
        todo = [p for p in plans if p.method != "exact"]
        out = (rewrite(mod, todo, self.schedule, self.database, self.target, self.tuned, self.kernel_calls)
               if todo else mod)
        return out.with_attr(LAYERS_ATTR, json.dumps(self.layers))

    def retarget(self, target) -> tvm.IRModule:
        """The model this pass last produced (same codebooks, tables and codes), with its kernels chosen and
        hand-scheduled for another target: a cross-compiled (``arm``) build's accuracy is measured on the
        host build of it. Layer records are left as they were for the pass's own target."""
        if self._source is None:
            raise RuntimeError("LUTify.retarget: run the pass on a module first")
        tgt = resolve_target(target)
        planner = Planner(None, **{**self.options, "target": tgt})
        todo = [p if p.method != "pq" else dataclasses.replace(p, record={**p.record,
                                                                          "kernel": planner.lookup_kernel(p)})
                for p in self.plans if p.method != "exact"]
        out = rewrite(self._source, todo, True, None, tgt) if todo else self._source
        return out.with_attr(LAYERS_ATTR, json.dumps(self.layers))
