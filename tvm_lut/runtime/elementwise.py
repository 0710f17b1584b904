"""Fusing and vectorizing the model's elementwise ops: the part of a LUT model that is neither lookup nor encode.

``tvm.compile`` on a CPU target legalizes Relax ops into plain TIR loops and stops there: no fusion, no
schedule (cookbook §3). Between the lookup kernels a ResNet's ReLUs, residual adds and batch norm then run
as scalar loops over int64 indices, each writing a fresh intermediate: a ``reshape -> add -> relu`` on
64x32x32 floats took 88 us on one core, about 1.3 ns per element. ``fuse_and_vectorize`` runs Relax's
``zero`` pipeline (legalize, fold constants, ``FuseOps``/``FuseTIR``: one loop nest per chain of
elementwise ops) and then gives every fused function that is injective (no reduction) one schedule:
intermediate blocks inlined, the loops fused into one, split into vectors of ``lanes`` elements,
vectorized, and the outer loop run in parallel when the tensor is large. The same ``reshape -> add ->
relu`` then took 10 us (8.7x). Measured on the ResNet-18-class LUT model (batch 1, one thread, AMD EPYC
with AVX-512): the elementwise ops took 0.61 ms of its 2.7 ms before.

Exact convolutions (fused with what follows them) get the register-tiled schedule of
``conv2d_schedule``, matmuls (attention's products, exact dense layers) that of ``matmul_schedule``.
Functions already scheduled (the LUT kernels carry ``tirx.is_scheduled``), other reductions (pooling, a
mean) and anything the schedules cannot express are left as they were.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from tvm_lut.runtime.conv2d_schedule import schedule_conv2d, vectorize_block
from tvm_lut.runtime.matmul_schedule import schedule_matmul

LANES = 16  # float32 elements of one 512-bit vector; LLVM splits it in two on AVX2
PARALLEL_MIN_ELEMENTS = 1 << 15  # below this a parallel launch costs more than it saves
_SQRT1_2 = 0.7071067811865476
_POLYNOMIAL_OPS = ("relax.nn.gelu", "relax.nn.softmax")


@relax.expr_functor.mutator
class _FastNonlinear(relax.PyExprMutator):
    """GELU's ``erf`` and softmax's ``exp`` as TVM's polynomial ``fast_erf``/``fast_exp`` (``topi``): LLVM
    turns ``erf``/``exp`` into a libm call per element, so a vector loop of them runs at scalar speed. In
    a BERT-class encoder (``benchmarks/bert.py``) GELU took 5.5 ms and softmax 3.0 ms of a 17.8 ms LUT
    model. Measured error over [-9, 9] (erf) and [-80, 80] (exp), float32 against float64: ``fast_erf``
    3.3e-7 relative (float32 rounding), ``fast_exp`` 4.1e-6 relative. ``gelu_tanh`` and plain ``exp``
    keep their exact forms."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name not in _POLYNOMIAL_OPS:
            return call
        if str(getattr(call.args[0].ty, "dtype", "")) != "float32":  # fast_erf/fast_exp are float32 polynomials
            return call
        from tvm import topi

        if call.op.name == "relax.nn.gelu":  # 0.5 x (1 + erf(x / sqrt(2))), as torch's GELU
            return self.builder_.call_te(
                lambda x: x * 0.5 * (1.0 + topi.fast_erf(x * _SQRT1_2)), call.args[0], primfunc_name_hint="gelu")
        if call.op.name == "relax.nn.softmax":
            return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis),
                                         primfunc_name_hint="softmax")
        return call


def fast_nonlinear(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with GELU and softmax in their vectorizable polynomial forms (``_FastNonlinear``)."""
    mutator = _FastNonlinear(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def _injective_schedule(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """The vectorized form of an injective ``func``, or None where it is not one (or cannot be)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except (s_tir.ScheduleError, ValueError):  # no root block: not a legalized op
        return None
    if not blocks or any(iv.iter_type != tirx.IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars):
        return None  # a reduction (pooling, an exact conv or matmul): left to the default lowering
    try:
        for block in blocks[:-1]:
            sch.compute_inline(block)
    except s_tir.ScheduleError:  # an intermediate read in a way inlining cannot express
        return None
    if not vectorize_block(sch, blocks[-1], lanes, PARALLEL_MIN_ELEMENTS):
        return None  # too narrow to pay for a vector
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def fuse_and_vectorize(mod: tvm.IRModule, lanes: int = LANES, fast_math: bool = True) -> tvm.IRModule:
    """``mod`` through Relax's ``zero`` pipeline, its injective fused functions vectorized and its exact
    convolutions register-tiled (see the module docstring); ``lanes``: float32 elements per vector (16 on
    AVX-512, 8 on AVX2); ``fast_math``: GELU and softmax in polynomial form (``fast_nonlinear``). Opaque
    kernels (``op_pattern`` 8) are never fused and keep their own schedules."""
    if fast_math:
        mod = fast_nonlinear(mod)
    mod = relax.get_pipeline("zero")(mod)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        if "tirx.is_scheduled" in attrs or ("op_pattern" in attrs and int(attrs["op_pattern"]) > 4):
            continue
        scheduled = schedule_conv2d(func, lanes) or schedule_matmul(func, lanes) or _injective_schedule(func, lanes)
        if scheduled is not None:
            out[gv] = scheduled
    return out
