"""LUTify: rewrite conv2d/dense layers of a Relax module into product-quantization table lookups,
butterfly factor chains or low-rank pairs (``method=``, per layer through ``layers=``).

Each convertible layer (see ``tvm_lut.frontend.graph``) becomes, with ``method="pq"`` (the default)::

    im2col (conv only) -> encode (nearest centroid per subspace) -> accumulate (int8 table rows,
    int32 sums) -> astype float32 * scale (+ bias) -> reshape/permute back to the layer's layout

with codebooks and tables as module constants, and its bias/batch-norm epilogue folded in. Codebooks
are learned by k-means on the layer's real inputs, collected by running the model on calibration data
(``tvm_lut.runtime.calibrate``); learned codebooks can be passed in instead (``codebooks=``).

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

Order: apply on the imported module, before ``tvm_lut.runtime.build`` (which legalizes the remaining ops).
The per-layer decisions travel in the module attribute ``"tvm_lut.layers"`` (JSON); ``LUTify.run`` returns
them with everything else the run produced (``LUTResult``). The pass object holds only its options.

The pass is thin: ``planning.Planner`` decides and fits each layer, ``rewrite.rewrite`` replaces them;
with ``budget=`` a ``PriorityMask`` chooses the layers first.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import tvm

from tvm_lut import targets

from .planning import LUTifyOptions, Planner
from .priority_mask import PriorityMask
from .rewrite import LAYERS_ATTR, MASK_ATTR, KernelCall, rewrite

__all__ = ["LAYERS_ATTR", "MASK_ATTR", "LUTify", "LUTResult", "LUTifyOptions"]


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
        (``tvm_lut.train.lutnn.learned_codebooks``); those layers skip k-means and table refinement (tables are
        P.W of the model's weights, as in training) and are converted even when narrow.
    target : what the kernels are chosen and scheduled for: ``"x86"`` (default, this host), ``"x86:CPU"``,
        ``"arm"`` (AArch64: NEON ``tbl`` shuffle lookups) or ``"cam"`` (each PQ layer's encode and table
        readout call the CAM simulator, ``tvm_lut.targets.cam_simulator``), a TVM target, or a
        ``tvm_lut.targets.Target``; see ``tvm_lut.targets``. Calibration always runs on this host.
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
    fitted : already fitted ``pq.PQLayer`` by layer name (e.g. ``MaskResult.fitted`` or the second value of ``PriorityMask.sweep``), used as they are.
    lookup : the table-readout kernel of PQ layers: ``"auto"`` (default: byte shuffles when the target
        has them, K=16, the distance is not L1 (kept multiplier-free on the gather path) and the layer has at
        least half a shuffle's worth of rows, or 16 for a convolution, else gathers),
        ``"shuffle"`` (``tir_schedules.shuffle``: codes packed two per byte, ``pshufb``; convolutions get
        the encoder fused with im2col) or ``"gather"`` (``kernels.accumulate``, any K). Each layer's record
        says which it got (``kernel``).
    encoder : the PQ encoder's arithmetic: ``"int8"`` (default; ``tvm_lut.math.int8_scores``: the layer
        input quantized to uint8 with a scale from its calibration rows, int8 centroids, integer scores by
        VNNI ``vpdpbusd``, ``tir_schedules.encode_int8``; 3.6-5.3x faster than the fp32 encoder, 99.8-99.9 %
        of codes the same on ReLU inputs, ResNet-20/CIFAR-10 top-1 0.08-0.37 points below fp32 scores)
        or ``"fp32"`` (float scores everywhere: the exact nearest centroid). int8 applies to L2
        convolutions whose subspace is a channel's patch (V=9 at 3x3) or one kernel row of it (V=3) on targets with AVX-512 VBMI + VNNI
        (``encode_int8.eligible`` lists the map sizes); every other layer keeps the fp32 encoder, its record
        saying why (``encoder``, ``encoder_note``).
    database : a MetaSchedule database directory (``tvm-lut tune --db``): lookup kernels tuned there are
        used instead of their hand schedules (``tuned`` lists them); others keep the hand schedule.
    budget : ``"max-drop=2.0"``, ``"max-disagree=1"`` or ``"min-removed=0.6"``: run ``PriorityMask`` first to
        choose which layers stay exact (``labels``, or a ``labels`` entry in ``calibration``, for max-drop;
        max-disagree measures top-1 agreement with the exact model and needs none). Without
        it, a mask left on the module by an earlier ``PriorityMask`` pass is obeyed.
    mask_rank : how the mask ranks layers: ``"multiplies"`` (default) removed, or ``"latency"``: the time
        each layer's lookup saves, measured on the host (``PriorityMask(rank=)``).
    exact : the arithmetic of the conv layers that stay exact (by the mask, by request, or because lookup
        would not pay): ``"fp32"`` (default) or ``"int8"``, the ``int8`` method (ONNX Runtime's static
        int8 quantization of the layer, on the VNNI kernel ``tir_schedules.conv_int8``) where it applies;
        a layer it does not apply to stays fp32 and its record says why. Any layer can also be named
        ``{"method": "int8"}`` in ``layers``.
    options : all of the above as one ``LUTifyOptions`` (validated when made); keyword arguments given
        with it replace its fields.

    A call returns the rewritten module (its records in the ``tvm_lut.layers`` attribute); ``run(mod)``
    returns a ``LUTResult``: the module, every layer's plan and record, the kernels each runs, the mask
    obeyed, the tuned kernels, and ``retarget``. The pass keeps no state between calls.
    """

    def __init__(self, calibration=None, *, options: LUTifyOptions | None = None, **kwargs):
        # the card's spelling, LUTify(calibration, k=..., v=..., ...), builds the one validated options object
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(LUTifyOptions)})
        if unknown:
            raise TypeError(f"LUTify() got unexpected keyword argument(s) {unknown}; its options are "
                            f"{', '.join(f.name for f in dataclasses.fields(LUTifyOptions))}")
        self.options = options if options is not None and not kwargs else (
            dataclasses.replace(options, **kwargs) if options is not None else LUTifyOptions(**kwargs))
        self.calibration = calibration

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return self.run(mod).module

    def run(self, mod: tvm.IRModule) -> LUTResult:
        """The pass, returning everything it produced: the module and, per layer, the fitted plan, the
        decision record, the kernels its rewrite runs; the priority mask it obeyed; the tuned kernels."""
        o = self.options
        fitted = dict(o.fitted)
        if o.budget is not None:
            local = targets.resolve(o.target).local().tvm  # the mask measures accuracy here
            pm = PriorityMask(self.calibration, o.budget, labels=o.labels, seed=o.seed, target=local,
                              progress=o.progress, rank=o.mask_rank, exact=o.exact, k=o.k, v=o.v,
                              distance=o.distance, layers=o.layers, codebooks=o.codebooks,
                              max_calibration_rows=o.max_calibration_rows)
            masked = pm.run(mod)
            mod = masked.module
            fitted.update(masked.pq_layers)
        priority = json.loads(str(mod.attrs[MASK_ATTR])) if mod.attrs is not None and MASK_ATTR in mod.attrs else {}
        plans = Planner(self.calibration, dataclasses.replace(o, fitted=fitted), priority=priority).plan(mod)
        calls: dict[str, list[KernelCall] | None] = {}
        tuned: list[str] = []
        todo = [p for p in plans if p.method != "exact"]
        out = rewrite(mod, todo, o.schedule, o.database, o.target, tuned, calls) if todo else mod
        records = [p.record for p in plans]
        return LUTResult(out.with_attr(LAYERS_ATTR, json.dumps(records)), mod, plans, priority, calls, tuned, o)

    @property
    def target(self):
        return self.options.target

    @property
    def database(self):
        return self.options.database


@dataclass(frozen=True)
class LUTResult:
    """What one LUTify run produced."""

    module: tvm.IRModule  # the rewritten module (records also in its ``tvm_lut.layers`` attribute)
    source: tvm.IRModule  # the module it rewrote (after the priority mask's attribute), for retarget
    plans: list  # every layer's fitted ``Plan``, in program order
    priority: dict  # the PriorityMask result obeyed (empty without one)
    kernel_calls: dict  # layer name -> the kernels its rewrite runs (None: other ops too); profile times them
    tuned: list  # kernels taken from the tuning database
    options: LUTifyOptions  # the options of the run

    @property
    def layers(self) -> list[dict]:
        """Per-layer decision records (method or reason, op counts, bytes, kernel)."""
        return [p.record for p in self.plans]

    @property
    def pq_layers(self) -> dict:
        """Fitted codebooks/tables by layer name."""
        return {p.layer.name: p.pq_layer for p in self.plans if p.method == "pq"}

    def retarget(self, target) -> tvm.IRModule:
        """The model this run produced (same codebooks, tables and codes), with its kernels chosen and
        hand-scheduled for another target: a cross-compiled (``arm``) build's accuracy is measured on the
        host build of it. Layer records are left as they were for the run's own target."""
        tgt = targets.resolve(target)
        planner = Planner(None, dataclasses.replace(self.options, target=tgt))
        todo = [p if p.method != "pq" else dataclasses.replace(p, record={**p.record,
                                                                          "kernel": planner.lookup_kernel(p)})
                for p in self.plans if p.method != "exact"]
        out = rewrite(self.source, todo, True, None, tgt) if todo else self.source
        return out.with_attr(LAYERS_ATTR, json.dumps(self.layers))
