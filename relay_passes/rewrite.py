"""The rewrite service: a fitted ``Plan`` per layer in, the module with those layers replaced out.

Every pass that changes layers goes through here, by these public names: ``LUTify`` (the plans it fitted),
``PriorityMask`` (each evaluated subset, in one ``switchable`` build), ``EZCrop`` (``drop_unused_params``) and
the profiler (a layer rewritten alone). ``LookupEmitter`` emits each method's kernels (``pq``: encode and
table lookup, gather or byte shuffle, or the CAM simulator; ``butterfly``: one kernel per factor;
``lowrank``: two or three matmuls/convs) and the layer's epilogue, and records the ``call_tir`` kernels
each layer runs (``KernelCall``) so the profiler can time them from the model's own build.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from tir_schedules import kernels, shuffle, tuning, x86
from tvm_lut import butterfly as bf
from tvm_lut import cost, graph, pq
from tvm_lut import lowrank as lr
from tvm_lut.errors import OptionError
from tvm_lut.targets import is_cam, resolve_target

log = logging.getLogger("tvm_lut")

LAYERS_ATTR = "tvm_lut.layers"  # the per-layer decision records (JSON), written by LUTify
MASK_ATTR = "tvm_lut.priority_mask"  # written by PriorityMask, obeyed by LUTify


@dataclass
class Plan:
    """One layer's rewrite: the layer, its decision record and what was fitted for its method."""

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


@dataclass(frozen=True)
class LayerInput:
    """A kernel argument that is the layer's input (float32), seen with ``shape`` (a reshape is a view)."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class KernelCall:
    """One ``call_tir`` of a rewritten layer: the kernel's name in the built library, its arguments in
    order (``LayerInput``; an int: the output of that earlier call of the layer; else a constant's
    ``tvm.runtime.Tensor``) and its output's shape and dtype (the destination, passed last)."""

    name: str
    args: tuple
    shape: tuple[int, ...]
    dtype: str


def kernel_calls_between(lookup, x: relax.Expr, y: relax.Expr) -> list[KernelCall] | None:
    """The computation from ``x`` to ``y`` as the ``call_tir`` kernels it runs, in order, or None when it
    runs anything else (a pad, a transpose, a bias add, a matmul...): then only the layer compiled alone
    shows its cost. ``lookup(var)`` gives the value bound to a variable (``BlockBuilder.lookup_binding``
    while building, a dict of a function's bindings after). Reshapes are views in the VM and are skipped;
    an argument that is (a reshape of) ``x`` becomes a ``LayerInput`` of the shape the kernel sees."""
    calls: list[KernelCall] = []
    done: dict = {}

    def walk(e: relax.Expr):
        if e.same_as(x):
            return LayerInput(tuple(int(d) for d in e.ty.shape))
        if isinstance(e, tvm.ir.GenericConst):
            return e.value
        if not isinstance(e, relax.Var):
            return None
        if e in done:
            return done[e]
        value = lookup(e)
        if isinstance(value, relax.Var):  # an alias
            done[e] = walk(value)
            return done[e]
        if not isinstance(value, relax.Call):
            return None
        op = getattr(value.op, "name", "")
        if op == "relax.reshape":
            got = walk(value.args[0])
            if isinstance(got, LayerInput):
                got = LayerInput(tuple(int(d) for d in e.ty.shape))
            done[e] = got
            return got
        if op != "relax.call_tir" or len(value.args) != 2 or not isinstance(value.args[1], relax.Tuple):
            return None
        args = []
        for a in value.args[1].fields:
            got = walk(a)
            if got is None:
                return None
            args.append(got)
        calls.append(KernelCall(value.args[0].name_hint, tuple(args), tuple(int(d) for d in e.ty.shape),
                                str(e.ty.dtype)))
        done[e] = len(calls) - 1
        return done[e]

    return calls if isinstance(walk(y), int) else None



def account(p: Plan) -> None:
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
class LookupEmitter(PyExprMutator):
    def __init__(self, mod, plans: list[Plan], schedule: bool, database: str | None = None, target=None,
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

    def _emit_lookup(self, plan: Plan, x, as_output: bool):
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

    def _emit_cam(self, plan: Plan, x, as_output: bool):
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

    def _emit_shuffle(self, plan: Plan, x, as_output: bool):
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

    def _rows(self, plan: Plan, x, width: int):
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

    def _emit_butterfly(self, plan: Plan, x, as_output: bool):
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

    def _emit_lowrank(self, plan: Plan, x, as_output: bool):
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


def switchable(mod: tvm.IRModule, plans: list[Plan]) -> tvm.IRModule:
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
    return rewrite(base, plans, True, switch=switch)


def rewrite(mod: tvm.IRModule, plans: list[Plan], schedule: bool, database: str | None = None, target=None,
             tuned: list | None = None, calls: dict | None = None, switch: relax.Var | None = None) -> tvm.IRModule:
    func = mod["main"]
    m = LookupEmitter(mod, plans, schedule, database, target, switch)
    new_main = m.visit_expr(func)
    m.builder_.update_func(m.builder_.get().get_global_var("main"), new_main)
    if tuned is not None:
        tuned.extend(m.tuned)
    if calls is not None:
        calls.update(m.calls)
    out = m.builder_.get()
    out = relax.transform.DeadCodeElimination(["main"])(out)
    return drop_unused_params(out)


def drop_unused_params(mod: tvm.IRModule) -> tvm.IRModule:
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
