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

import tir_schedules
from tir_schedules import kernels, tuning
from tvm_lut import targets
from tvm_lut.frontend import graph
from tvm_lut.math import butterfly as bf, cost, lowrank as lr, pq

from . import registry

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
    state: object = None  # what a method registered from outside fitted (the built-ins use the fields above)

    @property
    def method(self) -> str:
        return self.record["method"]


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
    if r["method"] != "exact":
        registry.get(r["method"]).account(p)


def conv_input(layer: graph.Layer) -> kernels.ConvInput:
    """A conv layer's input as the kernels that read it in place see it (shape, kernel, stride, padding)."""
    cv = layer.conv
    return kernels.ConvInput(tuple(layer.input_shape), tuple(cv["kernel_hw"]), tuple(cv["strides"]),
                             tuple(cv["padding"]), tuple(cv["dilation"]))


def ident(name: str) -> str:
    """``name`` as an identifier for kernel names (``layer1.0.conv1`` -> ``layer1_0_conv1``)."""
    return re.sub(r"\W", "_", name).strip("_") or "layer"


_KERNELS: dict[tuple, tirx.PrimFunc] = {}  # hand-scheduled kernels built in this process, by shape and target


def _built_kernel(key: tuple, make, schedule) -> tirx.PrimFunc:
    """A kernel built (TVMScript parse + hand schedule: ~0.2 s each) once per process: the priority mask
    rewrites the same layers once per evaluated prefix, and each rewrite used to rebuild every kernel.
    ``key`` must determine the kernel: every value ``make`` reads (shapes, distance, the ISA level of a
    shuffle kernel) is in the key a method gives ``LookupEmitter.kernel``. ``schedule``: the target's hand
    schedule (``tir_schedules.schedule_for``), or None to leave the kernel unscheduled."""
    func = _KERNELS.get(key)
    if func is None:
        func = make()
        if schedule is not None:
            func = schedule(func)
        if len(_KERNELS) >= 4096:
            _KERNELS.clear()
        _KERNELS[key] = func
    return func


@mutator
class LookupEmitter(PyExprMutator):
    """Replaces each planned layer's binding by its method's computation (``RewriteMethod.emit``), with a
    kernel cache per shape and, for ``switchable``, both paths kept. Methods use ``builder_``, ``kernel``
    (a TIR kernel built once per shape, tuned from the database or hand-scheduled), ``rows`` (the layer's
    input as a (rows, D) matrix) and ``epilogue`` (bias and the layer's output layout)."""

    def __init__(self, mod, plans: list[Plan], schedule: bool, database: str | None = None, target=None,
                 switch: relax.Var | None = None):
        super().__init__(mod)
        self.switch = switch  # switchable: both paths kept, ``switch[i]`` picks plan i's lookup output
        self.pending: dict = {}  # switchable: exact output var -> (lookup output, plan index)
        self.index = {p.layer.call_var: i for i, p in enumerate(plans)}
        self.database = database
        self.target = targets.resolve(target)  # a Target: its lookup kernels' schedules and tuning records
        self.tuned: list[str] = []
        self.by_call = {p.layer.call_var: p for p in plans}
        self.drop = [] if switch is not None else [v for p in plans for v in [p.layer.call_var, *p.layer.folded_vars]]
        self.schedule = schedule
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.calls: dict[str, list[KernelCall] | None] = {}  # layer name -> its kernels, as emitted

    def kernel(self, key: tuple, name: str, make) -> relax.GlobalVar:
        """``kernel_func``'s global var."""
        return self.kernel_func(key, name, make)[0]

    def kernel_func(self, key: tuple, name: str, make) -> tuple[relax.GlobalVar, tirx.PrimFunc]:
        """Build (once per shape) a kernel: tuned from the database when it has it, else hand-scheduled
        (or left unscheduled for MetaSchedule with ``schedule=False``)."""
        got = self.kernels.get(key)
        if got is None:
            func = None
            tuned = None
            if self.database:
                func = make()
            if self.database and tuning.tunable(func):
                tuned = tuning.apply_database(func, self.target.tvm, self.database)
                if tuned is not None:
                    self.tuned.append(name)
            if tuned is not None:
                func = tuned
            else:
                hand = tir_schedules.schedule_for(self.target) if self.schedule else None
                where = (type(self.target).__name__, str(self.target.tvm))
                func = _built_kernel((key, name, self.schedule, where), make, hand)
            got = (self.builder_.add_func(func, name), func)
            self.kernels[key] = got
        return got

    def visit_var_binding_(self, binding):
        plan = self.by_call.get(binding.var)
        if plan is not None and self.switch is not None:
            x = self.visit_expr(plan.layer.input_expr)
            y = registry.get(plan.method).emit(self, plan, x, False)
            self.calls[plan.layer.name] = kernel_calls_between(self.builder_.lookup_binding, x, y)
            self.pending[plan.layer.output_var] = (y, self.index[binding.var])
        elif plan is not None:
            x = self.visit_expr(plan.layer.input_expr)
            out_var = plan.layer.output_var
            y = registry.get(plan.method).emit(self, plan, x, not isinstance(out_var, relax.DataflowVar))
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

    def rows(self, plan: Plan, x, width: int):
        """The layer's (rows, width) input matrix: im2col for a conv, a reshape for dense; zero columns
        beyond D (subspace or butterfly padding)."""
        layer, bb = plan.layer, self.builder_
        rows = layer.rows
        if layer.kind == "conv2d":
            cv = layer.conv
            n_, ch, h, w = layer.input_shape
            gv = self.kernel(("im2col", tuple(layer.input_shape), tuple(cv["kernel_hw"]), tuple(cv["strides"]),
                               tuple(cv["padding"]), tuple(cv["dilation"]), width), f"lut_im2col_{ident(layer.name)}",
                              lambda: kernels.im2col(n_, ch, h, w, cv["kernel_hw"], cv["strides"], cv["padding"],
                                                     cv["dilation"], width))
            return bb.emit(relax.call_tir(gv, [x], relax.TensorType((rows, width), "float32")))
        x2 = x if len(layer.input_shape) == 2 else bb.emit(relax.op.reshape(x, (rows, layer.d)))
        if width != layer.d:
            x2 = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, width - layer.d]))
        return x2

    def epilogue(self, layer: graph.Layer, y, steps: list, bias, as_output: bool, rows_layout: bool = True):
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

SWITCH_PARAM = "tvm_lut.switch"


def switchable(mod: tvm.IRModule, plans: list[Plan], calls: dict | None = None) -> tvm.IRModule:
    """``mod`` with every plan's lookup *and* exact path, and a last weight parameter ``tvm_lut.switch``
    (bool, one per plan, in ``plans`` order; all False: the exact model) that picks each layer's output.

    Set at run time, the switch evaluates any subset of converted layers with one compile: what the
    priority mask needs for each layer alone and each prefix of its ranking. A selected layer's output is
    the lookup kernels' output bit for bit (``where`` selects, it does not blend). ``calls`` receives each
    layer's kernels (``KernelCall``), as ``rewrite`` records them, to time them in the built module."""
    func = mod["main"]
    switch = relax.Var(SWITCH_PARAM, relax.TensorType((len(plans),), "bool"))
    values = list(func.attrs["params"]) if func.attrs is not None and "params" in func.attrs else None
    func = relax.Function(list(func.params) + [switch], func.body, func.ret_ty, func.is_pure, func.attrs)
    if values is not None:
        func = func.with_attr("params", values + [tvm.runtime.tensor(np.zeros(len(plans), bool))])
    base = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    base["main"] = func
    return rewrite(base, plans, True, switch=switch, calls=calls)


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
