"""``pq``: product-quantization table lookup (LUT-NN, TabConv, PECAN), the default rewrite method.

Fit: codebooks by k-means on the layer's calibration inputs (or learned ones, ``codebooks=``, or a fit
already made, ``fitted=``), int8 tables ``P . W``; then the table-readout kernel the target gets
(``tvm_lut.targets.Target.lookup_kernel``). Emit::

    im2col (conv) -> encode (nearest centroid per subspace) -> accumulate (int8 table rows, int32 sums)
    -> dequantise (+ bias) -> the layer's layout

with three readouts: gathers (any K), byte shuffles (K=16, ``tir_schedules.shuffle``; a conv's encoder
reads its input in place) or the CAM simulator (``--target cam``).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tvm
from tvm import relax

from tir_schedules import encode_int8, kernels, shuffle
from tvm_lut import targets
from tvm_lut.errors import CalibrationError, OptionError
from tvm_lut.frontend import graph
from tvm_lut.math import cost, distances, pq

from ..registry import RewriteMethod, register
from ..rewrite import LookupEmitter, Plan, conv_input, ident

log = logging.getLogger("tvm_lut")


class PQMethod(RewriteMethod):
    name = "pq"
    calibrated = True
    description = "product-quantization table lookup"

    def needs_rows(self, plan: Plan, planner) -> bool:
        name = plan.layer.name
        if name in planner.fitted:
            return False
        # learned centroids need no rows, unless the int8 encoder must quantize the layer's input
        return name not in planner.codebooks or _int8_refusal(plan, planner) is None

    def fit(self, plan: Plan, planner, rows=None, targets=None) -> None:
        r, name = plan.record, plan.layer.name
        refusal = _int8_refusal(plan, planner)
        int8 = refusal is None
        if name in planner.fitted:  # fitted by a PriorityMask run (LUTify(budget=...)) or given
            plan.pq_layer = planner.fitted[name]
            if int8 and plan.pq_layer.int8 is None:
                int8, refusal = False, "the given fitted layer has no int8 operands"
        elif name in planner.codebooks:
            cents, _ = codebook_entry(name, planner.codebooks[name], r["distance"])
            plan.pq_layer = from_codebooks(plan.layer, cents, r["distance"])
            if int8:
                plan.pq_layer = plan.pq_layer.with_int8_encoder(rows)
        else:
            if len(rows) < r["k"]:
                raise CalibrationError(f"layer {name!r}: K={r['k']} centroids need at least {r['k']} "
                                       f"calibration vectors, got {len(rows)}")
            plan.pq_layer = pq.fit_layer(rows, plan.layer.weight, plan.layer.bias, k=r["k"], v=r["v"],
                                         distance=r["distance"], seed=planner.seed, targets=targets,
                                         encoder="int8" if int8 else "fp32")
        if not int8 and plan.pq_layer.int8 is not None:  # a fitted int8 layer where int8 does not apply
            plan.pq_layer = dataclasses.replace(plan.pq_layer, int8=None)
        r["encoder"] = "int8" if int8 else "fp32"
        if refusal and planner.options.encoder == "int8":
            r["encoder_note"] = refusal
            log.info("layer %s keeps the fp32 encoder: %s", name, refusal)
        r["kernel"] = planner.lookup_kernel(plan)

    def account(self, plan: Plan) -> None:
        r, rows = plan.record, plan.layer.rows_per_sample
        r["lut_ops"] = cost.lut_ops(rows, r["c"], r["k"], r["v"], r["m"], r["distance"], r["has_bias"])
        r["table_bytes"] = cost.table_bytes(r["c"], r["k"], r["m"], r["has_bias"])
        r["codebook_bytes"] = cost.codebook_bytes(r["c"], r["k"], r["v"], r["distance"])

    def emit(self, emitter: LookupEmitter, plan: Plan, x, as_output: bool):
        kernel = plan.record.get("kernel", "gather")
        if kernel.startswith("shuffle"):
            return _emit_shuffle(emitter, plan, x, as_output)
        if kernel == "cam":
            return _emit_cam(emitter, plan, x, as_output)
        return _emit_gather(emitter, plan, x, as_output)

    def columns(self, record: dict) -> str:
        enc = " int8 scores" if record.get("encoder") == "int8" else ""
        return f"K={record['k']} V={record['v']} {record['distance']}{enc}"


register(PQMethod())


def _int8_refusal(plan: Plan, planner) -> str | None:
    """None when the layer gets the int8 encoder (``encoder="int8"`` asked, and it applies), else why not."""
    if planner.options.encoder != "int8":
        return "encoder='fp32'"
    r, layer = plan.record, plan.layer
    if not distances.get(r["distance"]).integer_scores:
        return f"distance {r['distance']!r} (the int8 encoder computes L2 scores)"
    if layer.kind != "conv2d":
        return "not a convolution (the int8 encoder reads a convolution's input in place)"
    tgt = targets.resolve(planner.target)
    kernel = tgt.lookup_kernel(planner.options.lookup, r["k"], layer.rows, layer.kind, r["distance"], layer.name)
    isa = next((i for i in shuffle.ISAS if kernel == f"shuffle-{i.name}"), None)
    if isa is None or not isa.grouped:
        return f"the {kernel} lookup (the int8 encoder writes the AVX-512 VBMI + VNNI grouped layout)"
    return encode_int8.eligible(conv_input(layer), pq.num_subspaces(layer.d, r["v"]), r["k"], r["v"])


def codebook_entry(name: str, entry, default_distance: str) -> tuple[np.ndarray, str]:
    """A ``codebooks=`` value: a (C, K, V) array, or ``{"centroids": array, "distance": str}`` as returned
    by ``tvm_lut.train.lutnn.learned_codebooks`` -> (centroids, distance)."""
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


def from_codebooks(layer: graph.Layer, centroids: np.ndarray, distance: str) -> pq.PQLayer:
    """A PQ layer from given centroids: tables ``P . W`` of the model's weight (no refinement)."""
    c, _k, v = centroids.shape
    if c * v < layer.d or (c - 1) * v >= layer.d:
        raise OptionError(f"codebooks for {layer.name!r} have C={c}, V={v}, which does not cover D={layer.d}")
    tables_q, scale = pq.quantize_tables(pq.build_tables(centroids, pq.pad_columns(layer.weight.T, c * v).T))
    return pq.PQLayer(centroids, tables_q, scale, layer.bias, distance, layer.d)


def _emit_gather(em: LookupEmitter, plan: Plan, x, as_output: bool):
    """Encoder kernel (codes as table row offsets) -> gather-accumulate kernel -> dequantise (+bias)."""
    layer, q = plan.layer, plan.pq_layer
    bb, tag = em.builder_, ident(layer.name)
    c, k, v, m = q.num_codebooks, q.k, q.v, q.m
    x2 = em.rows(plan, x, c * v)
    rows = layer.rows
    cents, offsets = q.encoder_operands()
    # the encoder emits table row offsets ((c*K + code) * M), so the accumulate only loads and adds
    enc = em.kernel(("encode", rows, c, k, v, q.distance, m), f"lut_encode_{tag}",
                       lambda: kernels.encode(rows, c, k, v, q.distance, row_stride=m))
    enc_args = [x2, relax.const(np.ascontiguousarray(cents.transpose(0, 2, 1))), relax.const(offsets)]
    codes = bb.emit(relax.call_tir(enc, enc_args, relax.TensorType((rows, c), "int32")))
    acc_gv = em.kernel(("acc", rows, c, k, m), f"lut_accumulate_{tag}",
                          lambda: kernels.accumulate(rows, c, k, m, row_offsets=True))
    acc = bb.emit(relax.call_tir(acc_gv, [codes, relax.const(q.tables.reshape(-1))],
                                 relax.TensorType((rows, m), "int32")))
    # epilogue: dequantise (+bias) in one elementwise kernel (one fused multiply-add per output, as
    # the shuffle kernel and ``pq.dequantize``), then back to the layer's output layout
    y = bb.emit_te(_dequantize, acc, relax.const(q.scale.astype(np.float32)),
                   relax.const((q.bias if q.bias is not None else np.zeros(m)).astype(np.float32)),
                   primfunc_name_hint=f"lut_dequantize_{tag}")
    return em.epilogue(layer, y, [], None, as_output)

def _emit_cam(em: LookupEmitter, plan: Plan, x, as_output: bool):
    """``--target cam``: the layer's nearest-centroid search and table readout become calls of the CAM
    simulator (``tvm_lut.targets.cam_simulator``, resolved by name at run time); im2col and the dequantising epilogue stay
    on the host, as in the gather path."""
    from tvm_lut.targets import cam_simulator as cam

    layer, q, bb = plan.layer, plan.pq_layer, em.builder_
    c, m, rows = q.num_codebooks, q.m, layer.rows
    x2 = em.rows(plan, x, c * q.v)
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
                   primfunc_name_hint=f"lut_dequantize_{ident(layer.name)}")
    return em.epilogue(layer, y, [], None, as_output)


def _emit_shuffle(em: LookupEmitter, plan: Plan, x, as_output: bool):
    """Packed-code encoder (fused with im2col for a conv) -> shuffle lookup with the scale and bias
    in its epilogue, writing (M, rows) for a conv (NCHW at batch 1; at batch B > 1 (B, M, OH*OW) where no
    stored vector spans two images) and (rows, M) for a dense layer.

    L1 (PECAN-D) convs keep the separate im2col kernel: the fused patch addressing divides by
    constants, which LLVM compiles to integer multiplies, and the L1 encoder must have none."""
    layer, q, bb = plan.layer, plan.pq_layer, em.builder_
    tag, rows = ident(layer.name), layer.rows
    isa = next(i for i in shuffle.ISAS if plan.record["kernel"] == f"shuffle-{i.name}")
    c, k, m = q.num_codebooks, q.k, q.m
    rows_major = layer.kind != "conv2d"  # a dense layer's (rows, M); a conv's (M, rows) is NCHW already
    lanes = shuffle.block_rows(isa, rows, m if rows_major else None)
    # the grouped kernel transposes 4 outputs at a time in registers; the nibble kernel stores from a tile
    pairs, mb = shuffle.padded_pairs(c), shuffle.tile_for(isa, rows_major)
    if q.int8 is not None:  # the VNNI encoder (``encoder="int8"``; only layers it applies to carry operands)
        conv = conv_input(layer)
        enc = em.kernel(("encode-int8", isa.name, conv.shape, conv.kernel_hw, conv.strides, conv.padding, conv.dilation,
                         c, k, q.v, lanes),
                        f"lut_encode_{tag}", lambda: encode_int8.encode_conv_int8(conv, c, k, lanes, q.v))
        qparams = np.array([q.int8.inv_scale, q.int8.zero_point], np.float32)
        words = encode_int8.centroid_operands(q.int8.centroids, conv.kernel_hw)
        packed = bb.emit(relax.call_tir(enc, [x, relax.const(qparams), relax.const(words), relax.const(q.int8.offsets)],
                                        relax.TensorType(shuffle.packed_shape(rows, c, lanes, isa.grouped), "uint8")))
    else:
        packed = _emit_fp32_encoder(em, plan, x, isa, lanes, pairs)
    # a conv at batch B > 1: the lookup writes (B, M, OH*OW), i.e. NCHW, with no transpose after it
    # (no vector the lookup stores may span two images: 16 rows in the grouped kernel, half a row block in
    # the nibble kernel; else it writes (M, B*OH*OW) and a transpose follows)
    images = layer.output_shape[0] if layer.kind == "conv2d" else 1
    if not (images > 1 and (rows // images) % (16 if isa.grouped else lanes // 2) == 0):
        images = 1
    look, look_func = em.kernel_func(("shuffle", isa.name, rows, c, m, lanes, isa.grouped, rows_major, images),
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
    return em.epilogue(layer, y, steps, None, as_output, rows_layout=False)


def _emit_fp32_encoder(em: LookupEmitter, plan: Plan, x, isa, lanes: int, pairs: int):
    """The packed codes of ``_emit_shuffle`` from float scores: a conv's input read in place (im2col fused),
    or a dense layer's rows with codebooks in the vector lanes."""
    layer, q, bb = plan.layer, plan.pq_layer, em.builder_
    tag, rows = ident(layer.name), layer.rows
    c, k, v = q.num_codebooks, q.k, q.v
    cents, offsets = q.encoder_operands()
    if layer.kind == "conv2d" and not distances.get(q.distance).multiplier_free:
        conv = conv_input(layer)
        src = x
    else:
        conv, src = None, em.rows(plan, x, c * v)
    cents = np.ascontiguousarray(cents.transpose(0, 2, 1))
    if conv is None and isa.name != "neon":  # a dense row-major input: 16 (AVX2: 8) codebooks of a row per vector
        # (the row-lanes encoder gathers 16 rows per subvector element; on a Zen 3 (AVX2) this one encoded
        # D=256 1.4-2.4x faster. AArch64 keeps the row-lanes encoder, the one checked under emulation there)
        # with 16 vector registers (AVX2): 8 codebooks per step (one ymm per score), float argmin indices
        narrow = isa.registers < 32
        cl = kernels.CODEBOOK_LANES_16_REGISTERS if narrow else kernels.CODEBOOK_LANES
        enc = em.kernel(("encode-codebook-lanes", isa.name, rows, c, k, v, q.distance, lanes, isa.grouped, pairs, cl),
                           f"lut_encode_{tag}",
                           lambda: kernels.encode_codebook_lanes(rows, c, k, v, q.distance, lanes,
                                                                 grouped=isa.grouped, pairs=pairs,
                                                                 codebook_lanes=cl, float_indices=narrow))
        cents, offsets = kernels.codebook_lane_operands(cents, offsets, lanes=cl)
    else:
        # with 16 vector registers (AVX2) the 16x16 score buffer spills: scores fused into the argmin
        fused = isa.registers < 32
        enc = em.kernel(("encode-packed", isa.name, rows, c, k, v, q.distance, lanes, isa.grouped, conv, fused),
                           f"lut_encode_{tag}",
                           lambda: kernels.encode(rows, c, k, v, q.distance, pack_lanes=lanes, pairs=pairs,
                                                  conv=conv, grouped=isa.grouped, fused_scores=fused))
    packed = bb.emit(relax.call_tir(enc, [src, relax.const(cents), relax.const(offsets)],
                                    relax.TensorType(shuffle.packed_shape(rows, c, lanes, isa.grouped), "uint8")))
    return packed


def _dequantize(acc, scale, bias):
    """TE: float(acc[n, m]) * scale[m] + bias[m] (reference ``pq.dequantize``)."""
    from tvm import te

    return te.compute(acc.shape, lambda i, j: acc[i, j].astype("float32") * scale[j] + bias[j], name="dequantize")
